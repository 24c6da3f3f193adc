"""Replaying a workload through the engine's step API: arrivals, closed-loop concurrency, follow-up turns.

`replay` adds each request when its arrival time comes (offline: all at once; Poisson: at its offset;
concurrency: as earlier ones finish; multi-turn: a think time after the turn it depends on), steps
the engine until every request finished, and returns the finished outputs and the wall time.
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import defaultdict
from typing import Callable, NamedTuple

from .schema import C
from .workloads import Workload


def request_params(sampling: dict | None, max_tokens: int):
    """The params of one replayed request of ``max_tokens`` output tokens: greedy SamplingParams with
    ignore_eos, ``sampling`` overriding other fields (``n``: parallel sampling); with ``beam_width`` set (not
    None), BeamSearchParams(beam_width, max_tokens, ignore_eos=True, length_penalty) instead, which takes
    no other sampling field. Raises ValueError naming a bad field (the engine's own checks)."""
    from engine import BeamSearchParams, SamplingParams

    overrides = dict(sampling or {})
    beam_width = overrides.pop(C.beam_width, None)
    if beam_width is None:
        try:
            return SamplingParams(**{"temperature": 0.0, "ignore_eos": True, **overrides, "max_tokens": max_tokens})
        except TypeError:  # a field SamplingParams does not have
            unknown = sorted(set(overrides) - set(SamplingParams.__dataclass_fields__))
            raise ValueError(f"sampling {unknown} is not a SamplingParams field (use "
                             f"{', '.join(SamplingParams.__dataclass_fields__)}, or beam_width)") from None
    if overrides.get(C.n, 1) != 1:
        raise ValueError(f"n={overrides[C.n]!r} with beam_width={beam_width!r}: beam search returns beam_width "
                         "completions; use n=1 (or beam_width=None for parallel sampling)")
    overrides.pop(C.n, None)
    other = sorted(set(overrides) - set(BEAM_FIELDS))
    if other:
        raise ValueError(f"sampling {other} does not apply to beam search (beam_width={beam_width!r}), which "
                         f"takes only {list(BEAM_FIELDS)}; drop them or set beam_width=None")
    return BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens,
                            **{"ignore_eos": True, **overrides})


BEAM_FIELDS = ("ignore_eos", "length_penalty")  # the sampling fields a beam-search point takes


class ReplayResult(NamedTuple):
    outputs: list        # the final RequestOutput of every request, in finishing order
    start: float         # perf_counter() when the run started (seconds)
    duration: float      # seconds from start to the last request finishing


def replay(engine, workload: Workload, sampling: dict | None = None, max_duration: float | None = None,
           on_step: Callable | None = None) -> ReplayResult:
    """Send the workload's requests to ``engine`` at their arrival times and step until all finish.

    Offline / Poisson: a request is added once its arrival offset has passed, with arrival_time set to
    the scheduled time (so a long step that delays it counts against TTFT, as in a server's queue).
    Concurrency: ``workload.concurrency`` requests are kept in flight. A request with ``depends_on``
    becomes due its think time after that request finished. Each request's params are
    `request_params(sampling, its max_tokens)`: greedy with ignore_eos unless ``sampling`` overrides it;
    ``n`` runs every request as n parallel samples, ``beam_width`` as a beam search.

    A beam-search request is timed as any request: it is added at its arrival through the engine's step
    API (the path `LLM.beam_search` takes) and its beams run as sequences of the same batches; its first
    token is the step that gave its beams their first token, it finishes when the search ends (with
    ignore_eos, when the beams reach max_tokens), and its output tokens are those of the beam_width beams it
    returns (as n completions count n times).
    Raises TimeoutError after ``max_duration`` seconds (the unfinished requests are aborted).
    """
    overrides = dict(sampling or {})
    request_params(overrides, 1)  # a bad field is refused before any request is sent
    closed = workload.arrival == "concurrency"
    children, due = defaultdict(list), []
    for i, r in enumerate(workload):
        if r.depends_on:
            children[r.depends_on].append(r)
        else:
            due.append((0.0 if closed else r.arrival_time, i, r))
    heapq.heapify(due)
    seq = itertools.count(len(workload))
    finished, in_flight = {}, set()
    start = time.perf_counter()
    try:
        while len(finished) < len(workload):
            now = time.perf_counter() - start
            if max_duration is not None and now > max_duration:
                raise TimeoutError(f"the run took over max_duration={max_duration}s with "
                                   f"{len(workload) - len(finished)} requests unfinished")
            while due and due[0][0] <= now and (not closed or len(in_flight) < workload.concurrency):
                t_due, _, r = heapq.heappop(due)
                params = request_params(overrides, r.max_tokens)
                engine.add_request(r.request_id, list(r.prompt_token_ids), params,
                                   arrival_time=time.perf_counter() if closed else start + t_due)
                in_flight.add(r.request_id)
            if engine.has_unfinished_requests():
                for out in engine.step():  # the requests that finished in this step
                    finished[out.request_id] = out
                    in_flight.discard(out.request_id)
                    t_fin = getattr(out.metrics, "finished_time", None) or time.perf_counter()
                    for c in children.pop(out.request_id, []):
                        heapq.heappush(due, (t_fin - start + c.arrival_time, next(seq), c))
                if on_step is not None:
                    on_step()
            elif due:
                time.sleep(min(max(due[0][0] - (time.perf_counter() - start), 0.0), 0.05))
            else:
                raise RuntimeError(f"the engine is idle but {len(workload) - len(finished)} requests never finished")
    except BaseException:
        # Leave the engine empty (reconfigure refuses to drop unfinished requests), then re-raise.
        for rid in in_flight:
            engine.abort_request(rid)
        raise
    end = max((o.metrics.finished_time for o in finished.values() if o.metrics.finished_time), default=None)
    duration = (end if end is not None else time.perf_counter()) - start
    return ReplayResult(list(finished.values()), start, duration)


def warm_up(engine, config, num_requests: int = 4, prompt_len: int = 32, max_tokens: int = 4) -> None:
    """Short requests through prefill, mixed and decode steps (kernels compiled, allocator warm); then
    reset_stats().

    The requests join in waves of 1, 1 and the rest, one step apart, so that prefills also run behind 1
    and 2 decodes of the same step. Triton compiles a kernel once for each 16-byte alignment of its
    pointer arguments, and a mixed step's prefill inputs start after its decodes' (behind 1 decode the
    int64 and int32 arrays are unaligned, behind 2 the int32 ones): each variant is compiled here rather
    than in the first measured step that needs it (a stall of about a second on an H100).
    """
    from engine import SamplingParams

    prompt_len = max(1, min(prompt_len, config.max_model_len - max_tokens))
    max_tokens = max(3, min(max_tokens, config.max_model_len - prompt_len))  # the first wave decodes twice more
    n = max(1, min(num_requests, config.max_num_seqs or engine.config.max_num_seqs))  # None: the engine's pick
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    waves = [1, 1, n - 2] if n > 2 else [1] * n
    added = 0
    try:
        for size in waves:
            for _ in range(size):
                # Distinct made-up prompts (ids < 503, inside any vocabulary), so they share no cached prefix.
                engine.add_request(f"warmup-{added}", [(7 * added + j) % 500 + 3 for j in range(prompt_len)], params)
                added += 1
            engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    except BaseException:
        for i in range(added):
            engine.abort_request(f"warmup-{i}")
        raise
    engine.reset_stats()
