"""The always-on step timeline: device time of each step without a synchronisation in the hot path,
and the per-request events (prefill chunks, preemptions, recomputed tokens) a trace is drawn from.

Host phases are perf_counter marks taken by LLMEngine.step and ModelRunner.execute; this module holds
what needs state across steps:

- DeviceTimer brackets each step's forward pass with a pair of CUDA events taken from a free list,
  and reads them back only once the device has passed them (`Event.query()`, which never blocks),
  writing device_start / device_time into the step's StepStats afterwards. `flush()` (called by
  `LLMEngine.stats()`, outside the hot path) waits for the rest. On the CPU the forward pass is
  synchronous, so its wall time is its device time and the span is resolved at once.
- RequestLog records, only for steps that prefill or preempt, which request ran which prompt chunk
  and how many of its tokens were computed before (recompute after a preemption).

With async scheduling (engine/async_step.py) a step's device span starts inside its own host window and ends
after it, while the host schedules the next step and processes this one's outputs: the overlap is visible as
device spans that cover the host phases of the next step, and device_gaps() measures what is left of the
device's idle time between steps.
"""
from __future__ import annotations

import math
import time
from collections import deque

import torch


class DeviceSpan:
    """One step's device work: a start and end CUDA event (or perf_counter marks on the CPU)."""

    __slots__ = ("start", "end", "host_start", "host_end")

    def __init__(self, start=None, end=None, host_start: float = math.nan, host_end: float = math.nan):
        self.start, self.end, self.host_start, self.host_end = start, end, host_start, host_end


class DeviceTimer:
    """Times device work per step with CUDA events, read back lazily.

    Invariants: every span in `pending` belongs to a StepStats not yet given its device time, in
    step order; an event is in `free` only once its span was resolved (so it is never re-recorded
    while the device may still have to reach it). Device times are seconds; device_start is on the
    host's perf_counter clock, anchored by one event recorded after a synchronisation at reset().
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.free: list = []
        self.pending: deque = deque()
        self.origin = None
        self.origin_host = 0.0
        self.enabled = True  # False: no events are recorded (device_time stays NaN), to measure what they cost

    def reset(self) -> None:
        """Forget pending spans (their steps are dropped with the stats) and re-anchor the device clock."""
        self.flush()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.origin = self._event()
            self.origin_host = time.perf_counter()
            self.origin.record()
            self.origin.synchronize()

    def _event(self):
        return self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)

    def begin(self) -> DeviceSpan | None:
        if not self.enabled:
            return None
        if not self.cuda:
            return DeviceSpan(host_start=time.perf_counter())
        span = DeviceSpan(self._event())
        span.start.record()
        return span

    def end(self, span: DeviceSpan | None) -> DeviceSpan | None:
        if span is None:
            return None
        if not self.cuda:
            span.host_end = time.perf_counter()
        else:
            span.end = self._event()
            span.end.record()
        return span

    def attach(self, step, span: DeviceSpan | None) -> None:
        """Give `step` (a StepStats) its device time now (CPU) or once the device has passed the span."""
        if span is None:
            return
        if not self.cuda:
            step.device_start, step.device_time = span.host_start, span.host_end - span.host_start
            return
        self.pending.append((step, span))
        pending = self.pending
        while pending and pending[0][1].end.query():
            self._resolve(*pending.popleft())

    def flush(self) -> None:
        """Resolve every pending span, waiting for the device if needed (not for the hot path)."""
        while self.pending:
            step, span = self.pending.popleft()
            span.end.synchronize()
            self._resolve(step, span)

    def _resolve(self, step, span: DeviceSpan) -> None:
        if self.origin is None:  # no anchor yet: times relative to the first step's start
            self.origin, self.origin_host = span.start, step.start
        step.device_start = self.origin_host + self.origin.elapsed_time(span.start) / 1e3
        step.device_time = span.start.elapsed_time(span.end) / 1e3
        self.free += (span.start, span.end)


class RequestLog:
    """Per-request events of steps that prefill or preempt: (step index, request_id, kind, tokens).

    kind is "prefill" (a prompt chunk of `tokens` tokens, recomputed ones included), "recompute"
    (of that chunk, the tokens that had been computed before a preemption) or "preempted".
    Invariants: high_water[rid] is the number of leading tokens a preempted request had computed,
    kept until its recompute has passed them; progress[rid] is how far a request mid-prefill got,
    dropped once its prefill is done, so both stay as small as the set of requests mid-prefill.
    """

    def __init__(self):
        self.events: list[tuple[int, str, str, int]] = []
        self.progress: dict[str, int] = {}
        self.high_water: dict[str, int] = {}

    def on_schedule(self, step: int, sched) -> int:
        """Record the step's preemptions and prefill chunks; returns the step's recomputed tokens.

        Call between Scheduler.schedule() and the forward pass (num_computed_tokens is still the
        chunk's start).
        """
        events, recomputed = self.events, 0
        for req in sched.preempted:
            rid = req.request_id
            done = len(req.all_token_ids) - 1 if req.output_token_ids else 0
            self.high_water[rid] = max(self.progress.pop(rid, 0), done, self.high_water.get(rid, 0))
            events.append((step, rid, "preempted", 0))
        if not sched.num_prefill_tokens and not self.high_water:
            return 0
        high_water = self.high_water
        for req, k in sched.scheduled:
            if k == 1 and not high_water and req.output_token_ids:
                continue  # a decode (the cheap test first: mixed steps hold hundreds of them)
            c = req.num_computed_tokens
            if c >= req.num_prompt_tokens and not high_water:
                continue  # a decode
            rid = req.request_id
            hw = self.high_water.get(rid)
            if hw is not None:
                redo = max(0, min(c + k, hw) - c)
                if redo:
                    recomputed += redo
                    events.append((step, rid, "recompute", redo))
                if c + k >= hw:
                    del self.high_water[rid]
            if c >= req.num_prompt_tokens and k == 1:
                continue
            events.append((step, rid, "prefill", k))
            if c + k < req.num_tokens:
                self.progress[rid] = c + k
            else:
                self.progress.pop(rid, None)
        return recomputed

    def forget(self, request_id: str) -> None:
        self.progress.pop(request_id, None)
        self.high_water.pop(request_id, None)


def device_gaps(steps) -> list[float]:
    """Seconds the device sat between the end of each step's forward pass and the start of the next one's (one
    value per step after the first; NaN where a device time is missing). The gap holds the previous step's sampling
    and whatever host work the device waited for: near zero when the host work is hidden (async scheduling)."""
    return [b.device_start - (a.device_start + a.device_time) for a, b in zip(steps, steps[1:])]
