"""Request traces: what is sent to the engine, and when.

A `Workload` is a list of `RequestSpec` (prompt token ids, output length, arrival offset) plus an
arrival process:

- ``offline``: every request arrives at t=0 (the throughput benchmark);
- ``poisson``: independent arrivals at ``request_rate`` requests/s (exponential gaps);
- ``concurrency``: a closed loop, the runner keeps ``concurrency`` requests in flight and sends the
  next one as soon as one finishes (arrival offsets are ignored).

A request may depend on another (``depends_on``): it arrives ``arrival_time`` seconds after that one
finished. The multi-turn workload uses this so that turn k+1 is sent after turn k came back, as a chat
client would, which is also what makes its prompt prefix hit the cache.

Token ids are made up (uniform in ``[0, vocab_size)``, seeded); run them with
``SamplingParams(ignore_eos=True)`` so a random EOS does not end a request early.
Every generator is reproducible: same parameters and seed, same trace.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

ARRIVALS = ("offline", "poisson", "concurrency")
WORKLOAD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "workloads")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a trace.

    arrival_time: seconds after the start of the run, or, when ``depends_on`` is set, seconds after
    that request finished (a think time).
    max_tokens: output tokens to generate (the run uses ignore_eos, so exactly this many).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    arrival_time: float = 0.0
    depends_on: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids is empty; a prompt needs >= 1 token")
        if int(self.max_tokens) < 1:
            raise ValueError(f"request {self.request_id!r}: max_tokens={self.max_tokens} must be >= 1")
        if not self.arrival_time >= 0:
            raise ValueError(f"request {self.request_id!r}: arrival_time={self.arrival_time} must be >= 0")
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "arrival_time", float(self.arrival_time))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Workload:
    """A trace of requests and the arrival process that replays it (see the module docstring).

    name: the generator's name (or the file it came from); params: the generator's arguments, kept so
    a results row says which workload produced it.
    """

    name: str
    requests: tuple[RequestSpec, ...]
    arrival: str = "offline"
    request_rate: float | None = None
    concurrency: int | None = None
    params: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival={self.arrival!r} is not allowed: arrival must be one of {ARRIVALS}")
        if self.arrival == "poisson" and not (self.request_rate and self.request_rate > 0):
            raise ValueError(f"arrival='poisson' needs request_rate > 0 (requests/s), got {self.request_rate!r}")
        if self.arrival == "concurrency" and not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise ValueError(f"arrival='concurrency' needs concurrency >= 1 (requests in flight), "
                             f"got {self.concurrency!r}")
        ids = [r.request_id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids of a workload must be unique")
        known = set()
        for r in self.requests:
            if r.depends_on is not None and r.depends_on not in known:
                raise ValueError(f"request {r.request_id!r} depends on {r.depends_on!r}, "
                                 "which is not an earlier request of the workload")
            known.add(r.request_id)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    @property
    def max_token_id(self) -> int:
        return max((max(r.prompt_token_ids) for r in self.requests), default=-1)

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + output of any request, in tokens (must fit max_model_len)."""
        return max((r.prompt_len + r.max_tokens for r in self.requests), default=0)

    def with_arrival(self, arrival: str = "offline", request_rate: float | None = None,
                     concurrency: int | None = None, seed: int = 0) -> "Workload":
        """The same requests under another arrival process (Poisson offsets drawn from ``seed``)."""
        reqs = _arrivals(list(self.requests), arrival, request_rate, seed)
        params = {**self.params, "arrival": arrival, "request_rate": request_rate, "concurrency": concurrency}
        return replace(self, requests=tuple(reqs), arrival=arrival, request_rate=request_rate,
                       concurrency=concurrency, params=params)

    def head(self, n: int) -> "Workload":
        """The first n requests (with whatever they depend on kept consistent by dropping orphans)."""
        kept, ids = [], set()
        for r in self.requests[:n]:
            if r.depends_on is None or r.depends_on in ids:
                kept.append(r)
                ids.add(r.request_id)
        return replace(self, requests=tuple(kept))

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of the requests and the arrival process (not of the name)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.arrival, self.request_rate, self.concurrency]).encode())
        for r in self.requests:
            h.update(json.dumps([r.request_id, r.max_tokens, round(r.arrival_time, 9), r.depends_on]).encode())
            h.update(np.asarray(r.prompt_token_ids, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """Counts and length statistics (tokens) of the trace, for reports."""
        p = np.array([r.prompt_len for r in self.requests], dtype=float)
        o = np.array([r.max_tokens for r in self.requests], dtype=float)
        return {
            "name": self.name, "num_requests": len(self.requests), "arrival": self.arrival,
            "request_rate": self.request_rate, "concurrency": self.concurrency,
            "prompt_len_mean": float(p.mean()) if len(p) else math.nan,
            "prompt_len_max": int(p.max()) if len(p) else 0,
            "output_len_mean": float(o.mean()) if len(o) else math.nan,
            "output_len_max": int(o.max()) if len(o) else 0,
            "total_prompt_tokens": int(p.sum()), "total_output_tokens": int(o.sum()),
            "fingerprint": self.fingerprint(),
            "params": {k: v for k, v in self.params.items() if k not in ("arrival", "request_rate", "concurrency")},
        }

    def save_jsonl(self, path: str) -> str:
        """Write the trace: one header line ``{"workload": {...}}`` then one JSON object per request."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        header = {"workload": {"name": self.name, "arrival": self.arrival, "request_rate": self.request_rate,
                               "concurrency": self.concurrency, "params": self.params}}
        with open(path, "w") as f:
            f.write(json.dumps(header) + "\n")
            for r in self.requests:
                d = asdict(r)
                d["prompt_token_ids"] = list(r.prompt_token_ids)
                if d["depends_on"] is None:
                    del d["depends_on"]
                f.write(json.dumps(d) + "\n")
        return path


def load_workload(path: str, vocab_size: int | None = None, seed: int = 0) -> Workload:
    """Read a JSONL trace written by `Workload.save_jsonl`, or one you wrote yourself.

    Each request line needs ``max_tokens`` (or ``output_len``) and either ``prompt_token_ids`` or
    ``prompt_len`` (then ids are drawn uniformly in [0, vocab_size) from ``seed``, so lengths taken from
    production logs are enough). Optional: ``request_id``, ``arrival_time`` (s), ``depends_on``.
    An optional first line ``{"workload": {"arrival": ..., "request_rate": ..., "concurrency": ...}}``
    sets the arrival process (default offline).
    """
    rng = np.random.default_rng(seed)
    header: dict = {}
    reqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if "workload" in d:
                header = d["workload"]
                continue
            ids = d.get("prompt_token_ids")
            if ids is None:
                if "prompt_len" not in d:
                    raise ValueError(f"{path}:{lineno}: a request needs prompt_token_ids or prompt_len")
                if vocab_size is None:
                    raise ValueError(f"{path}:{lineno}: prompt_len without token ids needs vocab_size")
                ids = rng.integers(0, vocab_size, int(d["prompt_len"])).tolist()
            max_tokens = d.get("max_tokens", d.get("output_len"))
            if max_tokens is None:
                raise ValueError(f"{path}:{lineno}: a request needs max_tokens (or output_len)")
            reqs.append(RequestSpec(str(d.get("request_id", f"req-{len(reqs)}")), ids, int(max_tokens),
                                    float(d.get("arrival_time", 0.0)), d.get("depends_on")))
    if vocab_size is not None and reqs and max(max(r.prompt_token_ids) for r in reqs) >= vocab_size:
        raise ValueError(f"{path}: token ids reach {max(max(r.prompt_token_ids) for r in reqs)}, "
                         f"outside the model's vocabulary of {vocab_size}")
    name = header.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Workload(name, tuple(reqs), header.get("arrival", "offline"), header.get("request_rate"),
                    header.get("concurrency"), dict(header.get("params") or {}, file=os.path.basename(path)))


# --- generators ---------------------------------------------------------------------------------

def _arrivals(reqs: list[RequestSpec], arrival: str, request_rate: float | None, seed: int) -> list[RequestSpec]:
    """Set the arrival offsets of independent requests; dependent ones keep their think time."""
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival={arrival!r} is not allowed: arrival must be one of {ARRIVALS}")
    if arrival != "poisson":
        return [r if r.depends_on else replace(r, arrival_time=0.0) for r in reqs]
    if not (request_rate and request_rate > 0):
        raise ValueError(f"arrival='poisson' needs request_rate > 0 (requests/s), got {request_rate!r}")
    # A separate stream, so the token content does not change with the arrival process.
    rng = np.random.default_rng([seed, 1])
    independent = [i for i, r in enumerate(reqs) if r.depends_on is None]
    times = np.cumsum(rng.exponential(1.0 / request_rate, len(independent)))
    times -= times[0] if len(times) else 0.0  # the first request arrives at t=0
    out = list(reqs)
    for i, t in zip(independent, times):
        out[i] = replace(reqs[i], arrival_time=float(t))
    return out


def _finish(name: str, reqs: list[RequestSpec], params: dict, arrival: str, request_rate, concurrency,
            seed: int) -> Workload:
    reqs = _arrivals(reqs, arrival, request_rate, seed)
    params = {**params, "arrival": arrival, "request_rate": request_rate, "concurrency": concurrency}
    return Workload(name, tuple(reqs), arrival, request_rate, concurrency, params)


def _tokens(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return rng.integers(0, vocab_size, int(n)).tolist()


def fixed(num_requests: int = 64, prompt_len: int = 128, output_len: int = 128, vocab_size: int = 32000,
          seed: int = 0, arrival: str = "offline", request_rate: float | None = None,
          concurrency: int | None = None) -> Workload:
    """Every request has the same prompt and output length (tokens); prompts are random and distinct."""
    rng = np.random.default_rng(seed)
    reqs = [RequestSpec(f"req-{i}", _tokens(rng, prompt_len, vocab_size), output_len) for i in range(num_requests)]
    return _finish("fixed", reqs, dict(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len,
                                        vocab_size=vocab_size, seed=seed), arrival, request_rate, concurrency, seed)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(X, lo, hi)] for X ~ LogNormal(mu, sigma)."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inside = math.exp(mu + sigma ** 2 / 2) * (_phi(b - sigma) - _phi(a - sigma))
    return lo * _phi(a) + inside + hi * (1.0 - _phi(b))


def _lognormal_mu(mean: float, sigma: float, lo: float, hi: float) -> float:
    """The mu whose clipped log-normal has the given mean (bisection; the clipped mean grows with mu)."""
    if not lo < mean < hi:
        raise ValueError(f"mean length {mean} must lie strictly between {lo} and {hi}")
    a, b = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(200):
        m = (a + b) / 2
        a, b = (m, b) if _clipped_lognormal_mean(m, sigma, lo, hi) < mean else (a, m)
    return (a + b) / 2


def sharegpt_like(num_requests: int = 200, mean_prompt_len: float = 161.0, mean_output_len: float = 338.0,
                  prompt_sigma: float = 1.0, output_sigma: float = 0.8, min_len: int = 4, max_len: int = 1024,
                  vocab_size: int = 32000, seed: int = 0, arrival: str = "offline",
                  request_rate: float | None = None, concurrency: int | None = None) -> Workload:
    """SYNTHETIC lengths shaped like ShareGPT; no ShareGPT text or data is used.

    Prompt and output lengths are drawn independently from log-normal distributions clipped to
    [min_len, max_len] tokens, with mu chosen so the clipped means are ``mean_prompt_len`` and
    ``mean_output_len`` (161 and 338 tokens: the ShareGPT averages the vLLM paper reports).
    For real lengths, write them to a JSONL file and use `load_workload`.
    """
    rng = np.random.default_rng(seed)
    mu_p = _lognormal_mu(mean_prompt_len, prompt_sigma, min_len, max_len)
    mu_o = _lognormal_mu(mean_output_len, output_sigma, min_len, max_len)
    plen = np.clip(np.rint(rng.lognormal(mu_p, prompt_sigma, num_requests)), min_len, max_len).astype(int)
    olen = np.clip(np.rint(rng.lognormal(mu_o, output_sigma, num_requests)), min_len, max_len).astype(int)
    reqs = [RequestSpec(f"req-{i}", _tokens(rng, p, vocab_size), int(o)) for i, (p, o) in enumerate(zip(plen, olen))]
    return _finish("sharegpt-like", reqs,
                   dict(num_requests=num_requests, mean_prompt_len=mean_prompt_len, mean_output_len=mean_output_len,
                        prompt_sigma=prompt_sigma, output_sigma=output_sigma, min_len=min_len, max_len=max_len,
                        vocab_size=vocab_size, seed=seed), arrival, request_rate, concurrency, seed)


def shared_prefix(num_requests: int = 64, num_prefixes: int = 4, prefix_len: int = 256, suffix_len: int = 32,
                  output_len: int = 64, vocab_size: int = 32000, seed: int = 0, arrival: str = "offline",
                  request_rate: float | None = None, concurrency: int | None = None) -> Workload:
    """``num_prefixes`` system prompts of ``prefix_len`` tokens, each shared by many requests.

    Request i uses system prompt i % num_prefixes followed by its own random ``suffix_len``-token
    question, and generates ``output_len`` tokens. The ideal token-level prefix-cache hit rate is about
    prefix_len / (prefix_len + suffix_len) once every system prompt has been seen (rounded down to
    whole blocks by the cache).
    """
    rng = np.random.default_rng(seed)
    prefixes = [_tokens(rng, prefix_len, vocab_size) for _ in range(num_prefixes)]
    reqs = [RequestSpec(f"req-{i}", prefixes[i % num_prefixes] + _tokens(rng, suffix_len, vocab_size), output_len)
            for i in range(num_requests)]
    return _finish("shared-prefix", reqs,
                   dict(num_requests=num_requests, num_prefixes=num_prefixes, prefix_len=prefix_len,
                        suffix_len=suffix_len, output_len=output_len, vocab_size=vocab_size, seed=seed),
                   arrival, request_rate, concurrency, seed)


def multi_turn(num_requests: int = 32, num_turns: int = 4, first_prompt_len: int = 128, turn_len: int = 32,
               output_len: int = 64, think_time: float = 0.0, vocab_size: int = 32000, seed: int = 0,
               arrival: str = "offline", request_rate: float | None = None,
               concurrency: int | None = None) -> Workload:
    """Chats of ``num_turns`` turns; each turn's prompt is the whole conversation so far.

    Turn k's prompt = turn k-1's prompt + a made-up answer of ``output_len`` tokens + a new user message
    of ``turn_len`` tokens (all ids seeded and random: the model's real answer is not fed back, so the
    cacheable prefix is turn k-1's prompt). Turn k is sent ``think_time`` seconds after turn k-1
    finished. ``num_requests`` is rounded up to whole conversations.
    """
    rng = np.random.default_rng(seed)
    num_conversations = max(1, math.ceil(num_requests / num_turns))
    reqs = []
    for c in range(num_conversations):
        history = _tokens(rng, first_prompt_len, vocab_size)
        parent = None
        for k in range(num_turns):
            rid = f"conv-{c}-turn-{k}"
            reqs.append(RequestSpec(rid, history, output_len, think_time if parent else 0.0, parent))
            history = history + _tokens(rng, output_len, vocab_size) + _tokens(rng, turn_len, vocab_size)
            parent = rid
    # Interleave conversations turn by turn, so the first turns of all chats come first in the trace.
    reqs.sort(key=lambda r: int(r.request_id.rsplit("-", 1)[1]))
    return _finish("multi-turn", reqs,
                   dict(num_requests=num_requests, num_turns=num_turns, first_prompt_len=first_prompt_len,
                        turn_len=turn_len, output_len=output_len, think_time=think_time,
                        vocab_size=vocab_size, seed=seed), arrival, request_rate, concurrency, seed)


WORKLOADS = {
    "fixed": fixed,
    "sharegpt-like": sharegpt_like,
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
}


def workload_defaults(name: str) -> dict:
    """The parameters of a built-in workload and their defaults."""
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r} is unknown: choose one of {sorted(WORKLOADS)} or a .jsonl file")
    return {k: p.default for k, p in inspect.signature(WORKLOADS[name]).parameters.items()}


def make_workload(name: str, **params) -> Workload:
    """A built-in workload by name (see WORKLOADS), or a JSONL trace by path.

    Unknown parameters raise ValueError naming the allowed ones.
    """
    if name.endswith(".jsonl") or os.sep in name:
        path = name if os.path.exists(name) or os.path.isabs(name) else os.path.join(WORKLOAD_DIR, name)
        arrival, rate = params.pop("arrival", None), params.pop("request_rate", None)
        conc = params.pop("concurrency", None)
        num = params.pop("num_requests", None)
        unknown = set(params) - {"vocab_size", "seed"}
        if unknown:
            raise ValueError(f"a workload file has no parameter {sorted(unknown)}: it takes num_requests, "
                             "vocab_size, seed, arrival, request_rate, concurrency")
        w = load_workload(path, **params)
        if num is not None:
            w = w.head(int(num))
        if arrival is not None or rate is not None or conc is not None:
            arrival = arrival or ("poisson" if rate else "concurrency" if conc else "offline")
            w = w.with_arrival(arrival, rate, conc, params.get("seed", 0))
        return w
    defaults = workload_defaults(name)
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"workload {name!r} has no parameter {sorted(unknown)}: it takes {sorted(defaults)}")
    return WORKLOADS[name](**params)


def resolve_workload(workload, num_requests: int | None = None, vocab_size: int | None = None, seed: int = 0,
                     params: dict | None = None) -> Workload:
    """A `Workload` from a built-in name or .jsonl path (built with ``params``, the seed, the vocabulary and
    ``num_requests``) or a `Workload` (cut to ``num_requests``). Raises ValueError when a token id is outside
    the model's vocabulary of ``vocab_size``."""
    if isinstance(workload, str):
        kwargs = dict(seed=seed)
        kwargs.update(params or {})
        if num_requests is not None:
            kwargs.update(num_requests=num_requests)
        if vocab_size and "vocab_size" not in kwargs:
            kwargs.update(vocab_size=vocab_size)
        workload = make_workload(workload, **kwargs)
    elif num_requests is not None:
        workload = workload.head(num_requests)
    if vocab_size and workload.max_token_id >= vocab_size:
        raise ValueError(f"workload {workload.name!r} has token id {workload.max_token_id}, outside the model's "
                         f"vocabulary of {vocab_size}: build it with vocab_size={vocab_size}")
    return workload
