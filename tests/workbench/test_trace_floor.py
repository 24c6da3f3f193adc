"""benchmarks/trace_floor.py: the best schedule's steps and their floor, on two requests counted by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engine.model.presets import preset_config
from engine.model.spec import ModelSpec

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "trace_floor.py"
_spec = importlib.util.spec_from_file_location("trace_floor", _PATH)
trace_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_floor)


def test_the_best_schedule_and_its_floor_by_hand():
    # request A: 2 prompt tokens, 1 output token; B: 3 prompt tokens, 2 outputs
    steps = trace_floor.ideal_steps(np.array([2, 3]), np.array([1, 2]))
    # the prefill step: 5 tokens, both first tokens sampled, causal scores 1 + 2 + 1 + 2 + 3 = 9, nothing cached;
    # then one decode step of B: its context is 3 + 1 tokens, and the new token scores those and itself
    assert steps.to_dict("records") == [
        dict(num_batched_tokens=5, num_sampled_tokens=2, num_attention_scores=9, num_kv_tokens_read=0),
        dict(num_batched_tokens=1, num_sampled_tokens=1, num_attention_scores=5, num_kv_tokens_read=4)]

    spec = ModelSpec.from_hf_config(preset_config("llama-3.1-8b"))
    h, vocab = 4096, 128256
    linear = 32 * (h * (h + 2 * 1024) + h * h + 3 * h * 14336)  # q/k/v, o, gate/up/down of 32 layers
    weights = 2 * (linear + 2 * vocab * h + 65 * h)  # bf16: + embeddings, LM head and 65 norms
    kv = 2 * 32 * 8 * 128 * 2  # K and V of a token: 32 layers, 8 KV heads of 128, bf16
    width = 32 * 32 * 128  # attention: 4 FLOPs a score per head dim, 32 heads, 32 layers
    R, BW = 1e15, 4e12
    f = trace_floor.trace_floor(spec, np.array([2, 3]), np.array([1, 2]), {"matmul_flops": R, "copy_bandwidth": BW})
    # each step: its GEMMs at max(FLOPs, weight read), then attention at max(FLOPs, K/V read + write)
    prefill = (max((2 * linear * 5 + 2 * vocab * h * 2) / R, weights / BW)
               + max(4 * width * 9 / R, kv * (0 + 5) / BW))
    decode = max((2 * linear + 2 * vocab * h) / R, weights / BW) + max(4 * width * 5 / R, kv * (4 + 1) / BW)
    assert f["prefill_s"] == pytest.approx(prefill) and f["decode_s"] == pytest.approx(decode)
    assert f["floor_s"] == pytest.approx(prefill + decode) and f["output_tokens"] == 3
