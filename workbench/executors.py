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
import math
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
    """The body of a Ray actor: one runner, built on creation, kept for the next points.

    Created with its first point, it builds the runner at once and, when the runner has ``prepare(point)``
    (`PointWorker`: imports, CUDA context, weights for that point's config, the device's rates), prepares
    it in the constructor, so that the process is warm when the point's call arrives. A point runs under
    the conditions of a sequential run from the driver: ``num_threads``, the actor's share of the driver's
    torch intra-op threads (see `RayExecutor`), replaces the OMP_NUM_THREADS=1 that Ray gives an actor of one
    CPU (the engine's host work has CPU torch ops), and ``nice``, the driver's niceness, the 15 Ray's raylet
    gives its workers (where this process may raise its priority; a local Ray started by `RayExecutor` starts
    them at it). A prepare that raises leaves the point to load and fail by itself.
    """

    def __init__(self, make_runner: Callable[[], Runner], first_point=None, num_threads: int | None = None,
                 nice: int | None = None):
        import socket
        import time

        t0 = time.perf_counter()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "num_threads": _use_threads(num_threads),
                     "nice": _use_niceness(nice), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                     "points": []}
        self._make_runner, self._run = make_runner, None
        if first_point is not None:
            self._run = make_runner()
            prepare = getattr(self._run, "prepare", None)
            if prepare is not None:
                try:
                    prepare(first_point)
                except Exception:  # noqa: BLE001 - the point meets the error again and records it
                    log.exception("preparing the first point failed; it loads when it runs")
        self.info["init_s"], self.info["ready_at"] = time.perf_counter() - t0, time.time()

    def run(self, point):
        if self._run is None:
            self._run = self._make_runner()
        item = point[0] if isinstance(point, tuple) else point
        try:  # a sweep's point: which GPU ran which point
            self.info["points"].append(item.label)
        except AttributeError:
            self.info["points"].append(None)
        return self._run(point)

    def describe(self) -> dict:
        """pid, host, torch threads, niceness, CUDA_VISIBLE_DEVICES, the labels of the points run so far and
        the seconds the constructor took (runner built and first point prepared)."""
        return {**self.info, "points": list(self.info["points"])}

    def close(self) -> None:
        """Drop the runner and collect it now: a tensor-parallel engine stops its worker processes cleanly
        (a killed actor would leave them to notice their closed pipe)."""
        import gc

        self._run = None
        gc.collect()


def _use_threads(num_threads: int | None) -> int | None:
    """Set this process's torch intra-op threads (and OMP_NUM_THREADS, for the processes it starts, such as
    tensor-parallel workers) to ``num_threads``, at most the CPUs it may use; returns the count now in use."""
    if num_threads is None:
        return None
    try:
        n = max(1, min(int(num_threads), len(os.sched_getaffinity(0))))
    except AttributeError:  # pragma: no cover - no sched_getaffinity (macOS)
        n = max(1, min(int(num_threads), os.cpu_count() or 1))
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def _use_niceness(nice: int | None) -> int:
    """Lower this process's niceness (raise its priority) to ``nice`` where allowed (root, CAP_SYS_NICE);
    returns the niceness now. On Linux it applies to the calling thread and the threads it starts later."""
    if nice is not None and os.nice(0) > nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except (OSError, AttributeError):  # not permitted: the point runs at Ray's niceness, which describe() says
            pass
    return os.nice(0)


def _driver_threads() -> int | None:
    """The torch intra-op threads of this process (what a sequential sweep here runs with)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the engine needs torch anyway
        return None
    return torch.get_num_threads()


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
    num_threads: torch intra-op threads of every actor (default: this process's shared among the actors that
    run side by side, so that a point's host work gets the cores a sequential sweep started here would, and
    the actors do not oversubscribe them: two actors of two threads each on two cores ran a CPU sweep 2.6x
    slower than at one thread each, since OpenMP threads spin-wait for a busy core; Ray alone would give an
    actor of one CPU a single thread); the actors also take this process's niceness (Ray's workers run at
    15), see `_Worker`.
    Each actor is created with its first point and loads the model for it in its constructor (see
    `_Worker`); ``timings`` says, after map(), how long ray.init and each actor's start took.
    Invariant: at most one point is in flight per actor; every point handed out ends in exactly one
    ``on_result`` or ``on_error`` call, also when its actor dies.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, cpus_per_worker: float = 1.0,
                 runtime_env: dict | None = None, num_threads: int | None = None):
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"num_workers={num_workers!r}: give a positive int, or None for one per GPU group")
        if cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={cpus_per_worker!r}: must be > 0")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads={num_threads!r}: give a positive int, or None for this process's count")
        self.address, self.num_workers, self.cpus_per_worker = address, num_workers, cpus_per_worker
        self.runtime_env, self.num_threads = runtime_env, num_threads
        self.timings: dict = {}  # of the last map(): ray_init_s, and per actor what _record_actors says

    def _init(self):
        import time

        t0 = time.perf_counter()
        ray = _ray()
        started = not ray.is_initialized()
        if started:
            # Workers import this checkout's packages, not whatever an installed copy says; NVLink multicast
            # off in every process (see the device notes: it can hang shared hosts).
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
                   "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
            # The raylet starts its workers at niceness 15 by default; a local one starts them at this
            # process's, so that the actors' points get the CPU a sequential sweep's would.
            local = {"RAY_worker_niceness": str(os.nice(0))}
            threads = self.num_threads if self.num_threads is not None else _driver_threads()
            if threads is not None:  # else Ray sets 1 before the actors import torch and numpy (see _Worker)
                local["OMP_NUM_THREADS"] = str(threads)
            opts = dict(log_to_driver=False, include_dashboard=False, ignore_reinit_error=True,
                        configure_logging=False)
            if self.address is None:
                # A local Ray inherits this process's environment (raylet, then every worker), so the
                # variables need no runtime_env (which a minimal Ray install may not be able to set up).
                # The GPU count is torch's, not Ray's detection (which a trimmed Ray may lack: it would
                # then see none and start one actor per CPU, each on the same GPU).
                with _environ({**env, **local}):
                    ray.init(**self._local_resources(_visible_gpus()), runtime_env=self.runtime_env, **opts)
            else:
                runtime_env = dict(self.runtime_env or {})
                runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
                ray.init(address=self.address, runtime_env=runtime_env, **opts)
        self.timings = {"ray_init_s": time.perf_counter() - t0, "ray_started_here": started}
        return ray, started

    def _local_resources(self, gpus: int) -> dict:
        """ray.init's resources for a Ray started here. With GPUs, only the CPUs their actors ask for: the raylet
        prestarts one idle Python worker per CPU as the driver connects (32 on a 32-core host), and those
        would import Ray beside the actors' own imports and weight loads, for nothing. Without GPUs the
        CPUs set the number of actors: Ray's default (all of them)."""
        if not gpus:
            return {"num_gpus": 0}
        cpus = max(1, math.ceil(gpus * self.cpus_per_worker))
        return {"num_gpus": gpus, "num_cpus": min(cpus, os.cpu_count() or cpus)}

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
        import time

        n, opts = self._slots(ray, tp)
        actor_cls = ray.remote(max_restarts=0, max_concurrency=1, **opts)(_Worker)
        threads, driver = self.num_threads, _driver_threads()
        if threads is None and driver is not None:
            threads = max(1, driver // n)  # the actors' share of this process's threads
        queue = deque(points)
        alive: list = []
        in_flight: dict = {}  # ObjectRef -> (actor, point)
        t_start = time.time()

        def next_point():
            while queue:
                point = queue.popleft()
                if skip is None or not skip(point):
                    return point
            return None

        def start_actor():
            """A new actor, created with its first point (it loads the model for it while starting), which is
            handed to it at once: all actors of the group start, import and load side by side."""
            point = next_point()
            if point is not None:
                actor = actor_cls.remote(make_runner, point, threads, os.nice(0))
                alive.append(actor)
                in_flight[actor.run.remote(point)] = (actor, point)

        def submit(actor):
            point = next_point()
            if point is not None:
                in_flight[actor.run.remote(point)] = (actor, point)

        try:
            for _ in range(n):
                start_actor()
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
                    start_actor()  # a fresh actor for the points still queued
                    continue
                except ray.exceptions.RayTaskError as e:  # the runner raised: a result of its own
                    on_error(point, _first_line(e.cause if getattr(e, "cause", None) else e))
                else:
                    on_result(point, result)
                submit(actor)
            self._record_actors(ray, tp, alive, t_start)
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

    def _record_actors(self, ray, tp: int, actors: list, t_start: float) -> None:
        """timings["actors"]: per live actor of this group what `_Worker.describe` says, and when it was ready,
        in s since the group started (an actor that died is in the results as its point's error)."""
        for actor in actors:
            try:
                info = ray.get(actor.describe.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - nothing to record
                continue
            info = {**info, "tp": tp}
            if "ready_at" in info:
                info["ready_after_s"] = info.pop("ready_at") - t_start
            self.timings.setdefault("actors", []).append(info)


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
