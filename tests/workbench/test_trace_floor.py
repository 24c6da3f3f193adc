"""benchmarks/trace_floor.py: the trace's roofline floor, on two requests counted by hand."""
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


def test_floor_counts_each_step_by_hand():
    spec = ModelSpec.from_hf_config(preset_config("llama-3.1-8b"))
    # 4096 hidden, 32 layers of 4096 * (4096 + 2 * 1024) + 4096 * 4096 attention weights and 3 * 4096 * 14336 MLP
    # weights (+ 2 norms), a 128256 x 4096 LM head: 7.50e9 parameters a decode token reads.
    layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    active = 32 * layer + 128256 * 4096 + 4096
    assert spec.num_active_params() == active
    flops, bw = 1e15, 4e12
    # request A: 2 prompt tokens, 1 output; B: 3 prompt tokens, 2 outputs. Step 0 decodes both (contexts 2 and 3),
    # step 1 only B (context 3 + 1). At one or two tokens a step the weight read (15.0 GB / 4 TB/s) bounds it.
    f = trace_floor.trace_floor(spec, np.array([2, 3]), np.array([1, 2]), flops, bw)
    weight_s = 2 * active / bw
    kv = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16
    assert f["decode_linear_s"] == pytest.approx(2 * weight_s)
    assert f["decode_attention_s"] == pytest.approx((2 + 3 + 4) * kv / bw)
    assert f["prefill_s"] == pytest.approx(5 * 2 * (active - 4096 - 128256 * 4096) / flops)
    assert f["floor_s"] == pytest.approx(f["prefill_s"] + f["decode_linear_s"] + f["decode_attention_s"])
    # a thousand requests at once: compute bound, FLOPs over the rate
    many = trace_floor.trace_floor(spec, np.full(1000, 1), np.full(1000, 1), flops, bw)
    assert many["decode_linear_s"] == pytest.approx(1000 * 2 * (active - 4096) / flops)
