"""AsyncEngine: the LLMEngine's step loop on its own thread, beside the server's asyncio event loop.

The model's forward pass releases the GIL while the device (or torch's CPU kernels) works, so the
event loop keeps parsing requests and writing tokens to sockets while a step runs.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """New output of one sequence of an engine request: the token ids since the previous Delta of it.

    index: the sequence (choice) of the request: 0, or 0..n-1 for SamplingParams(n) (parallel sampling: one
    engine request whose n sequences share the prompt's KV blocks). finished: this is the sequence's last
    Delta; finish_reason is "stop" | "length" | "abort" | "error" (then ``error`` says why); ``output`` is the
    engine's final RequestOutput once the whole request finished (None before, and on error).
    """

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    output: object = None
    error: str | None = None
    index: int = 0


@dataclass
class _Stream:
    queue: asyncio.Queue
    n: int = 1                                     # sequences (choices) the request returns
    sent: dict = field(default_factory=dict)       # index -> output tokens already delivered
    done: set = field(default_factory=set)         # indices whose finished Delta was delivered


def _sequences(req) -> list[tuple[int, object]]:
    """(index, sequence) of an engine request whose tokens stream as they come: the request itself, or the
    sequences of a parallel-sampling group by index (beams stream nothing: the search picks them at the end)."""
    if not hasattr(req, "seqs"):
        return [(0, req)]
    if req.state is not None:
        return []
    return sorted(((int(s.request_id.rsplit("#", 1)[1]), s) for s in req.finished + req.seqs), key=lambda x: x[0])


def _final_deltas(rid: str, st: _Stream, out, reason: str | None = None, error: str | None = None) -> list[Delta]:
    """The finished Delta of every sequence of ``rid`` not yet finished: its tokens not yet sent, and its own
    finish reason (``reason`` overrides it: "abort", "error"). ``out``: the request's RequestOutput, or None."""
    completions = {c.index: c for c in (out.outputs if out is not None else [])}
    deltas = []
    for i in range(st.n):
        if i in st.done:
            continue
        c = completions.get(i)
        ids = list(c.token_ids[st.sent.get(i, 0):]) if c is not None else []
        why = reason or (c.finish_reason if c is not None and c.finish_reason else
                         out.finish_reason if out is not None else None)
        deltas.append(Delta(rid, ids, True, why, out, error, index=i))
    return deltas


@dataclass
class _State:
    streams: dict[str, _Stream] = field(default_factory=dict)


class AsyncEngine:
    """Runs ``engine`` (an LLMEngine) on a thread and streams each request's tokens to the event loop.

    Invariants:
    - After start(), only the engine thread touches the LLMEngine. The event loop sends it commands
      (add, abort, stats) through a queue, run between two steps; results come back through
      ``loop.call_soon_threadsafe``, one batch per step.
    - Every sequence (index) of a request accepted by add() gets exactly one Delta with finished=True,
      whether it finished, was aborted (abort(): the request's KV blocks are freed before the next step)
      or a step raised (then every request in flight is aborted and told why): no stream is left hanging.
      A sequence of a parallel-sampling request that finishes before the others gets its finished Delta
      then (output None); the request's RequestOutput comes with the last ones.
    - ``metrics`` (a ServerMetrics) sees every step's StepStats and every finished request, so its
      counters are the engine's own.
    """

    def __init__(self, engine, metrics=None, switch_interval: float | None = 0.001):
        self.engine, self.metrics = engine, metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # set when the engine thread died
        # A shorter GIL switch interval than the default 5 ms: the engine thread, back from a device
        # wait, gets the GIL from the busy event loop sooner (fewer ms lost per step).
        if switch_interval is not None:
            sys.setswitchinterval(switch_interval)

    # ----- event-loop side ----------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def _call(self, fn):
        """Run fn() on the engine thread between two steps; its result (or exception) comes back here."""
        if not self.alive:
            raise RuntimeError(f"the engine loop is not running ({self.error!r})")
        fut = self._loop.create_future()

        def command():
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._loop.call_soon_threadsafe(_settle, fut, None, e)
            else:
                self._loop.call_soon_threadsafe(_settle, fut, result, None)

        self._commands.put(command)
        return await fut

    async def add(self, request_ids: list[str], prompts: list[list[int]], params: list,
                  arrival_time: float | None = None) -> asyncio.Queue:
        """Add requests (all or none: a ValueError from the engine adds nothing and is raised here).

        Returns the queue that receives their Deltas, in the order the engine produced them.
        """
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        q: asyncio.Queue = asyncio.Queue()

        def add():
            eng = self.engine
            for rid, prompt, sp in zip(request_ids, prompts, params):
                eng.validate_request(rid, prompt, sp)
            for rid, prompt, sp in zip(request_ids, prompts, params):
                eng.add_request(rid, prompt, sp, arrival_time=arrival)
                self._state.streams[rid] = _Stream(q, getattr(sp, "n", None) or getattr(sp, "beam_width", 1))

        await self._call(add)
        return q

    def abort(self, request_ids) -> None:
        """Abort requests (those already finished are skipped); callable from any thread, returns at once."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._commands.put(lambda: self._abort(ids))

    async def stats(self):
        """The engine's EngineStats, read between two steps."""
        return await self._call(self.engine.stats)

    async def run_on_engine(self, fn):
        """fn(engine) on the engine thread between two steps (for tests and tools)."""
        return await self._call(lambda: fn(self.engine))

    # ----- engine-thread side -------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stopping:
                busy = eng.has_unfinished_requests()
                try:
                    cmd = self._commands.get(block=not busy, timeout=None if busy else 0.5)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    cmd()
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if eng.has_unfinished_requests() and not self._stopping:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - recorded; /health reports it
            self.error = e
            log.exception("the engine loop died")
            self._fail_all(f"the engine loop died: {type(e).__name__}: {e}")
        finally:
            if self._stopping:
                self._fail_all("the server is shutting down")

    def _step(self) -> None:
        eng, streams = self.engine, self._state.streams
        try:
            finished = eng.step()
        except Exception as e:  # noqa: BLE001 - one bad step fails the requests in it, not the server
            log.exception("an engine step failed; aborting the requests in flight")
            self._fail_all(f"an engine step failed: {type(e).__name__}: {e}")
            return
        batch = []
        for out in finished:
            st = streams.pop(out.request_id, None)
            if st is None:
                continue  # not ours (added by someone else on this thread)
            batch += [(st.queue, d) for d in _final_deltas(out.request_id, st, out)]
            if self.metrics is not None:
                self.metrics.on_finished(out)
        for rid, st in streams.items():
            req = eng.requests.get(rid)
            for i, seq in (_sequences(req) if req is not None else []):
                if i in st.done:
                    continue
                sent = st.sent.get(i, 0)
                new = seq.output_token_ids[sent:]
                # a sequence of a group that finished before its siblings (a stop token) ends its stream now
                over = req is not seq and seq.status.finished
                if new or over:
                    st.sent[i] = sent + len(new)
                    if over:
                        st.done.add(i)
                    batch.append((st.queue, Delta(rid, list(new), over, seq.status.value if over else None,
                                                  index=i)))
        if self.metrics is not None:
            self.metrics.on_step(eng.last_step_stats())
        if batch:
            self._loop.call_soon_threadsafe(_deliver, batch)

    def _abort(self, ids: list[str]) -> None:
        batch = []
        for rid in ids:
            st = self._state.streams.pop(rid, None)
            if st is None:
                continue
            out = self.engine.abort_request(rid)
            batch += [(st.queue, d) for d in _final_deltas(rid, st, out, "abort")]
        if batch:
            self._update_queue_gauges()
            self._loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, reason: str) -> None:
        batch = []
        for rid, st in list(self._state.streams.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - keep failing the others
                log.exception("abort of %s failed", rid)
            batch += [(st.queue, d) for d in _final_deltas(rid, st, None, "error", reason)]
        self._state.streams.clear()
        if batch and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, batch)

    def _update_queue_gauges(self) -> None:
        if self.metrics is None:
            return
        eng = self.engine
        sched, kv = eng.scheduler, eng.kv
        self.metrics.set_queue_state(len(sched.running), len(sched.waiting), kv.num_used_blocks / kv.num_blocks)


def _deliver(batch) -> None:
    for q, delta in batch:
        q.put_nowait(delta)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
