"""GPU telemetry: a background NVML sampler, and a no-op twin where there is no NVIDIA GPU.

`Telemetry` polls NVML (nvidia-ml-py, imported lazily) every ``interval`` seconds on a daemon thread:
GPU utilisation (%), memory used (bytes), power (W), SM clock (MHz), temperature (C) and the
total-energy counter (J since driver load). It also takes one sample synchronously at start and at
stop, so the energy counter difference covers exactly the measured window. A metric the GPU does
not support is NaN, not an error.

`NullTelemetry` has the same interface and records nothing; `make_telemetry` picks one.
Summaries (means, peaks, energy) are computed by `workbench.metrics.telemetry_summary`.
"""
from __future__ import annotations

import math
import os
import threading
import time

import pandas as pd

from .metrics import TELEMETRY_COLUMNS, telemetry_summary
from .schema import C


class NullTelemetry:
    """The telemetry interface with nothing behind it (CPU runs, no pynvml, telemetry off)."""

    available = False
    interval = math.nan

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        return self

    def stop(self) -> pd.DataFrame:
        return self.samples()

    def samples(self) -> pd.DataFrame:
        """The samples taken so far: columns time (perf_counter s) and TELEMETRY_COLUMNS (empty here)."""
        return pd.DataFrame(columns=TELEMETRY_COLUMNS)

    def summary(self) -> dict:
        return telemetry_summary(self.samples())

    def gpu_info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class Telemetry(NullTelemetry):
    """NVML sampler for one GPU. Use as a context manager or start()/stop(); restartable.

    Invariants: samples are appended only by the sampler thread or by start()/stop() while the thread
    is not running, so reading `samples()` after stop() needs no lock; the NVML handle stays open until
    close() (nvmlShutdown), so the sampler can be restarted for every sweep point cheaply.
    """

    available = True

    def __init__(self, interval: float = 0.1, device_index: int | None = None):
        import pynvml  # nvidia-ml-py; lazily, so the workbench imports without it

        if not interval > 0:
            raise ValueError(f"interval={interval!r} must be > 0 seconds")
        self.interval = float(interval)
        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = self._resolve_handle(device_index)
        self._unsupported: set[str] = set()
        self._rows: list[tuple] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _resolve_handle(self, device_index: int | None):
        nv = self._nvml
        if device_index is None:
            # torch's cuda:0 is the first entry of CUDA_VISIBLE_DEVICES, which NVML does not apply.
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            if first.startswith(("GPU-", "MIG-")):
                return nv.nvmlDeviceGetHandleByUUID(first)
            device_index = int(first) if first.isdigit() else 0
        return nv.nvmlDeviceGetHandleByIndex(device_index)

    def _read(self, name: str, fn):
        if name in self._unsupported:
            return math.nan
        try:
            return fn()
        except self._nvml.NVMLError:
            self._unsupported.add(name)  # not supported on this GPU: stop asking
            return math.nan

    def _sample(self) -> tuple:
        nv, h = self._nvml, self._handle
        return (
            time.perf_counter(),
            self._read("gpu_util_pct", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
            self._read("mem_used_bytes", lambda: float(nv.nvmlDeviceGetMemoryInfo(h).used)),
            self._read("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1e3),
            self._read("sm_clock_mhz", lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))),
            self._read("temperature_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
            self._read("energy_j", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3),
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._rows.append(self._sample())

    def start(self) -> "Telemetry":
        """Clear earlier samples, take one now, and start sampling every ``interval`` seconds."""
        self.stop()
        self._rows = [self._sample()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> pd.DataFrame:
        """Stop the thread, take a last sample, and return all samples of this window."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._rows.append(self._sample())
        return self.samples()

    def samples(self) -> pd.DataFrame:
        return pd.DataFrame(list(self._rows), columns=TELEMETRY_COLUMNS)

    def gpu_info(self) -> dict:
        """GPU name, driver and NVML versions, total memory (bytes)."""
        nv, h = self._nvml, self._handle

        def text(x):
            return x.decode() if isinstance(x, bytes) else str(x)

        info = {}
        for key, fn in (("gpu", lambda: text(nv.nvmlDeviceGetName(h))),
                        ("driver", lambda: text(nv.nvmlSystemGetDriverVersion())),
                        ("nvml", lambda: text(nv.nvmlSystemGetNVMLVersion())),
                        ("gpu_memory_bytes", lambda: int(nv.nvmlDeviceGetMemoryInfo(h).total))):
            try:
                info[key] = fn()
            except self._nvml.NVMLError:
                pass
        return info

    def close(self) -> None:
        self.stop()
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass


def environment(telemetry=None) -> dict:
    """Versions and hardware for a report: python, platform, torch, CUDA, triton, and the GPU from NVML."""
    import platform
    import sys

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if telemetry is not None:
        env.update(telemetry.gpu_info())
    return env


def make_telemetry(interval: float = 0.1, device_index: int | None = None, enabled: bool | None = None):
    """A `Telemetry` when NVML and an NVIDIA GPU are there (and ``enabled`` is not False), else `NullTelemetry`.

    enabled=True raises when NVML cannot start, instead of quietly returning the no-op.
    """
    if enabled is False:
        return NullTelemetry()
    try:
        return Telemetry(interval, device_index)
    except Exception:  # ImportError, NVMLError (no driver / no GPU), ...
        if enabled:
            raise
        return NullTelemetry()


def measure_overhead(llm, workload, interval: float = 0.1, repeats: int = 3, sampling=None) -> dict:
    """Engine output throughput (tokens/s) with and without the NVML sampler running, on one workload.

    Runs are interleaved in alternating order (off on, on off, off on, ...) so drift and position affect
    both alike; the medians are compared. Returns throughput_off, throughput_on, overhead_pct
    (100 * (off - on) / off; <1 is the target), range_off / range_on ([min, max] tokens/s),
    within_noise (the two ranges overlap: the overhead is not distinguishable from run-to-run noise) and
    runs (all throughputs). Needs an NVIDIA GPU; without one overhead_pct is NaN.
    """
    from .metrics import request_frame, throughput
    from .trace_replay import replay

    tel = make_telemetry(interval)
    if not tel.available:
        return {"throughput_off": math.nan, "throughput_on": math.nan, "overhead_pct": math.nan,
                "interval": interval, "runs": [], "note": "no NVIDIA GPU / pynvml: nothing to measure"}
    replay(llm.engine, workload, sampling=sampling)  # untimed pass: warm caches, allocator, prefix cache
    runs = {"off": [], "on": []}
    try:
        for i in range(repeats):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                llm.engine.reset_stats()
                if mode == "on":
                    tel.start()
                run = replay(llm.engine, workload, sampling=sampling)
                if mode == "on":
                    tel.stop()
                runs[mode].append(throughput(request_frame(run.outputs), run.duration)[C.output_throughput])
    finally:
        tel.close()
    off, on = pd.Series(runs["off"]).median(), pd.Series(runs["on"]).median()
    r_off, r_on = [min(runs["off"]), max(runs["off"])], [min(runs["on"]), max(runs["on"])]
    return {"throughput_off": float(off), "throughput_on": float(on), "overhead_pct": float(100 * (off - on) / off),
            "range_off": r_off, "range_on": r_on, "within_noise": r_off[0] <= r_on[1] and r_on[0] <= r_off[1],
            "interval": interval, "runs": runs}
