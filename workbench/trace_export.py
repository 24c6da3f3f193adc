"""A run as a Chrome trace-event JSON file (opens in Perfetto or chrome://tracing).

Tracks (trace-event format, times in microseconds from the run's start):
- process "engine": thread "steps" has one complete event ("X") per engine step with its host
  phases (schedule, prepare, launch, sample, output) nested inside it; thread "device" has the
  forward pass of each step as the device ran it; counters ("C") "KV cache" (usage, used blocks)
  and "batch" (running, waiting, batched tokens) at each step's end.
- process "requests": one nestable async track ("b"/"e", id = request id) per request: a
  "request" span from arrival to finish holding its phases in order, none overlapping:
  "queued", "prefill" (one per chunk, recomputed tokens in its args), "decode", "preempted".
- process "kernels" (only when deep mode ran): one thread per kernel class, a complete event per
  kernel, anchored at the device start of the first profiled step.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd

from .profiling import PHASES, step_kind

ENGINE_PID, REQUESTS_PID, KERNELS_PID = 1, 2, 3
STEPS_TID, DEVICE_TID = 1, 2


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _meta(pid, name) -> list[dict]:
    return [{"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}}]


def _thread(pid, tid, name) -> list[dict]:
    return [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}]


def _step_events(steps: pd.DataFrame, t0: float) -> list[dict]:
    ev = []
    kinds = step_kind(steps) if len(steps) else []
    for i, s in enumerate(steps.itertuples(index=False)):
        start = s.start - t0
        args = {"kind": kinds.iloc[i], "num_batched_tokens": int(s.num_batched_tokens),
                "num_prefill_tokens": int(s.num_prefill_tokens), "num_decode_tokens": int(s.num_decode_tokens),
                "num_padding_tokens": int(getattr(s, "num_padding_tokens", 0)),
                "num_recompute_tokens": int(getattr(s, "num_recompute_tokens", 0)),
                "num_preemptions": int(s.num_preemptions), "cuda_graph": bool(s.cuda_graph)}
        ev.append({"ph": "X", "pid": ENGINE_PID, "tid": STEPS_TID, "name": f"step {i}", "cat": "step",
                   "ts": _us(start), "dur": _us(s.duration), "args": args})
        t = start
        for p in PHASES:
            d = max(float(getattr(s, f"{p}_time", 0.0)), 0.0)
            d = min(d, start + s.duration - t)  # rounding must not push a phase past its step
            ev.append({"ph": "X", "pid": ENGINE_PID, "tid": STEPS_TID, "name": p, "cat": "phase",
                       "ts": _us(t), "dur": _us(d), "args": {}})
            t += d
        dev_start, dev_time = getattr(s, "device_start", math.nan), getattr(s, "device_time", math.nan)
        if math.isfinite(dev_start) and math.isfinite(dev_time):
            ev.append({"ph": "X", "pid": ENGINE_PID, "tid": DEVICE_TID, "name": f"forward {i}", "cat": "device",
                       "ts": _us(dev_start - t0), "dur": _us(dev_time), "args": {"kind": kinds.iloc[i]}})
        end = _us(s.time - t0)
        ev.append({"ph": "C", "pid": ENGINE_PID, "tid": 0, "name": "KV cache", "ts": end,
                   "args": {"kv_usage": float(s.kv_usage), "num_used_blocks": int(s.num_used_blocks)}})
        ev.append({"ph": "C", "pid": ENGINE_PID, "tid": 0, "name": "batch", "ts": end,
                   "args": {"num_running": int(s.num_running), "num_waiting": int(s.num_waiting),
                            "num_batched_tokens": int(s.num_batched_tokens)}})
    return ev


def request_phases(req, chunks: list, preemptions: list) -> list[tuple[str, float, float, dict]]:
    """The phases of one request in time order, none overlapping: (name, start, end, args), seconds.

    req: a request_frame row (arrival_time, first_token_time, finished_time); chunks: (start, end,
    tokens, recomputed) of its prefill chunks by step; preemptions: the start times of the steps that
    preempted it. Between chunks after its first token it decodes; after a preemption it waits until
    its next chunk.
    """
    if not chunks and not preemptions:
        return _phases_from_metrics(req)
    out, t = [], req.arrival_time
    marks = sorted([(s, 0, (s, e, n, r)) for s, e, n, r in chunks] + [(p, 1, None) for p in preemptions])
    first_token = req.first_token_time if math.isfinite(req.first_token_time) else math.inf
    preempted = False
    for when, is_preemption, chunk in marks:
        when = max(when, t)
        if is_preemption:
            if not preempted and when > t and first_token <= when:
                out.append(("decode", t, when, {}))
            t, preempted = when, True
            continue
        s, e, n, r = chunk
        gap = "queued" if not out else ("preempted" if preempted else ("decode" if first_token <= s else None))
        if gap and when > t:
            out.append((gap, t, when, {}))
        e = max(e, when)
        out.append(("prefill", when, e, {"tokens": int(n), "recomputed": int(r)}))
        t, preempted = e, False
    end = req.finished_time if math.isfinite(req.finished_time) else t
    if end > t:
        out.append(("preempted" if preempted else ("decode" if first_token <= end else "queued"), t, end, {}))
    return out


def _phases_from_metrics(req) -> list[tuple[str, float, float, dict]]:
    """Without request events (a sweep's saved frames, the timeline switched off): queued until first
    scheduled, prefill until the first token, decode until finished, from the request's own timestamps."""
    out, t = [], req.arrival_time
    for name, until in (("queued", getattr(req, "first_scheduled_time", math.nan)),
                        ("prefill", req.first_token_time), ("decode", req.finished_time)):
        if math.isfinite(until) and until > t:
            out.append((name, t, until, {}))
            t = until
    return out


def _request_events(steps: pd.DataFrame, requests: pd.DataFrame, request_events, t0: float) -> list[dict]:
    starts, ends = steps["start"].to_numpy(), steps["time"].to_numpy()
    chunks, redo, preempts = defaultdict(list), defaultdict(dict), defaultdict(list)
    for i, rid, kind, n in request_events:
        if kind == "recompute":
            redo[rid][i] = n
        elif kind == "preempted":
            preempts[rid].append(starts[i])
    for i, rid, kind, n in request_events:
        if kind == "prefill":
            chunks[rid].append((starts[i], ends[i], n, redo[rid].get(i, 0)))
    ev = []
    for req in requests.itertuples(index=False):
        rid = str(req.request_id)
        phases = request_phases(req, chunks.get(req.request_id, []), preempts.get(req.request_id, []))
        end = max([req.finished_time if math.isfinite(req.finished_time) else req.arrival_time]
                  + [e for _, _, e, _ in phases])
        common = {"pid": REQUESTS_PID, "tid": 0, "cat": "request", "id": rid}
        ev.append({**common, "ph": "b", "name": "request", "ts": _us(req.arrival_time - t0),
                   "args": {"request_id": rid, "num_prompt_tokens": int(req.num_prompt_tokens),
                            "num_output_tokens": int(req.num_output_tokens)}})
        for name, s, e, args in phases:
            ev.append({**common, "ph": "b", "name": name, "ts": _us(s - t0), "args": args})
            ev.append({**common, "ph": "e", "name": name, "ts": _us(e - t0), "args": {}})
        ev.append({**common, "ph": "e", "name": "request", "ts": _us(end - t0), "args": {}})
    return ev


def _kernel_events(profile, steps: pd.DataFrame, t0: float) -> list[dict]:
    from engine.profiling import KERNEL_CLASSES

    if profile is None or not profile.kernels or profile.first_step >= len(steps):
        return []
    first = steps.iloc[profile.first_step]
    anchor = getattr(first, "device_start", math.nan)
    anchor = (anchor if math.isfinite(anchor) else first["start"]) - t0
    classes = list(KERNEL_CLASSES)
    ev = _meta(KERNELS_PID, f"kernels ({profile.device}), steps {profile.first_step}-{profile.last_step}")
    for c in classes:
        ev += _thread(KERNELS_PID, classes.index(c) + 1, c)
    for name, cls, start, dur, _ in profile.kernels:
        ev.append({"ph": "X", "pid": KERNELS_PID, "tid": classes.index(cls) + 1, "name": name, "cat": cls,
                   "ts": _us(anchor + start), "dur": _us(dur), "args": {}})
    return ev


def chrome_trace(steps: pd.DataFrame, requests: pd.DataFrame, request_events=(), kernel_profile=None,
                 t0: float | None = None) -> dict:
    """The trace-event dict of one run: steps (`metrics.steps_frame`), requests (`metrics.request_frame`),
    request_events and kernel_profile from `EngineStats`; t0 (perf_counter seconds) is time zero
    (default: the earliest arrival or step start)."""
    if t0 is None:
        candidates = list(requests["arrival_time"]) + (list(steps["start"]) if len(steps) else [])
        t0 = min(candidates) if candidates else 0.0
    ev = (_meta(ENGINE_PID, "engine") + _thread(ENGINE_PID, STEPS_TID, "steps (host phases)")
          + _thread(ENGINE_PID, DEVICE_TID, "device (forward pass)") + _meta(REQUESTS_PID, "requests"))
    if len(steps):
        ev += _step_events(steps, t0)
        ev += _request_events(steps, requests, request_events, t0)
    ev += _kernel_events(kernel_profile, steps, t0)
    return {"traceEvents": ev, "displayTimeUnit": "ms", "otherData": {"t0_perf_counter_s": t0}}


def write_chrome_trace(path, steps: pd.DataFrame, requests: pd.DataFrame, request_events=(), kernel_profile=None,
                       t0: float | None = None) -> Path:
    """Write `chrome_trace(...)` as JSON to path; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(steps, requests, request_events, kernel_profile, t0)))
    return path


def write_sweep_traces(sweep, folder) -> dict:
    """One trace per point of a finished `Sweep` that ran in this process, from the frames it keeps (steps,
    requests; no prefill chunks or kernels): {label: path}, files named <point_id>.trace.json."""
    folder = Path(folder)
    written = {}
    if not len(sweep.results):
        return written
    for row in sweep.results.itertuples(index=False):
        steps, requests = sweep.timeseries.get(row.point_id), sweep.requests.get(row.point_id)
        if steps is None or requests is None or not len(steps):
            continue
        written[row.label] = str(write_chrome_trace(folder / f"{row.point_id}.trace.json",
                                                    steps.sort_values("start"), requests))
    return written
