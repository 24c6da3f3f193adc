"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigError, _check, _is_int
from . import sample_ops
from .sample_ops import (TOPK_PATH_MAX_K, apply_top_k_top_p, apply_top_p_probed, apply_top_p_sorted, argmax_rows,
                         exponential_race, fill_exponential)


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
        # torch.Generator.manual_seed takes [-2**63, 2**64); sequence i of a request with n > 1 uses seed + i.
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed and self.seed + self.n <= 2**64),
               "seed", self.seed, f"None or an integer from -2**63 to 2**64 - n ({self.n})")
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
               "None or an integer >= 0")  # its upper bound, the vocabulary, is checked by the engine

    @property
    def num_sequences(self) -> int:
        """Sequences the request generates: best_of, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row (any float dtype, any device; already divided by the temperature) as float32, with the tokens outside
    top-k and outside the top-p nucleus masked to -inf: the sampler's own filter (Sampler.filtered_logits), so
    speculative decoding's verifier draws from exactly the distribution the sampler draws from."""
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)]
    return Sampler().filtered_logits(logits.float().reshape(1, -1), params)[0]


# Rows the sampler filters and draws at once: its device temporaries are a few float32 buffers of this many rows
# (top-p rows without a small top-k, which may sort their rows, go SORT_CHUNK_DIVISOR times fewer at a time), whatever
# the batch. engine.memory.sampler_temporary_bytes states the bound; the runner's memory profile measures it.
SAMPLE_CHUNK_ROWS = 128
SORT_CHUNK_DIVISOR = 4


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
    """Turns the last-position logits of each request into one token id each, on the logits' device.

    Greedy rows take the argmax (of the logits as given: float32 from bf16/fp16 is exact and monotone). Random rows
    draw from the filtered softmax(logits / temperature) of engine.sample_ops (top-k, then top-p; ties kept
    together) by the exponential race: token = argmax(x - log q), q ~ Exponential(1) per token.

    Invariants:
      - Device memory is bounded whatever the batch: random rows are gathered, filtered and drawn chunk_rows at a
        time (top-p rows that may sort their whole row, sort_rows at a time), logprobs computed chunk_rows at a time;
        nothing else is allocated per row beyond the argmax and the token vector (engine.memory.
        sampler_temporary_bytes; the runner's memory profile runs profile_params(max_num_seqs, vocab)).
      - A request with a seed (a torch.Generator of its own, on the host) is reproducible and independent of its
        batch: every step it draws one 63-bit seed from its generator, which seeds a device generator that fills
        its row's q alone; the row is filtered with row-wise operations, in a chunk whose rows all need the same
        filter path (and, on the top-k path, the same k), so nothing of another row reaches it (whether top-p alone
        finds a row's nucleus among its largest values, or sorts it, depends on that row alone).
      - Unseeded rows fill q with one batched fill per chunk (sample_ops.fill_exponential) from the engine's
        generator: `generator` (the host one, also lent to speculative decoding) on the CPU, a device generator
        seeded with `seed` elsewhere.
      - The host waits for the device when it reads the tokens (and logprobs) back, and once per chunk of rows with
        top-p alone (to learn whether the probe found every row's nucleus); nowhere else.
    """

    def __init__(self, seed: int = 0, chunk_rows: int = SAMPLE_CHUNK_ROWS):
        if not (isinstance(chunk_rows, int) and chunk_rows >= 1):
            raise ValueError(f"chunk_rows={chunk_rows!r} is not allowed: chunk_rows must be an integer >= 1")
        self.seed, self.chunk_rows = seed, chunk_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.device_generator: torch.Generator | None = None  # unseeded rows on an accelerator
        self._row_generator: torch.Generator | None = None    # re-seeded for each seeded row (device ones)
        self._order: list[int] = []  # the random rows of the last call in the order their chunks came

    @property
    def sort_rows(self) -> int:
        """Rows of a chunk on the sort and top-p paths (top-p without a top-k <= TOPK_PATH_MAX_K)."""
        return max(1, self.chunk_rows // SORT_CHUNK_DIVISOR)

    def profile_params(self, num_rows: int, vocab_size: int) -> list[SamplingParams]:
        """The worst case of the sampler's memory over num_rows rows, for the runner's memory profile: a full chunk
        of sort-path rows (top-p with a top-k above the top-k path's), a full chunk of top-k rows at the largest k of the top-k path with top-p
        and logprobs (as many as fit), greedy rows after them (they still take the argmax over every row)."""
        # The sort path without the probe (which may spare a trained model's rows the sort): a top-k above the
        # top-k path's, when the vocabulary has one.
        sort = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9,
                              top_k=TOPK_PATH_MAX_K + 1 if TOPK_PATH_MAX_K + 1 < vocab_size else -1)
        k = max(1, min(TOPK_PATH_MAX_K, vocab_size - 1))
        topk = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, top_k=k, logprobs=min(5, vocab_size))
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        n_sort = min(num_rows, self.sort_rows)
        n_topk = min(num_rows - n_sort, self.chunk_rows)
        return [sort] * n_sort + [topk] * n_topk + [greedy] * (num_rows - n_sort - n_topk)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
        tokens, logprobs = self.sample_on_device(logits, params, generators)
        return self.to_host(params, tokens.tolist(), logprobs)

    def to_host(self, params: list[SamplingParams], tokens: list[int], logprobs) -> list[int]:
        """The tokens of sample_on_device, read back (tokens: its tensor's tolist()), with SampledTokens for the
        rows that asked for logprobs (which reads their logprobs back too)."""
        if logprobs is None:
            return tokens
        return self._attach_logprobs(params, logprobs[0], tokens, logprobs[1])

    def sample_on_device(self, logits: torch.Tensor, params: list[SamplingParams],
                         generators: list[torch.Generator | None]):
        """(tokens, logprobs): the sampled token of each row ([rows] int64, on the logits' device) and, when a row
        asks for logprobs, (rows, their logprob tensors) for to_host, else None. Reads nothing back (the top-p
        probe aside), so the host can go on while the device samples (async scheduling)."""
        n = len(params)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        greedy = argmax_rows(logits) if len(random_rows) < n else None
        tokens = greedy
        if random_rows:
            drawn = []
            for chunk, x in self._filtered_chunks(logits, params, random_rows):
                drawn.append(exponential_race(x, self._exponentials(x, [generators[i] for i in chunk])))
                del x  # before the next chunk's x exists: one chunk's buffers at a time
            tokens = _merge_rows(greedy, n, self._order, drawn)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        return tokens, ((lp_rows, self._logprobs(logits, params, lp_rows, tokens)) if lp_rows else None)

    # ----- random rows ---------------------------------------------------------------------------------
    def _groups(self, params: list[SamplingParams], rows: list[int], vocab: int) -> list[tuple[object, list[int]]]:
        """The random rows split by filter path, in order of first appearance: "plain" (temperature only),
        ("topk", k) (1 <= k <= TOPK_PATH_MAX_K, k < vocab; any top_p), "topp" (top-p without top-k: the probe,
        then the sort for the rows it leaves), "sort" (k > TOPK_PATH_MAX_K, k < vocab; any top_p)."""
        groups: dict[object, list[int]] = {}
        for i in rows:
            p = params[i]
            k = p.top_k if 1 <= p.top_k < vocab else None
            if k is not None and k <= TOPK_PATH_MAX_K:
                key = ("topk", k)
            elif k is not None:
                key = "sort"
            elif p.top_p < 1.0:
                key = "topp"
            else:
                key = "plain"
            groups.setdefault(key, []).append(i)
        return list(groups.items())

    def _filtered_chunks(self, logits: torch.Tensor, params: list[SamplingParams], rows: list[int]):
        """Yield (chunk, x) for the random rows `rows`, a chunk at a time (see _groups), in the order self._order
        (set first): chunk the row numbers, x [len(chunk), vocab] float32 their logits / temperature with the
        filtered tokens at -inf (a new buffer the caller may overwrite)."""
        dev, vocab = logits.device, logits.shape[-1]
        groups = self._groups(params, rows, vocab)
        self._order = order = [i for _, group in groups for i in group]
        # Per-row parameters of every random row, in group order: two host-to-device copies per call.
        ints = _to_device([order, [min(params[i].top_k, vocab) if params[i].top_k >= 1 else vocab for i in order]],
                          torch.long, dev)
        floats = _to_device([[float(params[i].temperature) for i in order], [float(params[i].top_p) for i in order]],
                            torch.float32, dev)
        start = 0
        for key, group in groups:
            size = self.sort_rows if key in ("sort", "topp") else self.chunk_rows
            for s in range(0, len(group), size):
                chunk = group[s:s + size]
                sl = slice(start + s, start + s + len(chunk))
                x = logits.index_select(0, ints[0, sl]).float()
                x.div_(floats[0, sl, None])
                top_p = floats[1, sl, None]
                if key == "topp" and sample_ops.TOP_P_PROBE_K < vocab:
                    done = apply_top_p_probed(x, top_p)
                    if not all(done[:, 0].tolist()):  # the host waits for the device here, once a chunk
                        apply_top_p_sorted(x, ints[1, sl, None], torch.where(done, 1.0, top_p))
                elif key in ("sort", "topp"):
                    apply_top_p_sorted(x, ints[1, sl, None], top_p)
                elif key != "plain":
                    apply_top_k_top_p(x, key[1], top_p if any(params[i].top_p < 1.0 for i in chunk) else None)
                yield chunk, x
                del x
            start += len(group)

    def filtered_logits(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """[rows, vocab] float32: each random row's logits / temperature with the tokens its top-k and top-p filter
        out at -inf (softmax of it is the distribution the row draws from), greedy rows' logits as they are. Whole
        rows, not chunked: for tests, and small batches whose distribution itself is wanted."""
        rows = [i for i, p in enumerate(params) if not p.greedy]
        parts = [x for _, x in self._filtered_chunks(logits, params, rows)] if rows else []
        return _merge_rows(logits.float() if len(rows) < len(params) else None, len(params),
                           self._order if rows else [], parts)

    def _exponentials(self, x: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """q [rows, vocab] ~ Exponential(1): one batched fill from the engine's generator when a row has no
        generator of its own, then each seeded row's own fill (see the class invariants)."""
        dev = x.device
        q = torch.empty_like(x)
        if any(g is None for g in generators):
            fill_exponential(q, self._engine_generator(dev))
        seeded = [(j, g) for j, g in enumerate(generators) if g is not None]
        if seeded:
            row_gen = self._seeded_row_generator(dev)
            for j, g in seeded:
                row_gen.manual_seed(int(torch.randint(0, 2**63 - 1, (), generator=g)))
                fill_exponential(q[j], row_gen)
        return q

    def _engine_generator(self, dev: torch.device) -> torch.Generator:
        if dev.type == "cpu":
            return self.generator
        if self.device_generator is None or self.device_generator.device != dev:
            self.device_generator = torch.Generator(device=dev).manual_seed(self.seed)
        return self.device_generator

    def _seeded_row_generator(self, dev: torch.device) -> torch.Generator:
        if self._row_generator is None or self._row_generator.device != dev:
            self._row_generator = torch.Generator(device=dev)
        return self._row_generator

    # ----- logprobs --------------------------------------------------------------------------------------
    def _logprobs(self, logits, params, rows, tokens):
        """On the device, chunk_rows rows at a time: the log_softmax (float32, raw logits, no temperature: as HF's
        beam search scores) of each row's token, and the top-k alternatives when asked for."""
        dev = logits.device
        idx_all = _to_device(rows, torch.long, dev)
        k = max(params[i].logprobs for i in rows)
        chosen, top_ids, top_lp = [], [], []
        for s in range(0, len(rows), self.chunk_rows):
            idx = idx_all[s:s + self.chunk_rows]
            logp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
            chosen.append(logp.gather(1, tokens.index_select(0, idx)[:, None])[:, 0])
            if k > 0:
                top = torch.topk(logp, k)
                top_ids.append(top.indices)
                top_lp.append(top.values)
            del logp
        return (torch.cat(chosen), torch.cat(top_ids) if k > 0 else None, torch.cat(top_lp) if k > 0 else None)

    @staticmethod
    def _attach_logprobs(params, rows, tokens: list[int], logprobs) -> list[int]:
        """Replace the tokens of rows that ask for logprobs by SampledTokens."""
        chosen, top_ids, top_lp = logprobs
        chosen = chosen.tolist()
        top_ids = top_ids.tolist() if top_ids is not None else None
        top_lp = top_lp.tolist() if top_lp is not None else None
        out = list(tokens)
        for j, i in enumerate(rows):
            kk = params[i].logprobs
            out[i] = SampledToken(tokens[i], chosen[j], (top_ids[j][:kk], top_lp[j][:kk]) if kk else None)
        return out


def _merge_rows(base: torch.Tensor | None, n: int, order: list[int], parts: list[torch.Tensor]) -> torch.Tensor:
    """The n rows: row order[j] from the concatenated parts (row j of them), the others from base (None when every
    row is in order). One gather through a host-built permutation (no scatter: a profile counts index_copy and
    scatter kernels as KV writes)."""
    base_rows = 0 if base is None else n
    perm = list(range(n))
    for j, i in enumerate(order):
        perm[i] = base_rows + j
    stacked = torch.cat(([base] if base is not None else []) + parts)
    return stacked.index_select(0, _to_device(perm, torch.long, stacked.device))


def _to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queue (pageable memory is staged by the
    driver at once, so non_blocking is safe here)."""
    t = torch.tensor(data, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)
