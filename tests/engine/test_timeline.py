"""The always-on step timeline (host phases, device time, recompute tokens, request events) and deep mode."""
import math

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.profiling import KERNEL_CLASSES, KernelProfiler, classify


def _run(config, prompts, max_tokens, **kw):
    llm = LLM.random("tiny", config)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), **kw)
    return llm, outs, llm.engine.stats()


def test_host_phases_tile_each_step_and_device_time_lies_in_the_launch():
    cfg = EngineConfig(device="cpu", max_model_len=128, block_size=8, max_num_batched_tokens=32)
    _, _, st = _run(cfg, [[3 + i] * (20 + 7 * i) for i in range(4)], 6)
    assert st.steps
    for s in st.steps:
        phases = [s.schedule_time, s.prepare_time, s.launch_time, s.sample_time, s.output_time]
        assert all(p >= 0 for p in phases)
        assert sum(phases) == pytest.approx(s.duration, abs=1e-9)
        assert s.time == pytest.approx(s.start + s.duration)
        # On the CPU the forward pass is synchronous: its wall time is the device time, inside the launch phase.
        assert math.isfinite(s.device_time) and 0 < s.device_time <= s.launch_time
        assert s.start + s.schedule_time + s.prepare_time <= s.device_start <= s.time
        assert s.num_padding_tokens == 0  # no CUDA graphs on the CPU
        assert 0 <= s.num_decode_kv_tokens_read <= s.num_kv_tokens_read
        if s.num_prefill_tokens == 0:  # every row decodes: all K/V reads are the decode kernel's
            assert s.num_decode_kv_tokens_read == s.num_kv_tokens_read
    # Mixed steps exist (a 32-token budget chunks the longer prompts while the others decode), and their
    # decode rows read one context each: as many K/V tokens as the decoding requests' lengths.
    assert any(s.num_prefill_tokens and s.num_decode_tokens and 0 < s.num_decode_kv_tokens_read < s.num_kv_tokens_read
               for s in st.steps)


def test_recompute_tokens_are_the_extra_tokens_computed_after_preemption():
    # A pool too small for every request at once: the scheduler preempts and recomputes.
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=4, num_gpu_blocks=24, max_num_batched_tokens=64,
                       enable_prefix_caching=False)
    prompts = [[5 + i] * (10 + 3 * i) for i in range(6)]
    max_tokens = 20
    _, outs, st = _run(cfg, prompts, max_tokens)
    assert st.num_preemptions > 0
    computed = sum(s.num_batched_tokens for s in st.steps)
    # Without preemption a request computes its prompt and every output token but the last.
    needed = sum(len(p) + max_tokens - 1 for p in prompts)
    recomputed = sum(s.num_recompute_tokens for s in st.steps)
    assert recomputed > 0 and computed - needed == recomputed
    ev = st.request_events
    assert sum(1 for e in ev if e[2] == "preempted") == st.num_preemptions
    assert sum(e[3] for e in ev if e[2] == "recompute") == recomputed
    for o, p in zip(outs, prompts):
        chunks = sum(e[3] for e in ev if e[1] == o.request_id and e[2] == "prefill")
        redo = sum(e[3] for e in ev if e[1] == o.request_id and e[2] == "recompute")
        # Prefill chunks cover the prompt once plus what was recomputed (prompt and re-fed outputs), plus
        # the token a request preempted while decoding was about to compute anyway.
        assert len(p) <= chunks - redo <= len(p) + o.metrics.num_preemptions
    for i, name, kind, n in ev:
        assert 0 <= i < len(st.steps) and kind in ("prefill", "recompute", "preempted") and n >= 0


def test_chunked_prefill_events_follow_the_budget():
    cfg = EngineConfig(device="cpu", max_model_len=128, block_size=8, max_num_batched_tokens=16)
    _, outs, st = _run(cfg, [[7] * 40], 3)
    chunks = [e for e in st.request_events if e[2] == "prefill"]
    assert [e[3] for e in chunks] == [16, 16, 8]
    assert [e[0] for e in chunks] == [0, 1, 2]
    assert [s.num_prefill_tokens for s in st.steps[:3]] == [16, 16, 8]


def test_reset_stats_clears_the_timeline():
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=8)
    llm, _, st = _run(cfg, [[4] * 9], 3)
    assert st.request_events and st.steps
    llm.engine.reset_stats()
    st2 = llm.engine.stats()
    assert st2.steps == [] and st2.request_events == [] and st2.kernel_profile is None


@pytest.mark.parametrize("name,cls", [
    ("_decode_split_kernel", "attention_decode"), ("_prefill_kernel", "attention_prefill"),
    ("_rotary_write_kv_kernel", "kv_write"), ("_add_rms_norm_kernel", "norm_rotary_act"),
    ("_silu_and_mul_kernel", "norm_rotary_act"), ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"), ("_int4_gemv_kernel", "gemm"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>", "sampler"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"), ("Memcpy HtoD (Pinned -> Device)", "memcpy"),
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::einsum", "attention_prefill"), ("something_else", "other"),
    ("_route_topk_kernel", "other"), ("aten::topk", "sampler")])
def test_kernel_names_are_classified(name, cls):
    assert classify(name) == cls and cls in KERNEL_CLASSES


def test_every_engine_kernel_has_a_class():
    """Each Triton kernel the engine defines gets its class: a quantized linear's kernels are GEMM time (the int4
    MMA and dp4a kernels once fell into "other", so a quantized decode profile showed no GEMMs)."""
    import pathlib
    import re
    expected = {"_route_topk_kernel": "other"}  # MoE routing: neither a GEMM nor the sampler
    quant = ("_int4_", "_int8_", "_fp8_dot", "_fp8_per_token", "_quantize_chunk", "_limbs", "_x_limbs", "_moe_g")
    engine = pathlib.Path(__file__).resolve().parents[2] / "engine"
    names = [m.group(1) for f in engine.rglob("*.py")
             for m in re.finditer(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+_kernel)\(", f.read_text())]
    assert len(names) >= 30
    for name in names:
        want = expected.get(name) or ("gemm" if name.startswith(quant) else None)
        got = classify(name)
        assert got != "other" or want == "other", f"{name} is classified 'other'"
        assert want is None or got == want, f"{name}: {got}, expected {want}"


def test_deep_mode_profiles_the_forward_on_the_cpu():
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=8)
    llm, _, st = _run(cfg, [[4] * 12, [9] * 5], 4, profile="kernels")
    prof = st.kernel_profile
    assert prof is not None and prof.device == "cpu"
    assert (prof.first_step, prof.last_step) == (0, len(st.steps) - 1)
    by = prof.by_class()
    assert set(by) == set(KERNEL_CLASSES) | {"idle"}
    assert by["gemm"] > 0 and by["idle"] >= 0
    assert prof.busy_time() <= prof.window + 1e-9 and prof.overhead > 0
    assert llm.engine.kernel_profiler is None  # the window closed with the call
    with pytest.raises(ValueError, match="profile="):
        llm.generate([[4] * 3], SamplingParams(max_tokens=2), profile="everything")
    assert not llm.engine.has_unfinished_requests()


def test_deep_mode_window_of_steps():
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=8)
    llm = LLM.random("tiny", cfg)
    llm.engine.profile_kernels(first_step=2, num_steps=3)
    llm.generate([[4] * 6], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    prof = llm.engine.stats().kernel_profile
    assert (prof.first_step, prof.last_step) == (2, 4) and prof.kernels
    with pytest.raises(ValueError, match="num_steps"):
        KernelProfiler(llm.device, 0, 0)


def test_the_timeline_can_be_switched_off_for_overhead_measurements():
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=8)
    llm = LLM.random("tiny", cfg)
    llm.engine.set_timeline(False)
    llm.generate([[4] * 9, [5] * 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    st = llm.engine.stats()
    assert st.steps and st.request_events == [] and all(math.isnan(s.device_time) for s in st.steps)
    llm.engine.set_timeline(True)
    llm.engine.reset_stats()
    llm.generate([[4] * 9], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    st = llm.engine.stats()
    assert st.request_events and all(math.isfinite(s.device_time) for s in st.steps)


def test_overlapping_device_kernels_count_once_for_the_earlier_one():
    """With programmatic dependent launch a kernel starts before the one before it ends: the overlap is the
    earlier kernel's, so the classes add up to the busy time (hand-counted intervals, in microseconds)."""
    from types import SimpleNamespace

    from engine.profiling import KernelProfile, _kernels

    cuda = torch.autograd.DeviceType.CUDA

    def event(name, start, end):
        return SimpleNamespace(name=name, device_type=cuda, time_range=SimpleNamespace(start=start, end=end),
                               self_cpu_time_total=0)

    # gemv 0-10, decode attention 8-20 (2 overlapped), a norm inside it 12-14, a second gemv 25-30 after a gap
    events = [event("attention_decode_kernel", 8, 20), event("gemv_kernel", 0, 10), event("rms_norm", 12, 14),
              event("gemv_kernel", 25, 30), SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU,
                                                            time_range=SimpleNamespace(start=0, end=99))]
    kernels = _kernels(events, cuda=True)
    assert [k[0] for k in kernels] == ["gemv_kernel", "attention_decode_kernel", "rms_norm", "gemv_kernel"]
    assert [v * 1e6 for k in kernels for v in k[2:]] == pytest.approx([0, 10, 10, 8, 12, 10, 12, 2, 0, 25, 5, 5])
    prof = KernelProfile(0, 0, "cuda", kernels)
    by = prof.by_class()
    assert by["gemm"] * 1e6 == pytest.approx(15) and by["attention_decode"] * 1e6 == pytest.approx(10)
    assert by["norm_rotary_act"] == 0 and by["idle"] * 1e6 == pytest.approx(5)
    assert sum(v for k, v in by.items() if k != "idle") == pytest.approx(prof.busy_time())
