"""Shared fixtures of the workbench tests: synthetic results for figures/report, one real CPU sweep."""
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest

from workbench import metrics

HOSTILE = "<script>alert('x')</script>"


def synthetic_results(hostile: bool = False) -> tuple[pd.DataFrame, dict, dict, dict]:
    """A results table shaped like Sweep.results (4 ok points, 1 failed), with requests / timeseries /
    telemetry dicts, built through workbench.metrics from made-up engine outputs."""
    rng = np.random.default_rng(0)
    rows, requests, timeseries, telemetry = [], {}, {}, {}
    for i, (bs, pc) in enumerate([(8, True), (8, False), (32, True), (32, False)]):
        pid = f"p{i}"
        n = 20
        arrival = np.zeros(n)
        ttft = rng.uniform(0.01, 0.2, n) * (1 + i)
        out_tokens = np.full(n, 10)
        gaps = [list(rng.uniform(0.01, 0.03, 9)) for _ in range(n)]
        first = arrival + ttft
        fin = first + np.array([sum(g) for g in gaps])
        req = pd.DataFrame({
            "request_id": [f"r{j}" for j in range(n)], "arrival_time": arrival, "first_scheduled_time": arrival,
            "first_token_time": first, "finished_time": fin, "queue_time": 0.0, "ttft": ttft,
            "tpot": (fin - first) / 9, "e2e": fin - arrival, "itl": gaps, "num_prompt_tokens": 100,
            "num_output_tokens": out_tokens, "num_cached_tokens": 64 if pc else 0, "finish_reason": "length"})
        t = np.linspace(0, fin.max(), 30)
        steps = pd.DataFrame({"time": t, "t": t, "num_running": np.minimum(20, np.arange(30)),
                              "num_batched_tokens": 50, "kv_usage": np.linspace(0.1, 0.6, 30),
                              "internal_fragmentation": bs / 100, "num_used_blocks": 10,
                              # prefix caching shares the 64-token prefix's blocks between requests
                              "num_saved_blocks": 64 // bs if pc else 0, "num_shared_blocks": 64 // bs if pc else 0})
        samples = pd.DataFrame({"time": t, "t": t, "gpu_util_pct": 90.0, "mem_used_bytes": 1e9, "power_w": 300.0,
                                "sm_clock_mhz": 1900.0, "temperature_c": 60.0, "energy_j": 1000 + 300 * t})
        stats = {"num_gpu_blocks": 100, "block_size": bs, "prefix_cache_queries": 2000,
                 "prefix_cache_hits": 1280 if pc else 0, "num_preemptions": i, "num_steps": 30,
                 "attention_backend": "torch", "weight_bytes": 1000, "kv_bytes_per_token": 512, "device_name": "cpu"}
        row = {"point_id": pid, "label": f"block_size={bs}, enable_prefix_caching={pc}", "workload": "shared-prefix",
               "block_size": bs, "enable_prefix_caching": pc, "quantization": None, "status": "ok", "error": None}
        if hostile and i == 0:
            row["label"] = HOSTILE
        row.update(metrics.point_metrics(req, steps, stats, metrics.telemetry_summary(samples), float(fin.max()),
                                         {"ttft": 0.3}))
        rows.append(row)
        requests[pid], timeseries[pid], telemetry[pid] = req, steps, samples
    failed = {"point_id": "p4", "label": "block_size=64, enable_prefix_caching=True", "workload": "shared-prefix",
              "block_size": 64, "enable_prefix_caching": True, "quantization": None, "status": "error",
              "error": "ValueError: the KV cache has 2 blocks" + (HOSTILE if hostile else "")}
    rows.append(failed)
    df = pd.DataFrame(rows)
    return df, requests, timeseries, telemetry


@pytest.fixture
def synthetic():
    return synthetic_results()


@pytest.fixture
def synthetic_hostile():
    return synthetic_results(hostile=True)


def isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


class FakeNVMLError(Exception):
    pass


def fake_pynvml(energy_supported=True):
    m = types.ModuleType("pynvml")
    state = {"energy_mj": 1_000_000, "init": 0, "shutdown": 0}
    m.NVMLError = FakeNVMLError
    m.NVML_CLOCK_SM, m.NVML_TEMPERATURE_GPU = 1, 0
    m.nvmlInit = lambda: state.__setitem__("init", state["init"] + 1)
    m.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetHandleByUUID = lambda u: ("handle", u)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87, memory=40)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30, total=80 * 2**30)
    m.nvmlDeviceGetPowerUsage = lambda h: 250_000  # mW
    m.nvmlDeviceGetClockInfo = lambda h, kind: 1980
    m.nvmlDeviceGetTemperature = lambda h, kind: 55

    def energy(h):
        if not energy_supported:
            raise FakeNVMLError("not supported")
        state["energy_mj"] += 5_000  # 5 J per read
        return state["energy_mj"]

    m.nvmlDeviceGetTotalEnergyConsumption = energy
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    m.nvmlSystemGetDriverVersion = lambda: "550.54"
    m.nvmlSystemGetNVMLVersion = lambda: "12.550"
    return m, state


@pytest.fixture
def install_fake_nvml(monkeypatch):
    """A function that puts a fake pynvml (an H100 at 87% / 250 W) in sys.modules; returns (module, state)."""
    def install(energy_supported=True):
        fake, state = fake_pynvml(energy_supported)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake, state

    return install


def _tiny_sliding_window_llm(block_size: int = 4, **config):
    """An LLM over a tiny random float32 Gemma 2 (3 layers: sliding, full, sliding; window 8): 3 KV cache groups,
    group 0 full attention, groups 1 and 2 sliding (engine/kv/groups.py)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from engine import LLM, EngineConfig

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, vocab_size=512, max_position_embeddings=1024, num_hidden_layers=3,
                       sliding_window=8, query_pre_attn_scalar=24, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return LLM.from_hf_model(model, EngineConfig(device="cpu", block_size=block_size, max_model_len=128, **config))


@pytest.fixture
def tiny_sliding_window_llm():
    """The factory _tiny_sliding_window_llm(block_size=4, **config) (a fixture: test modules cannot import this
    conftest by name when another test directory's conftest holds that name)."""
    return _tiny_sliding_window_llm
