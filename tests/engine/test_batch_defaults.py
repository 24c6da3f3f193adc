"""Batch limits left at None are picked from the device's memory, by vLLM's rule for its offline LLM class."""
from types import SimpleNamespace

import pytest
import torch

from engine import LLM, EngineConfig
from engine.config import ConfigError, default_batch_limits

GiB = 2**30


@pytest.mark.parametrize("total, name, expected", [
    (None, "", (256, 8192)),                               # the CPU
    (143771 * 2**20, "NVIDIA H200", (1024, 16384)),
    (85017493504, "NVIDIA H100 80GB HBM3", (1024, 16384)),
    (70 * GiB, "some GPU", (1024, 16384)),                 # the threshold itself is large
    (70 * GiB - 1, "some GPU", (256, 8192)),
    (81040 * 2**20, "NVIDIA A100-SXM4-80GB", (256, 8192)),  # vLLM keeps A100s small: large budgets lost there
    (46068 * 2**20, "NVIDIA L40S", (256, 8192)),
])
def test_default_batch_limits(total, name, expected):
    assert default_batch_limits(total, name) == expected


def test_none_is_the_default_and_explicit_values_stay():
    cfg = EngineConfig()
    assert cfg.max_num_seqs is None and cfg.max_num_batched_tokens is None
    assert cfg.with_batch_limits(141 * GiB, "H200").max_num_seqs == 1024
    mixed = EngineConfig(max_num_seqs=64).with_batch_limits(141 * GiB, "H200")
    assert (mixed.max_num_seqs, mixed.max_num_batched_tokens) == (64, 16384)
    both = EngineConfig(max_num_seqs=8, max_num_batched_tokens=100)
    assert both.with_batch_limits(141 * GiB, "H200") is both
    for field in ("max_num_seqs", "max_num_batched_tokens"):
        with pytest.raises(ConfigError, match=f"{field}=0 .*None"):
            EngineConfig(**{field: 0})


def fake_cuda(monkeypatch, total, name):
    calls = []

    def props(device):
        calls.append(device)
        return SimpleNamespace(total_memory=total, name=name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    return calls


def test_resolve_config_asks_a_cuda_device(monkeypatch):
    spec = LLM.model_spec("tiny")
    calls = fake_cuda(monkeypatch, 143771 * 2**20, "NVIDIA H200")
    cfg = LLM.resolve_config(spec, EngineConfig(), torch.device("cuda"))
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len) == (1024, 16384, 4096)
    assert calls
    kept = LLM.resolve_config(spec, EngineConfig(max_num_batched_tokens=4096), "cuda")
    assert (kept.max_num_seqs, kept.max_num_batched_tokens) == (1024, 4096)
    fake_cuda(monkeypatch, 81040 * 2**20, "NVIDIA A100-SXM4-80GB")
    small = LLM.resolve_config(spec, EngineConfig(), torch.device("cuda"))
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (256, 8192)
    # A planned GPU given by its memory and name: the device is not asked.
    calls = fake_cuda(monkeypatch, 0, "unused")
    planned = LLM.resolve_config(spec, EngineConfig(), "cuda", total_bytes=80 * GiB, device_name="H100")
    assert planned.max_num_seqs == 1024 and not calls


def test_cpu_engine_keeps_its_limits(monkeypatch):
    fake_cuda(monkeypatch, 141 * GiB, "NVIDIA H200")  # never asked: the engine is on the CPU
    llm = LLM.random("tiny", EngineConfig(device="cpu"), dtype=torch.float32)
    assert (llm.config.max_num_seqs, llm.config.max_num_batched_tokens) == (256, 8192)
    assert llm.engine.scheduler.config.max_num_seqs == 256
    llm.reconfigure(EngineConfig(device="cpu", max_num_seqs=4))
    assert (llm.config.max_num_seqs, llm.config.max_num_batched_tokens) == (4, 8192)
