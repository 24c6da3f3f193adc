"""Where a sweep's points run: one after another in this process, or spread over Ray actors.

An executor takes the points still to run, a picklable ``make_runner`` (called once per worker; it
returns ``run(point) -> result``, keeping its model loaded between points, the warm-weights path of a
sequential sweep) and ``on_result(point, result)``, which the driver calls for every finished point in
completion order; ``skip(point)``, asked just before a point would start, drops it (a sweep skips the
later repeats of a point that failed). The driver alone writes results, so the results store keeps its
single writer.

`RayExecutor` starts one actor per group of ``tensor_parallel_size`` GPUs (one per CPU slot without
GPUs), hands each idle actor the next point, and streams results back as they finish. A point whose
actor dies (out of host memory, a CUDA error that kills the process, a segfault) is reported through
``on_error`` and the actor is replaced; the other points go on. Ctrl-C kills the actors and re-raises,
so the caller can say how many points were saved and how to resume.
"""
from __future__ import annotations

import logging
import os
import re
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

Runner = Callable[[Any], Any]


class SequentialExecutor:
    """Runs every point in this process, in order, on one runner."""

    name = "sequential"

    def map(self, points: Sequence, make_runner: Callable[[], Runner], on_result: Callable[[Any, Any], None],
            on_error: Callable[[Any, str], None], tensor_parallel_size: Callable[[Any], int] = lambda p: 1,
            skip: Callable[[Any], bool] | None = None) -> None:
        run = None
        for point in points:
            if skip is not None and skip(point):
                continue
            run = run or make_runner()
            on_result(point, run(point))


class _Worker:
    """The body of a Ray actor: one runner, built on the first point, kept for the next ones."""

    def __init__(self, make_runner: Callable[[], Runner]):
        self._make_runner, self._run = make_runner, None

    def run(self, point):
        if self._run is None:
            self._run = self._make_runner()
        return self._run(point)

    def close(self) -> None:
        """Drop the runner and collect it now: a tensor-parallel engine stops its worker processes cleanly
        (a killed actor would leave them to notice their closed pipe)."""
        import gc

        self._run = None
        gc.collect()


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ValueError('executor="ray" needs Ray: pip install -e ".[ray]" (or pip install ray)') from e
    return ray


class RayExecutor:
    """Spreads points over Ray actors, one per ``tensor_parallel_size`` GPUs (or per CPU slot).

    address: None starts Ray on this machine (its GPUs and CPUs); "auto" or "ray://host:10001" joins a
    running cluster. num_workers: the number of actors per tensor-parallel size (default: as many as
    the cluster's GPUs allow, or its CPUs divided by ``cpus_per_worker`` on a machine without GPUs).
    Invariant: at most one point is in flight per actor; every point handed out ends in exactly one
    ``on_result`` or ``on_error`` call, also when its actor dies.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, cpus_per_worker: float = 1.0,
                 runtime_env: dict | None = None):
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"num_workers={num_workers!r}: give a positive int, or None for one per GPU group")
        if cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={cpus_per_worker!r}: must be > 0")
        self.address, self.num_workers, self.cpus_per_worker = address, num_workers, cpus_per_worker
        self.runtime_env = runtime_env

    def _init(self):
        ray = _ray()
        started = not ray.is_initialized()
        if started:
            # Workers import this checkout's packages, not whatever an installed copy says; NVLink multicast
            # off in every process (see the device notes: it can hang shared hosts).
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
                   "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
            opts = dict(log_to_driver=False, include_dashboard=False, ignore_reinit_error=True,
                        configure_logging=False)
            if self.address is None:
                # A local Ray inherits this process's environment (raylet, then every worker), so the
                # variables need no runtime_env (which a minimal Ray install may not be able to set up).
                # The GPU count is torch's, not Ray's detection (which a trimmed Ray may lack: it would
                # then see none and start one actor per CPU, each on the same GPU).
                with _environ(env):
                    ray.init(num_gpus=_visible_gpus(), runtime_env=self.runtime_env, **opts)
            else:
                runtime_env = dict(self.runtime_env or {})
                runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
                ray.init(address=self.address, runtime_env=runtime_env, **opts)
        return ray, started

    def _slots(self, ray, tp: int) -> tuple[int, dict]:
        """(number of actors, resources of one) for points of tensor-parallel size ``tp``."""
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if gpus:
            if tp > gpus:
                raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; the Ray cluster has {gpus}")
            n = gpus // tp
            opts = {"num_gpus": tp, "num_cpus": min(self.cpus_per_worker, res.get("CPU", 1) / max(n, 1))}
        else:
            n = max(1, int(res.get("CPU", 1) // self.cpus_per_worker))
            opts = {"num_cpus": self.cpus_per_worker}
        return (min(n, self.num_workers) if self.num_workers else n), opts

    def map(self, points: Sequence, make_runner: Callable[[], Runner], on_result: Callable[[Any, Any], None],
            on_error: Callable[[Any, str], None], tensor_parallel_size: Callable[[Any], int] = lambda p: 1,
            skip: Callable[[Any], bool] | None = None) -> None:
        if not points:
            return
        ray, started = self._init()
        try:
            by_tp: dict[int, list] = {}
            for p in points:
                by_tp.setdefault(int(tensor_parallel_size(p)), []).append(p)
            for tp, group in by_tp.items():
                self._map_group(ray, tp, group, make_runner, on_result, on_error, skip)
        finally:
            if started:
                ray.shutdown()

    def _map_group(self, ray, tp, points, make_runner, on_result, on_error, skip) -> None:
        n, opts = self._slots(ray, tp)
        actor_cls = ray.remote(max_restarts=0, max_concurrency=1, **opts)(_Worker)
        queue = deque(points)
        alive = [actor_cls.remote(make_runner) for _ in range(min(n, len(points)))]
        in_flight: dict = {}  # ObjectRef -> (actor, point)

        def submit(actor):
            while queue:
                point = queue.popleft()
                if skip is None or not skip(point):
                    in_flight[actor.run.remote(point)] = (actor, point)
                    return

        try:
            for actor in list(alive):
                submit(actor)
            while in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                ref = done[0]
                actor, point = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    on_error(point, f"worker died: {_first_line(e)}")
                    alive.remove(actor)
                    ray.kill(actor, no_restart=True)
                    if queue:  # a fresh actor for the points still queued
                        actor = actor_cls.remote(make_runner)
                        alive.append(actor)
                except ray.exceptions.RayTaskError as e:  # the runner raised: a result of its own
                    on_error(point, _first_line(e.cause if getattr(e, "cause", None) else e))
                else:
                    on_result(point, result)
                submit(actor)
            try:  # every point done: let the actors release their models before they are killed
                ray.get([actor.close.remote() for actor in alive], timeout=60)
            except Exception:  # noqa: BLE001 - killed below in any case
                pass
        finally:
            for actor in alive:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead
                    pass


def _visible_gpus() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applied); 0 without torch or CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the engine needs torch anyway
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextmanager
def _environ(values: dict):
    """os.environ with ``values`` set inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}").strip()
    return text.splitlines()[0] if text else type(e).__name__


def make_executor(executor, address: str | None = None, num_workers: int | None = None):
    """An executor from a name ("sequential" | "ray") or an executor object (returned as is)."""
    if executor is None or executor == "sequential":
        return SequentialExecutor()
    if executor == "ray":
        return RayExecutor(address=address, num_workers=num_workers)
    if hasattr(executor, "map"):
        return executor
    raise ValueError(f"executor={executor!r}: use 'sequential' or 'ray'")
