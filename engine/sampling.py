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
    n: completions returned (parallel sampling, vLLM's and OpenAI's n). The n sequences share the
      prompt's KV blocks; with a seed, sequence i samples with seed + i (as vLLM does), so it gives the
      tokens a separate request with that seed gives.
    best_of: sequences generated (>= n, default n); the n with the highest cumulative logprob are returned.
    logprobs: None, or compute the log-probability of every sampled token (cumulative_logprob of each
      completion); sequences of n > 1 requests always have it. An integer k > 0 also keeps the top-k.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None

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
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.best_of is None or (_is_int(self.best_of) and self.best_of >= self.n), "best_of", self.best_of,
               f"None or an integer >= n ({self.n})")
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs", self.logprobs,
               "None or an integer >= 0")

    @property
    def num_sequences(self) -> int:
        """Sequences the request generates: best_of, else n."""
        return self.best_of or self.n

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


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search (vLLM's LLM.beam_search API), scored as HF transformers generate(num_beams=beam_width,
    do_sample=False, length_penalty=length_penalty, early_stopping=False) scores it.

    beam_width: beams kept per step (>= 1). max_tokens: most output tokens of a beam.
    length_penalty: a finished beam scores cumulative logprob / (output tokens ** length_penalty).
    ignore_eos: beams never finish on the end-of-sequence token. Beams are scored with the model's own
    log-probabilities (no temperature).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width", self.beam_width, "an integer >= 1")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "True or False")
        lp = self.length_penalty
        _check(isinstance(lp, (int, float)) and not isinstance(lp, bool) and lp == lp and abs(lp) != float("inf"),
               "length_penalty", lp, "a finite number")


class SampledToken(int):
    """A sampled token id that also carries its log-probability under the model (float) and, when
    asked for, the top-k alternatives (`top`: (token ids, logprobs), best first). Being an int, it goes
    wherever a token id goes; only rows whose params ask for logprobs get one."""

    logprob: float
    top: tuple[list[int], list[float]] | None

    def __new__(cls, token_id: int, logprob: float, top=None):
        self = super().__new__(cls, token_id)
        self.logprob, self.top = logprob, top
        return self


class Sampler:
    """Turns the last-position logits of each request into one token id each.

    Greedy rows take the argmax. Random rows draw from softmax(logits / temperature) after top-k and
    top-p filtering, using the request's own torch.Generator when it has a seed (so a seeded request
    gives the same tokens whatever else is in the batch), else the engine's generator (on a GPU, unseeded
    rows without top-k/top-p draw together from a device generator seeded alike).

    Device memory is bounded whatever the batch: the argmax over every row, then at most chunk_rows rows at a
    time, either drawn on the device (unseeded rows without filters) or gathered and copied to the host, where
    they are filtered in row order (so the engine's generator is drawn from in the same order whatever
    chunk_rows is). Only rows that sample at random leave the device.
    """

    def __init__(self, seed: int = 0, chunk_rows: int = SAMPLE_CHUNK_ROWS):
        self.seed, self.chunk_rows = seed, chunk_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.device_generator: torch.Generator | None = None  # for unseeded rows drawn on a GPU

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
        # float32 from bf16/fp16 is exact and monotone: the argmax (ties included) is that of logits.float().
        greedy = logits.argmax(dim=-1).tolist()
        out = greedy if all(p.greedy for p in params) else self._sample(logits, params, generators, greedy)
        if any(p.logprobs is not None for p in params):
            out = self._attach_logprobs(logits, params, out)
        return out

    @staticmethod
    def _attach_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[int]:
        """Replace the tokens of rows that ask for logprobs by SampledTokens (log_softmax of the raw logits,
        float32, as HF's beam search scores them)."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        sub = logits[rows].float()
        logp = torch.log_softmax(sub, dim=-1)
        chosen = logp.gather(1, torch.tensor([tokens[i] for i in rows], device=sub.device)[:, None])[:, 0].tolist()
        k = max(params[i].logprobs for i in rows)
        top = torch.topk(logp, k) if k > 0 else None
        top_ids = top.indices.tolist() if top is not None else None
        top_lp = top.values.tolist() if top is not None else None
        out = list(tokens)
        for j, i in enumerate(rows):
            kk = params[i].logprobs
            out[i] = SampledToken(tokens[i], chosen[j], (top_ids[j][:kk], top_lp[j][:kk]) if kk else None)
        return out

    def _sample(self, logits, params, generators, greedy) -> list[int]:
        out = list(greedy)
        rest = [i for i, p in enumerate(params) if not p.greedy]
        if logits.device.type == "cuda":
            # Unseeded rows without top-k/top-p draw together on the device: copying a batch of full-vocabulary
            # rows to the host and drawing one by one costs more than the forward pass at large batches.
            batch = [i for i in rest if generators[i] is None and params[i].top_k == -1 and params[i].top_p == 1.0]
            if batch and self.device_generator is None:
                self.device_generator = torch.Generator(device=logits.device).manual_seed(self.seed)
            for start in range(0, len(batch), self.chunk_rows):
                chunk = batch[start:start + self.chunk_rows]
                temps = torch.tensor([params[i].temperature for i in chunk], device=logits.device)
                probs = torch.softmax(logits[chunk].float() / temps[:, None], dim=-1)
                for i, t in zip(chunk, torch.multinomial(probs, 1, generator=self.device_generator)[:, 0].tolist()):
                    out[i] = t
            done = set(batch)
            rest = [i for i in rest if i not in done]
        for start in range(0, len(rest), self.chunk_rows):
            chunk = rest[start:start + self.chunk_rows]
            block = logits.index_select(0, torch.as_tensor(chunk, device=logits.device)).cpu().float()
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
            out.append(int(torch.multinomial(row.softmax(-1), 1, generator=gen if gen is not None else self.generator)
                           .item()))
        return out
