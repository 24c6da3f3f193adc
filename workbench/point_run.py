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
    """Run ``workload`` once on ``llm`` as configured now; exceptions propagate (the engine stays usable).
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
