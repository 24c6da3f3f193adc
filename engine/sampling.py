"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigError, _check, _is_int


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the output tokens of one request.

    temperature: 0 means greedy. top_p in (0, 1]. top_k: -1 (off) or >= 1.
    max_tokens: most output tokens. seed: same seed, same tokens.
    ignore_eos: keep generating past the end-of-sequence token (benchmarks).
    stop_token_ids: extra token ids that finish the request.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        t = self.temperature
        _check(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 and t == t,
               "temperature", t, "a number >= 0 (0 is greedy)")
        p = self.top_p
        _check(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1, "top_p", p, "a number in (0, 1]")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", self.top_k,
               "-1 (disabled) or an integer >= 1")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "None or an integer")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "True or False")
        try:
            ids = tuple(int(i) for i in self.stop_token_ids)
        except (TypeError, ValueError):
            raise ConfigError(f"stop_token_ids={self.stop_token_ids!r} is not allowed: "
                              "stop_token_ids must be a sequence of integers") from None
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k and outside the top-p nucleus of one row."""
    if top_k != -1 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep a token while the mass before it is below top_p (the first token is always kept).
        remove_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


# Rows of logits the sampler copies to the host at once: its device temporaries (a gather of that many rows)
# are bounded whatever the batch, and the host never holds more than that many float32 rows either.
SAMPLE_CHUNK_ROWS = 32


class Sampler:
    """Turns the last-position logits of each request into one token id each.

    Greedy rows take the argmax. Random rows draw from softmax(logits / temperature) after top-k and
    top-p filtering, using the request's own torch.Generator when it has a seed (so a seeded request
    gives the same tokens whatever else is in the batch), else the engine's generator.

    Device memory: the argmax over every row, and a gather of at most chunk_rows random rows at a time copied to
    the host, where they are filtered (in row order, so the engine's generator is drawn from in the same order
    whatever chunk_rows is). Only rows that sample at random leave the device.
    """

    def __init__(self, seed: int = 0, chunk_rows: int = SAMPLE_CHUNK_ROWS):
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk_rows = chunk_rows

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
        # float32 from bf16/fp16 is exact and monotone: the argmax (ties included) is that of logits.float().
        out = logits.argmax(dim=-1).tolist()
        rows = [i for i, p in enumerate(params) if not p.greedy]
        for start in range(0, len(rows), self.chunk_rows):
            chunk = rows[start:start + self.chunk_rows]
            index = torch.as_tensor(chunk, device=logits.device)
            block = logits.index_select(0, index).cpu().float()
            for i, token in zip(chunk, self._sample_rows(block, [params[i] for i in chunk],
                                                         [generators[i] for i in chunk])):
                out[i] = token
        return out

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> list[int]:
        """One token per row of host float32 logits [rows, vocab], every row sampling at random."""
        out = []
        for row_logits, p, gen in zip(logits, params, generators):
            row = _filter_top_k_top_p(row_logits / p.temperature, p.top_k, p.top_p)
            probs = row.softmax(-1)
            out.append(int(torch.multinomial(probs, 1, generator=gen if gen is not None else self.generator).item()))
        return out
