"""One run of one workload on one engine config: the measurement both `Sweep` and `bench` make.

`run_point` warms the engine up, replays the workload (`trace_replay.replay`) under GPU telemetry, and
summarises it with `workbench.metrics`. `load_llm` turns a model argument (preset name, checkpoint
folder or an `LLM`) into an engine configured for a config.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import pandas as pd

from . import metrics
from .telemetry import NullTelemetry
from .trace_replay import replay, warm_up


@dataclass
class PointRun:
    """A finished run: per-request rows, per-step rows (t: s since the run started, merged with the
    nearest earlier GPU sample), NVML samples, wall time (s) and the metric columns of the results row."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    telemetry: pd.DataFrame
    duration: float
    metrics: dict
    stats: object | None = None  # the engine's EngineStats of the run (request events, kernel profile)


def run_point(llm, workload, slo: dict | None = None, warmup: bool = True, sampling=None,
              telemetry=None, max_duration: float | None = None, profile: str | None = None,
              kernel_window: tuple[int, int] | None = None, rates: dict | None = None) -> PointRun:
    """Run ``workload`` once on ``llm`` as configured now, from a cold prefix cache (a repeated run measures
    the same work as the first); exceptions propagate (the engine stays usable).
    profile="kernels": deep mode over kernel_window = (first step, number of steps), by default
    `profiling.KERNEL_WINDOW`. rates (`profiling.measure_rates` of the device): adds the gap-to-limit
    attribution's columns to the metrics."""
    cfg, eng = llm.config, llm.engine
    if workload.max_seq_len > cfg.max_model_len:
        raise ValueError(f"workload {workload.name!r} has a request of {workload.max_seq_len} tokens (prompt + output), "
                         f"over max_model_len={cfg.max_model_len}: raise max_model_len or shorten the workload")
    telemetry = telemetry or NullTelemetry()
    if warmup:
        warm_up(eng, cfg)
    eng.reset_prefix_cache()  # every run starts cold: a repeat must not reuse the previous run's prompts
    eng.reset_stats()
    if profile is not None:
        from .profiling import start_deep_mode
        start_deep_mode(eng, profile, *(kernel_window or ()))
    telemetry.start()
    try:
        run = replay(eng, workload, sampling, max_duration)
    finally:
        samples = telemetry.stop()
        if profile is not None:
            eng.stop_kernel_profile()
    stats = eng.stats()
    requests, steps = metrics.request_frame(run.outputs), metrics.steps_frame(stats)
    row = metrics.point_metrics(requests, steps, stats, metrics.telemetry_summary(samples), run.duration, slo)
    if rates is not None and len(steps):
        from .profiling import point_profile
        row.update(point_profile(llm, stats, steps, requests, run.duration, rates)["attribution"])
    samples = samples.assign(t=samples["time"] - run.start)
    return PointRun(requests, _timeseries(steps, samples, run.start), samples, run.duration, row, stats)


class PointWorker:
    """Runs points one after another on one model, kept loaded between them (weights load once, the engine
    is reconfigured per point): the body of a sequential sweep and of each Ray actor of a parallel one.

    It is picklable while it holds no model: build it from a preset name or checkpoint folder (``model``)
    and it loads the weights on its first point, on the device its process sees. ``llm``: an already
    loaded `LLM` to use instead (the sequential sweep's notebook path). A call returns the point's result
    columns (metrics, status, error, duration, timestamp) and its frames (steps, requests, telemetry);
    an exception inside the run is a failed point, not an exception.
    """

    def __init__(self, model, seed: int = 0, dtype=None, slo: dict | None = None, warmup: bool = True,
                 sampling=None, max_duration: float | None = None, telemetry=None, telemetry_interval: float = 0.1,
                 telemetry_enabled: bool | None = None, llm=None):
        self.model, self.seed, self.dtype, self.slo, self.warmup = model, seed, dtype, slo, warmup
        self.sampling, self.max_duration, self.llm = sampling, max_duration, llm
        self.telemetry, self.telemetry_interval, self.telemetry_enabled = telemetry, telemetry_interval, \
            telemetry_enabled
        self.rates: dict | None = None  # matmul rate and copy bandwidth of this worker's device
        self._prepared: tuple | None = None  # (config, seconds) of prepare(): the next point of that config uses it

    def prepare(self, point) -> None:
        """Load the weights for ``point``'s config and measure the device's rates now, ahead of the point (a Ray
        actor does it in its constructor). The point's call then starts from this engine, as a sequential
        sweep's first point starts from the one it loads, and its point_duration_s includes these seconds.
        Raises what the load raises (memory released), for the point to meet again and record."""
        import time

        point = point[0] if isinstance(point, tuple) else point
        t0 = time.perf_counter()
        try:
            self.llm = load_llm(self.model, point.config, self.llm, self.seed, self.dtype)
            if self.rates is None:
                from .profiling import measure_rates
                self.rates = measure_rates(self.llm.device)
        except Exception:
            release_memory()
            raise
        self._prepared = (point.config, time.perf_counter() - t0)

    def _telemetry_for(self, device):
        if self.telemetry is None:
            from .telemetry import make_telemetry

            on = self.telemetry_enabled is not False and device.type == "cuda"
            self.telemetry = make_telemetry(self.telemetry_interval, enabled=self.telemetry_enabled) if on \
                else NullTelemetry()
        return self.telemetry

    def __call__(self, point) -> tuple[dict, dict]:
        """point: a `grid.Point`, or a (Point, repeat) pair of a sweep's schedule."""
        import socket
        import time
        import traceback

        import pandas as pd

        from . import schema
        from .schema import C

        point = point[0] if isinstance(point, tuple) else point
        t0 = time.perf_counter()
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == point.config and self.llm is not None:
            t0 -= prepared[1]  # loaded for this point by prepare(): its seconds count as the point's
        else:
            prepared = None
        frames: dict = {}
        try:
            if prepared is None:
                self.llm = load_llm(self.model, point.config, self.llm, self.seed, self.dtype)
            if self.rates is None:  # measured once, on the device of the first point
                from .profiling import measure_rates
                self.rates = measure_rates(self.llm.device)
            sampling = {**(self.sampling or {}), **getattr(point, "sampling", {})}  # the grid's n / beam_width
            run = run_point(self.llm, point.workload, self.slo, self.warmup, sampling or None,
                            self._telemetry_for(self.llm.device), self.max_duration, rates=self.rates)
            out = {**run.metrics, C.status: schema.OK, C.error: None}
            frames = {"steps": run.steps, "requests": run.requests, "telemetry": run.telemetry}
        except Exception as e:  # noqa: BLE001 - a failing point is a result, not the end of the sweep
            out = {C.status: schema.OOM if is_oom(e) else schema.ERROR, C.error: f"{type(e).__name__}: {e}"}
            out["traceback"] = traceback.format_exc()
            release_memory()
        out[C.point_duration_s] = time.perf_counter() - t0
        out[C.timestamp] = pd.Timestamp.now(tz="UTC").isoformat()
        out[C.run_host] = socket.gethostname()
        return out, frames


def _timeseries(steps: pd.DataFrame, samples: pd.DataFrame, start: float) -> pd.DataFrame:
    if len(steps) == 0:
        return steps
    steps = steps.copy()
    steps["t"] = steps["time"].astype(float) - start if "time" in steps else range(len(steps))
    if len(samples):
        tel = samples[["t", "gpu_util_pct", "power_w", "mem_used_bytes"]].sort_values("t")
        steps = pd.merge_asof(steps.sort_values("t"), tel, on="t", direction="backward")
    return steps


def load_llm(model, config, llm=None, seed: int = 0, dtype=None):
    """The LLM for ``model`` configured for ``config``: ``llm`` reconfigured when given, else weights loaded
    (a checkpoint folder with `LLM.from_pretrained`, a preset name with random weights)."""
    if llm is not None:
        llm.reconfigure(config)
        return llm
    from engine import LLM

    if not isinstance(model, str):
        model.reconfigure(config)
        return model
    if os.path.isdir(model):
        return LLM.from_pretrained(model, config)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return LLM.random(model, config, seed=seed, **kwargs)


def model_vocab_size(model) -> int | None:
    """The model's vocabulary size, before loading weights where possible."""
    if not isinstance(model, str):
        for path in ("vocab_size", "spec.vocab_size", "hf_config.vocab_size", "model_config.vocab_size"):
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, int):
                return obj
        return None
    from engine import LLM

    return LLM.model_spec(model).vocab_size


def is_oom(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
