"""The NVML sampler against a fake pynvml (conftest.install_fake_nvml; no GPU needed), and the no-op twin."""
import math
import sys
import time
import types

import pytest

from workbench import telemetry
from workbench.metrics import TELEMETRY_COLUMNS


def test_null_telemetry_has_the_same_interface():
    t = telemetry.NullTelemetry()
    with t:
        pass
    assert list(t.samples().columns) == TELEMETRY_COLUMNS and len(t.stop()) == 0
    s = t.summary()
    assert math.isnan(s["energy_j"]) and s["num_telemetry_samples"] == 0
    assert t.gpu_info() == {} and not t.available


def test_make_telemetry_without_a_gpu_is_the_no_op(monkeypatch):
    broken = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert isinstance(telemetry.make_telemetry(), telemetry.NullTelemetry)
    assert isinstance(telemetry.make_telemetry(enabled=False), telemetry.NullTelemetry)
    with pytest.raises(RuntimeError):
        telemetry.make_telemetry(enabled=True)


def test_sampler_thread_records_samples_and_energy(install_fake_nvml):
    fake, state = install_fake_nvml()
    t = telemetry.make_telemetry(interval=0.01)
    assert t.available
    with t:
        time.sleep(0.15)
    df = t.samples()
    assert list(df.columns) == TELEMETRY_COLUMNS
    assert len(df) >= 5  # start + several thread samples + stop
    assert df["time"].is_monotonic_increasing
    assert (df["gpu_util_pct"] == 87).all() and (df["power_w"] == 250).all()
    s = t.summary()
    assert s["energy_source"] == "counter" and s["energy_j"] == pytest.approx(5 * (len(df) - 1))
    assert s["mem_used_peak_bytes"] == 2 * 2**30 and s["sm_clock_mhz_mean"] == 1980
    assert t.gpu_info()["gpu"] == "NVIDIA H100 80GB HBM3" and t.gpu_info()["driver"] == "550.54"
    n = len(df)
    t.start()  # restartable: a new window
    t.stop()
    assert len(t.samples()) == 2 and n > 2
    t.close()
    assert state["shutdown"] == 1


def test_unsupported_counter_is_nan_and_energy_falls_back_to_power(install_fake_nvml):
    install_fake_nvml(energy_supported=False)
    t = telemetry.Telemetry(interval=0.01)
    t.start()
    time.sleep(0.05)
    t.stop()
    assert t.samples()["energy_j"].isna().all()
    s = t.summary()
    assert s["energy_source"] == "power" and s["energy_j"] > 0
    t.close()


def test_cuda_visible_devices_picks_the_nvml_device(monkeypatch, install_fake_nvml):
    install_fake_nvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert telemetry.Telemetry()._handle == ("handle", 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    assert telemetry.Telemetry()._handle == ("handle", "GPU-abc")


def test_environment_lists_versions():
    env = telemetry.environment()
    assert {"python", "torch", "triton", "platform"} <= set(env)


def test_measure_overhead_without_gpu_says_so(monkeypatch):
    monkeypatch.setattr(telemetry, "make_telemetry", lambda *a, **k: telemetry.NullTelemetry())
    r = telemetry.measure_overhead(llm=None, workload=None)
    assert math.isnan(r["overhead_pct"]) and "no NVIDIA GPU" in r["note"]
