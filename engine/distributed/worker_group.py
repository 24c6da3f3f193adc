"""WorkerGroup: the processes of ranks 1..W-1, the pipes rank 0 drives them through, and the process group.

Rank 0 is the calling process (the notebook kernel). The group owns torch.distributed's default process
group while it is open, so one tensor-parallel engine runs in a process at a time; starting a second
one closes the first (with a warning), as re-running a notebook cell that builds an LLM does.
"""
from __future__ import annotations

import datetime
import logging
import socket
import sys
import time
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .worker import apply_nccl_env, run_worker

log = logging.getLogger(__name__)

_open_group: "weakref.ref[WorkerGroup] | None" = None  # the group that owns the default process group
# A worker's start (interpreter, torch and engine imports, its shard allocated) may take long on a busy host;
# a worker that crashes meanwhile is seen at once, so this only bounds a start that hangs.
STARTUP_TIMEOUT_S = 300.0


class TensorParallelError(RuntimeError):
    """A rank died, failed, or did not answer in time; the message names it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _main_module_hidden():
    """Spawned children re-run the parent's __main__ (a script, or `python -m` module) unless they are
    not told of it. Workers need nothing from it (their code and arguments live in engine), and a
    script without an `if __name__ == "__main__":` guard would otherwise build a second LLM in each."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class WorkerGroup:
    """Ranks 1..W-1 as daemon processes (spawned), each with a duplex pipe to rank 0.

    Invariants: while `closed` is False every worker was alive at the last check and the default
    process group is this group's; after close() no worker process remains and the process group is
    destroyed. A failure (a dead rank, a worker's exception, a collective that timed out) is turned into
    a RuntimeError naming the rank, and the caller closes the group: it is out of step and not reused.
    """

    def __init__(self, spec, config, device: torch.device, dtype: torch.dtype, timeout_s: float):
        self.world_size = config.tensor_parallel_size
        self.timeout_s = timeout_s
        self.device = device
        self.closed = False
        self.workers: list[tuple[int, mp.Process, object]] = []  # (rank, process, pipe end)
        self._start(spec, config, dtype)

    # ----- start ----------------------------------------------------------------------------------
    def _start(self, spec, config, dtype) -> None:
        global _open_group
        if dist.is_initialized():
            previous = _open_group() if _open_group is not None else None
            if previous is None or previous.closed:
                raise RuntimeError("torch.distributed's default process group is already initialized in this "
                                   "process by other code; tensor_parallel_size > 1 needs it: call "
                                   "torch.distributed.destroy_process_group() first")
            log.warning("closing the tensor-parallel workers of an earlier engine: one tensor-parallel engine "
                        "runs in a process at a time")
            previous.close()
        cuda = self.device.type == "cuda"
        if cuda:
            apply_nccl_env()  # rank 0 is in the communicator too, and NCCL settings must agree
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, self.world_size):
                parent, child = ctx.Pipe()
                device = f"cuda:{rank}" if cuda else "cpu"
                proc = ctx.Process(target=run_worker, name=f"paged-workbench-tp-rank{rank}", daemon=True,
                                   args=(rank, self.world_size, init_method, spec, config, device, dtype,
                                         self.timeout_s, child))
                with _main_module_hidden():
                    proc.start()
                child.close()
                self.workers.append((rank, proc, parent))
            # Every shard allocated before the rendezvous, so that it cannot wait on a worker that crashed.
            self.collect("ready", max(self.timeout_s, STARTUP_TIMEOUT_S))
            _open_group = weakref.ref(self)
            dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=0,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=self.timeout_s))
        except BaseException:
            self.close()
            raise

    # ----- messages -------------------------------------------------------------------------------
    def send(self, message: tuple) -> None:
        for rank, proc, conn in self.workers:
            try:
                conn.send(message)
            except OSError as exc:  # BrokenPipeError: the worker is gone
                raise self.failure(exc) from exc

    def collect(self, expect: str = "ok", timeout_s: float | None = None) -> list:
        """Every worker's answer to the last command, rank order; waits at most timeout_s (default: the
        group's), watching liveness.

        A worker's ValueError is raised as a ValueError (a setting that does not fit, say), anything
        else as a RuntimeError naming the rank.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        answers = []
        for rank, proc, conn in self.workers:
            while not conn.poll(0.05):
                if not proc.is_alive():
                    raise self.failure()
                if time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel rank {rank} did not answer within {timeout_s:.0f} s "
                                       f"(pid {proc.pid}); the workers were stopped")
            try:
                kind, *payload = conn.recv()
            except (EOFError, OSError):
                raise self.failure() from None
            if kind == "error":
                name, message = payload
                if name == "ValueError":
                    raise ValueError(f"tensor-parallel rank {rank}: {message.splitlines()[0]}")
                raise TensorParallelError(f"tensor-parallel rank {rank} failed: {name}: {message}")
            if kind != expect:
                raise TensorParallelError(f"tensor-parallel rank {rank} answered {kind!r}, expected {expect!r}")
            answers.append(payload[0])
        return answers

    # ----- failures -------------------------------------------------------------------------------
    def check_alive(self) -> None:
        """Raise RuntimeError naming the ranks whose process has ended."""
        if any(not proc.is_alive() for _, proc, _ in self.workers):
            raise self.failure()

    def failure(self, cause: BaseException | None = None) -> TensorParallelError:
        """A RuntimeError saying which ranks died (exit code) or failed (their error), else what rank 0 saw."""
        problems = []
        for rank, proc, conn in self.workers:
            reported = None
            try:
                if conn.poll(0.2):
                    kind, *payload = conn.recv()
                    if kind == "error":
                        reported = f"{payload[0]}: {payload[1]}"
            except (EOFError, OSError):
                pass
            proc.join(0.2 if reported is None else 2.0)
            if reported is not None:
                problems.append(f"rank {rank} failed: {reported}")
            elif not proc.is_alive():
                problems.append(f"rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")
        if problems:
            what = "; ".join(problems)
        else:
            what = (f"a collective on rank 0 failed with every worker process alive (one is hung, or far slower "
                    f"than rank 0): {type(cause).__name__}: {cause}")
        return TensorParallelError(f"tensor parallelism failed: {what}. The engine's workers were stopped; "
                            "llm.reconfigure(config) (after aborting unfinished requests) starts new ones")

    # ----- shutdown -------------------------------------------------------------------------------
    def close(self, graceful: bool = True) -> None:
        """Stop every worker and tear the process group down. graceful: the workers are in step; they leave
        their loop and tear the group down together with rank 0 (NCCL's teardown waits for every rank),
        then exit; a worker that has not exited after a short wait gets SIGTERM, then SIGKILL. Else, after a
        failure (workers may be stuck in a collective, stopped, or dead), SIGKILL at once, and rank 0
        aborts its side of the group (on GPUs: a destroy would wait for the dead rank for ever)."""
        global _open_group
        if self.closed:
            return
        self.closed = True
        owner = _open_group is not None and _open_group() is self
        if owner:
            _open_group = None
        for _, proc, conn in self.workers:
            try:
                if graceful and proc.is_alive():
                    conn.send(("shutdown",))
            except OSError:
                pass
        if owner and graceful and dist.is_initialized():
            dist.destroy_process_group()
        for _, proc, conn in self.workers:
            if graceful:
                proc.join(5.0)
            if proc.is_alive() and graceful:
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():  # after a failure at once: SIGTERM would not end a stopped process
                proc.kill()
            proc.join()
            conn.close()
        if owner and dist.is_initialized():
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if self.device.type == "cuda" and abort is not None:
                abort()
            else:
                dist.destroy_process_group()  # gloo's teardown is local

    @property
    def processes(self) -> list:
        return [proc for _, proc, _ in self.workers]

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.processes]
