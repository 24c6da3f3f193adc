"""Gap-to-limit attribution and roofline placement, against parts computed by hand on synthetic steps."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from engine.profiling import KernelProfile
from workbench.profiling import (COLUMNS, PARTS, attribution, attribution_frame, kernel_breakdown, measure_rates,
                                serial_limit_time,
                                 roofline, step_roofline)

# A made-up model whose counts are easy by hand: 1000 linear params, a tied 10 x 10 embedding / LM head
# (100 params), one layer with one head of dim 1; 2 bytes per parameter, 4 KV bytes per token.
SPEC = SimpleNamespace(hidden_size=10, vocab_size=10, intermediate_size=5, tie_word_embeddings=True, num_layers=1,
                       num_heads=1, head_dim=1, num_params=lambda: 1100)
WEIGHT_BYTES, KV_BYTES = 2200, 4
RATES = {"matmul_flops": 1e6, "copy_bandwidth": 1e5}


def _steps():
    # step 0: a 10-token prefill, 4 of them recomputed; step 1: 3 decodes padded to a graph of 4; step 2: 1 decode.
    return pd.DataFrame([
        dict(num_batched_tokens=10, num_prefill_tokens=10, num_decode_tokens=0, num_sampled_tokens=1,
             num_attention_scores=40, num_kv_tokens_read=10, num_padding_tokens=0, num_recompute_tokens=4,
             device_time=0.05, duration=0.06, host_time=0.01, schedule_time=0.004, prepare_time=0.002,
             launch_time=0.001, sample_time=0.052, output_time=0.001),
        dict(num_batched_tokens=3, num_prefill_tokens=0, num_decode_tokens=3, num_sampled_tokens=3,
             num_attention_scores=30, num_kv_tokens_read=30, num_padding_tokens=1, num_recompute_tokens=0,
             device_time=0.03, duration=0.035, host_time=0.005, schedule_time=0.001, prepare_time=0.001,
             launch_time=0.001, sample_time=0.031, output_time=0.001),
        dict(num_batched_tokens=1, num_prefill_tokens=0, num_decode_tokens=1, num_sampled_tokens=1,
             num_attention_scores=12, num_kv_tokens_read=12, num_padding_tokens=0, num_recompute_tokens=0,
             device_time=float("nan"), duration=0.03, host_time=0.005, schedule_time=0.001, prepare_time=0.001,
             launch_time=0.001, sample_time=0.026, output_time=0.001),
    ])


def test_attribution_parts_match_hand_computation_and_sum_to_measured():
    # Roofline per step, max(FLOPs / 1e6, bytes / 1e5), FLOPs = 2*1000*tokens + 2*100*sampled + 4*scores,
    # bytes = 2200 + 4*(kv read + tokens):
    #   with padding:  step0 max(20360, 228000)e-6 = .0228 ; step1 (4 tokens) 2340/1e5 = .0234 ; step2 .02252
    #   without:       step1 (3 tokens) 2332/1e5 = .02332
    #   useful:        step0 (6 tokens, scores 24, kv 6) 2248/1e5 = .02248
    # ideal: useful FLOPs 20964 -> .020964 s; useful bytes 6832 with the weights read 2 times (the longest
    # output is 2 tokens; 10 tokens fit one step of 16) instead of 3: 4632 -> .04632 s.
    # Device time: .05 + .03 + (step2 has no device time: duration - host = .025) = .105.
    out = attribution(_steps(), 0.2, SPEC, WEIGHT_BYTES, KV_BYTES, RATES, max_num_batched_tokens=16,
                      max_output_len=2)
    expected = {"ideal": 0.04632, "host": 0.2 - 0.105, "kernel": 0.105 - 0.06872, "padding": 0.06872 - 0.06864,
                "recompute": 0.06864 - 0.06832, "underfill": 0.06832 - 0.04632, "profiler": 0.0}
    for part, value in expected.items():
        assert out[f"gap_{part}_s"] == pytest.approx(value, abs=1e-12), part
    assert sum(out[f"gap_{p}_s"] for p in PARTS) == pytest.approx(0.2, rel=1e-12)
    assert abs(out["gap_attributed_s"] - out["gap_measured_s"]) <= 0.02 * out["gap_measured_s"]
    assert out["host_schedule_s"] == pytest.approx(0.006) and out["host_sample_s"] == pytest.approx(0.109)
    assert out["device_busy_share"] == pytest.approx(0.105 / 0.2)
    # The kernel part by step kind: step 0 (prefill) .05 - .0228; steps 1-2 (decode) .03 - .0234 + .025 - .02252.
    assert out["gap_kernel_prefill_s"] == pytest.approx(0.05 - 0.0228)
    assert out["gap_kernel_decode_s"] == pytest.approx(0.03 - 0.0234 + 0.025 - 0.02252)
    assert out["gap_kernel_mixed_s"] == 0.0
    assert out["ideal_over_measured"] == pytest.approx(0.04632 / 0.2)
    assert {c.name for c in COLUMNS} >= set(out)
    # Deep mode's own host time is a part of its own, taken out of the host part.
    prof = attribution(_steps(), 0.2, SPEC, WEIGHT_BYTES, KV_BYTES, RATES, 16, 2, profiler_overhead=0.03)
    assert prof["gap_profiler_s"] == 0.03 and prof["gap_host_s"] == pytest.approx(0.2 - 0.105 - 0.03)
    assert prof["gap_attributed_s"] == pytest.approx(0.2)
    frame = attribution_frame(out)
    assert list(frame["part"]) == list(PARTS) and frame["share"].sum() == pytest.approx(1.0)


def test_ideal_is_bound_by_the_token_budget_when_outputs_are_short():
    # 10 useful tokens under a budget of 4 need 3 steps (weights read 3 times): bytes 6832 -> 6832/1e5.
    out = attribution(_steps(), 0.2, SPEC, WEIGHT_BYTES, KV_BYTES, RATES, max_num_batched_tokens=4, max_output_len=1)
    assert out["gap_ideal_s"] == pytest.approx(0.06832) and out["gap_underfill_s"] == pytest.approx(0.0, abs=1e-12)


def test_serial_limit_puts_each_steps_attention_after_its_gemms():
    # At a ridge of 3 FLOP/byte the GEMMs are compute-bound (step 0) or weight-read bound, attention
    # (~1 FLOP/byte) K/V-read bound. Useful work only: step 0 keeps 6 of 10 tokens, so 24 scores and 6 reads.
    rates = {"matmul_flops": 3e5, "copy_bandwidth": 1e5}
    gemm = [2 * 1000 * 6 + 2 * 100 * 1, 2 * 1000 * 3 + 2 * 100 * 3, 2 * 1000 * 1 + 2 * 100 * 1]
    attn = [4 * 24, 4 * 30, 4 * 12]
    kv = [4 * (6 + 6), 4 * (30 + 3), 4 * (12 + 1)]
    hand = sum(max(g / 3e5, 2200 / 1e5) + max(a / 3e5, b / 1e5) for g, a, b in zip(gemm, attn, kv))
    assert hand == pytest.approx(0.041146667 + 0.02332 + 0.02252)
    assert serial_limit_time(_steps(), SPEC, WEIGHT_BYTES, KV_BYTES, rates) == pytest.approx(hand)
    # above the per-step limit of the same useful work (steps 1-2 memory-bound in both) by what step 0's
    # attention takes over its K/V reads instead of over its FLOPs
    combined = sum(max((g + a) / 3e5, (2200 + b) / 1e5) for g, a, b in zip(gemm, attn, kv))
    assert hand - combined == pytest.approx(kv[0] / 1e5 - attn[0] / 3e5)


def test_roofline_placement_of_known_work():
    # Ridge at 1e6 / 1e5 = 10 FLOP/byte.
    c = roofline(1e6, 1e4, 2.0, RATES)  # intensity 100: compute-bound, roof 1e6 FLOP/s, limit 1 s
    assert c["intensity"] == 100 and c["bound"] == "compute" and c["roof_flops"] == 1e6
    assert c["achieved_flops"] == 5e5 and c["limit_time"] == 1.0 and c["efficiency"] == 0.5 and c["ridge"] == 10
    m = roofline(1e3, 1e4, 0.2, RATES)  # intensity 0.1: memory-bound, roof 0.1 x 1e5 = 1e4 FLOP/s, limit 0.1 s
    assert m["bound"] == "memory" and m["roof_flops"] == pytest.approx(1e4)
    assert m["achieved_flops"] == pytest.approx(5e3) and m["efficiency"] == pytest.approx(0.5)


def test_step_roofline_rows():
    r = step_roofline(_steps(), SPEC, WEIGHT_BYTES, KV_BYTES, RATES)
    assert list(r["kind"]) == ["prefill", "decode", "decode"]
    assert r.loc[1, "flops"] == 2000 * 4 + 200 * 4 + 4 * 31 and r.loc[1, "bytes"] == 2340  # padding row included
    assert r.loc[0, "efficiency"] == pytest.approx(0.0228 / 0.05)
    assert r.loc[2, "device_time"] == pytest.approx(0.025)
    assert (r["bound"] == "memory").all()


def test_kernel_breakdown_against_class_rooflines():
    prof = KernelProfile(1, 2, "cuda", [("nvjet_gemm", "gemm", 0.0, 0.03, 0.03), ("_decode_split_kernel",
                                        "attention_decode", 0.03, 0.01, 0.01), ("_add_rms_norm_kernel",
                                        "norm_rotary_act", 0.05, 0.005, 0.005)])
    kb = kernel_breakdown(prof, _steps(), SPEC, WEIGHT_BYTES, KV_BYTES, RATES).set_index("class")
    # steps 1-2: GEMM FLOPs 2*1000*(4+1) + 2*100*(4+1) = 11000 -> .011 s; weight bytes 2 x 2200 -> .044 s.
    assert kb.loc["gemm", "roofline_time"] == pytest.approx(0.044)
    assert kb.loc["gemm", "efficiency"] == pytest.approx(0.044 / 0.03)
    # decode attention: scores 31 + 12 -> 172 FLOPs; K/V read 4 x (31 + 12) = 172 bytes -> 1.72e-3 s.
    assert kb.loc["attention_decode", "roofline_time"] == pytest.approx(1.72e-3)
    assert kb.loc["idle", "device_time"] == pytest.approx(0.055 - 0.045)
    assert math.isnan(kb.loc["other", "roofline_time"])
    # With the engine's count of the decode rows' K/V reads, a mixed step's decodes go to attention_decode.
    steps = _steps().assign(num_decode_kv_tokens_read=[6, 30, 12])
    kb2 = kernel_breakdown(prof, steps, SPEC, WEIGHT_BYTES, KV_BYTES, RATES).set_index("class")
    assert kb2.loc["attention_decode", "roofline_time"] == pytest.approx(1.72e-3)
    prof0 = KernelProfile(0, 0, "cuda", prof.kernels)  # step 0: 40 scores and 10 K/V reads, 6 of them decode
    kb3 = kernel_breakdown(prof0, steps, SPEC, WEIGHT_BYTES, KV_BYTES, RATES).set_index("class")
    assert kb3.loc["attention_decode", "flops"] == 4 * 6 and kb3.loc["attention_prefill", "flops"] == 4 * 34
    assert kb3.loc["attention_prefill", "bytes"] == 4 * (10 - 6)


def test_cpu_rates_are_positive():
    r = measure_rates("cpu")
    assert r["matmul_flops"] > 1e6 and r["copy_bandwidth"] > 1e6


def test_bench_command_prints_the_waterfall_and_writes_trace_and_kernels(tmp_path, capsys):
    import json

    from workbench.__main__ import main
    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    assert main(["bench", "--model", "tiny", "--workload", "fixed", "--num-requests", "4", "--device", "cpu",
                 "--workload-arg", "prompt_len=16", "--workload-arg", "output_len=40", "--set", "max_model_len=128",
                 "--out", str(out), "--trace", str(trace), "--profile", "kernels"]) == 0
    printed = capsys.readouterr().out
    assert "where the time goes" in printed and "kernel class" in printed
    result = json.loads(out.read_text())
    att = result["attribution"]
    # Real steps: the parts still add up to the measured wall time (by construction, within float rounding).
    assert att["gap_attributed_s"] == pytest.approx(att["gap_measured_s"], rel=1e-9)
    assert att["gap_measured_s"] == pytest.approx(result["engine"]["duration"])
    assert att["gap_ideal_s"] > 0 and att["gap_host_s"] > 0 and att["gap_underfill_s"] >= 0
    assert att["gap_padding_s"] == 0 and att["gap_recompute_s"] == 0  # no graphs on the CPU, no preemption
    assert att["gap_profiler_s"] > 0  # deep mode ran: its own time is a part of its own
    # GEMMs then attention, each at its roofline: never below the per-step limit of the same useful work
    assert att["gap_ideal_s"] + att["gap_underfill_s"] <= result["serial_limit_s"] * (1 + 1e-9)
    assert result["serial_over_measured"] == pytest.approx(result["serial_limit_s"] / att["gap_measured_s"])
    assert "serial limit" in printed
    classes = {r["class"]: r for r in result["kernel_breakdown"]}
    assert classes["gemm"]["device_time"] > 0 and classes["gemm"]["roofline_time"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "gemm" for e in events) and any(e.get("cat") == "step" for e in events)


def test_figures_draw_the_numbers_they_are_given():
    import plotly.graph_objects as go

    from workbench import profile_figures as pf
    att = attribution(_steps(), 0.2, SPEC, WEIGHT_BYTES, KV_BYTES, RATES, max_num_batched_tokens=16, max_output_len=2)
    w = pf.waterfall_figure(att)
    assert isinstance(w, go.Figure) and list(w.data[0].y)[:-1] == [att[f"gap_{p}_s"] for p in PARTS]
    assert w.data[0].y[-1] == 0.2 and list(w.data[0].measure)[-1] == "total"
    rows = pd.DataFrame([{**att, "label": "a", "status": "ok"}, {**att, "label": "b", "status": "error"}])
    g = pf.gap_parts_figure(rows)
    assert len(g.data) == len(PARTS) and all(list(t.x) == ["a"] for t in g.data)
    r = step_roofline(_steps(), SPEC, WEIGHT_BYTES, KV_BYTES, RATES)
    rf = pf.roofline_figure(r, RATES)
    points = {t.name: t for t in rf.data}
    assert set(points) == {"prefill", "decode", "roof"}
    assert list(points["decode"].x) == list(r.loc[r.kind == "decode", "intensity"])
    assert max(points["roof"].y) == RATES["matmul_flops"]  # the compute roof, past the ridge
    tl = pf.step_timeline_figure(_steps())
    assert [t.name for t in tl.data] == ["schedule", "prepare", "launch", "sample", "output", "device time"]
    prof = KernelProfile(0, 1, "cuda", [("nvjet", "gemm", 0.0, 0.01, 0.01)])
    kb = kernel_breakdown(prof, _steps(), SPEC, WEIGHT_BYTES, KV_BYTES, RATES)
    kf = pf.kernel_classes_figure(kb)
    assert list(kf.data[0].x) == ["gemm"] and kf.data[0].y[0] == pytest.approx(10.0)
