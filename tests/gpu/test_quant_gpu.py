"""Quantized layers on the GPU, at Llama-3.1-8B's layer shapes in bf16: the fused fp8 W8A8 forward
against its float oracle, the int4 (= AWQ / GPTQ) and int8 kernels with the launch configs tuning
picks at every bucket of rows against dequantize-then-matmul, and the engine with CUDA graphs
running AWQ/GPTQ layers loaded from a Hub layout; the fp8 quantization fused into add + RMSNorm and
SwiGLU against the unfused kernels, in a CUDA graph, feeding Fp8Linear.forward_quantized."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("m", [1, 3, 16, 64, 256])
def test_fp8_linear_with_fused_activation_quant_matches_its_oracle(m):
    from engine.quant.fp8 import Fp8Linear, fp8_linear_reference, fp8_supported
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores")
    lin = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    f8 = Fp8Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = f8(x)
        ref = fp8_linear_reference(x.float(), f8.weight_fp8, f8.weight_scale.view(-1))
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("m", [1, 2, 5, 16, 33, 64, 100, 256, 700])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_tuned_kernels_match_dequantize_then_matmul(kind, m):
    from engine.quant.int4 import Int4Linear, int4_linear_reference
    from engine.quant.int8 import Int8Linear, int8_linear_reference
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 6144, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        if kind == "int4":
            q = Int4Linear.from_linear(lin)
            ref = int4_linear_reference(x.float(), q.qweight, q.scales, q.zeros)
        else:
            q = Int8Linear.from_linear(lin)
            ref = int8_linear_reference(x.float(), q.weight_int8, q.scales)
        assert rel_err(q(x), ref) < 1e-2


@pytest.mark.parametrize("method", ["awq", "gptq", "gptq_act_order"])
def test_engine_runs_hub_layout_layers_in_cuda_graphs(method):
    """Greedy tokens of AWQ / GPTQ layers (act-order: each layer's input features permuted, which the norm and
    SwiGLU kernels then store in the layer's order) are the same in CUDA graphs as eager."""
    from transformers import LlamaConfig

    from engine import LLM, EngineConfig, SamplingParams
    from engine.quant.checkpoint import Prequantized, awq_to_int4, gptq_to_int4, int4_to_awq, int4_to_gptq
    from engine.quant.int4 import Int4Linear
    hf = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg = EngineConfig(max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.3)
    llm = LLM.random(hf, cfg.replace(quantization="int4"), dtype=torch.bfloat16)
    fmt, method = method, method.removesuffix("_act_order")
    pre = Prequantized(method)
    for name, mod in llm.model.named_modules():
        if isinstance(mod, Int4Linear):
            cpu = Int4Linear(mod.qweight.cpu(), mod.scales.cpu(), mod.zeros.cpu().clamp(min=1), None, mod.group_size)
            if fmt == "awq":
                pre.modules[name] = awq_to_int4(**int4_to_awq(cpu))
            elif fmt == "gptq":
                t = int4_to_gptq(cpu)
                pre.modules[name] = gptq_to_int4(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], mod.group_size)
            else:
                pre.modules[name] = Int4Linear(cpu.qweight, cpu.scales, cpu.zeros, None, cpu.group_size,
                                               perm=torch.randperm(cpu.in_features))
    llm.prequantized = pre
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    llm.reconfigure(cfg.replace(quantization=method, enforce_eager=True))
    eager = [o.token_ids for o in llm.generate(prompts, params)]
    llm.reconfigure(cfg.replace(quantization=method))
    assert llm.engine.stats().cuda_graphs
    assert [o.token_ids for o in llm.generate(prompts, params)] == eager


@pytest.mark.parametrize("m", [1, 2, 16, 64, 256, 600])
def test_every_int4_candidate_matches_dequantize_then_matmul(m):
    """tuning.pick may choose any candidate; each compiles on this GPU and computes the product."""
    from engine.quant.int4 import Int4Linear, int4_linear_reference
    from engine.quant.triton_int4 import _launch, candidates
    from engine.quant.triton_int8 import num_sms
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 1536, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = int4_linear_reference(x.float(), q.qweight, q.scales, q.zeros)
    cands = candidates(m, 1536, 4096, 128, num_sms(x.device), asm=True)
    assert any(c.get("dequant") in ("asm", "asm_scaled") for c in cands)  # the inline-PTX unpacking is timed too
    for cfg in cands:
        assert rel_err(_launch(x, q.packed, q.scales, q.zeros, 128, **cfg), ref) < 1e-2, cfg


@pytest.mark.parametrize("m", [1, 16, 256])
def test_int4_asm_dequantization_in_float16_matches_dequantize_then_matmul(m):
    """dequant="asm" has a float16 variant (magic 1024) beside the bfloat16 one the other tests run."""
    from engine.quant.int4 import Int4Linear, int4_linear_reference
    from engine.quant.triton_int4 import _launch, candidates
    from engine.quant.triton_int8 import num_sms
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 1536, bias=False, device="cuda", dtype=torch.float16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    ref = int4_linear_reference(x.float(), q.qweight, q.scales, q.zeros)
    for cfg in [c for c in candidates(m, 1536, 4096, 128, num_sms(x.device), asm=True) if c.get("dequant") == "asm"]:
        assert rel_err(_launch(x, q.packed, q.scales, q.zeros, 128, **cfg), ref) < 1e-2, cfg


@pytest.mark.parametrize("m", [1, 2, 16, 64, 256, 600])
def test_every_int8_candidate_matches_its_reference(m):
    """int8_matmul's tuning candidates at 1-2 rows (GEMV tiles) and many (swap-AB and plain GEMM tiles, the limbs)."""
    import triton

    from engine.quant.int8 import Int8Linear, int8_linear_reference
    from engine.quant.triton_int8 import (_launch, gemm_candidates, gemv_candidates, mm_candidates, num_sms,
                                          words_candidates)
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 1536, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = int8_linear_reference(x.float(), q.weight_int8, q.scales)
    sms = num_sms(x.device)
    if m <= 2:
        cands = gemv_candidates(dict(gemv=True), sms, m, 1536, triton.cdiv(4096, 256), "block_k")
        cands += words_candidates(m, 1536, 4096, sms)
    else:
        from engine.quant.triton_int8_limbs import limbs_candidates
        cands = mm_candidates(m, 1536, triton.cdiv(4096, 128), sms, "block_k", (128,)) + gemm_candidates(
            m, 1536, 4096, sms) + gemm_candidates(m, 1536, 4096, sms, asm=True) + limbs_candidates(m, 1536, 4096, sms)
    for cfg in cands:
        assert rel_err(_launch(x, q.weight_int8, q.scales, **cfg), ref) < 1e-2, cfg


@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_every_fp8_gemm_candidate_matches_the_oracle(m):
    from engine.quant.fp8 import Fp8Linear, fp8_linear_reference, fp8_supported
    from engine.quant.triton_fp8 import fp8_quantize_per_token
    from engine.quant.triton_fp8_gemm import _fp8_launch, fp8_candidates
    from engine.quant.triton_int8 import num_sms
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores")
    lin = torch.nn.Linear(4096, 1536, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    f8 = Fp8Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = fp8_linear_reference(x.float(), f8.weight_fp8, f8.weight_scale.view(-1))
    xq, xs = fp8_quantize_per_token(x)
    for cfg in fp8_candidates(m, 1536, 4096, num_sms(x.device)):
        out = _fp8_launch(xq, xs, f8.weight_fp8, f8.weight_scale, torch.bfloat16, **cfg)
        assert rel_err(out, ref) < 1e-2, cfg


def test_int8_embedding_under_int4_runs_in_cuda_graphs():
    from transformers import LlamaConfig

    from engine import LLM, EngineConfig, SamplingParams
    from engine.quant import Int8Embedding
    hf = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg = EngineConfig(max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.3, quantization="int4")
    llm = LLM.random(hf, cfg.replace(enforce_eager=True), dtype=torch.bfloat16)
    assert isinstance(llm.model.embed_tokens, Int8Embedding)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    eager = [o.token_ids for o in llm.generate([[1, 2, 3], [4, 5]], params)]
    llm.reconfigure(cfg)
    assert [o.token_ids for o in llm.generate([[1, 2, 3], [4, 5]], params)] == eager


MMA_CASES = [(m, torch.bfloat16) for m in (1, 5, 16, 33, 64, 100, 256)] + [(16, torch.float16), (256, torch.float16)]


@pytest.mark.parametrize("m,dtype", MMA_CASES)
def test_int4_mma_candidates_match_dequantize_then_matmul(m, dtype):
    """Every triton_int4_mma config the tuner may time at these rows (bf16: MAGIC 128, fp16: 1024),
    compiled for this GPU, against dequantize-then-matmul; N off every column tile (1000)."""
    from engine.quant.int4 import Int4Linear, int4_linear_reference
    from engine.quant.triton_int4 import _launch, candidates
    from engine.quant.triton_int8 import num_sms
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 1000, bias=False, device="cuda", dtype=dtype)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    ref = int4_linear_reference(x.float(), q.qweight, q.scales, q.zeros)
    cands = [c for c in candidates(m, 1000, 4096, 128, num_sms(x.device), asm=True) if c.get("kernel") == "mma"]
    assert cands
    for cfg in cands:
        for _ in range(2):  # the serial split-K counters are reset for the next launch
            assert rel_err(_launch(x, q.packed, q.scales, q.zeros, 128, **cfg), ref) < 1e-2, cfg


@pytest.mark.parametrize("fmt", ["awq", "gptq_act_order"])
def test_int4_mma_on_checkpoint_layers_in_bf16(fmt):
    """AWQ (through its Hub tensors) and GPTQ act-order layers (zero points 1..16, permuted features)
    through the mma kernel, both orientations, against the layer's dequantized weight."""
    from engine.quant.checkpoint import awq_to_int4, int4_to_awq
    from engine.quant.int4 import Int4Linear, quantize_int4
    from engine.quant.triton_int4 import int4_matmul
    g = torch.Generator().manual_seed(11)
    n, k, group = 1536, 4096, 128
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g) * 0.02, group, torch.bfloat16)
    if fmt == "awq":
        layer = awq_to_int4(**int4_to_awq(Int4Linear(qweight, scales, zeros, None, group)))
    else:
        zeros = torch.randint(1, 17, zeros.shape, generator=g).to(torch.uint8)
        layer = Int4Linear(qweight, scales, zeros, None, group, perm=torch.randperm(k, generator=g))
    layer = layer.cuda()
    for m in (16, 64, 256):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xp = x if layer.perm is None else x.index_select(1, layer.perm)
        ref = x.float() @ layer.dequantized_weight().t()
        for cfg in (dict(block_m=16, block_n=128, block_k=128, split_k=4, serial=True, swap=True, fold=True),
                    dict(block_m=64, block_n=128, block_k=64, swap=False, fold=False),
                    dict(block_m=64, block_n=64, block_k=128, layout="pairs", fold=False, x_perm=True, asm=True)):
            out = int4_matmul(xp, layer.packed, layer.scales, layer.zeros, group, gemv=False, kernel="mma", **cfg)
            assert rel_err(out, ref) < 1e-2, (m, cfg)


@pytest.mark.parametrize("m,dtype", MMA_CASES)
def test_int8_mma_candidates_match_reference(m, dtype):
    """Every triton_int8_mma config the tuner may time (inline-PTX unpack, float16 MMA; bfloat16 x
    scaled into float16) against the int8 reference; N off every column tile (1000)."""
    from engine.quant.int8 import Int8Linear, int8_linear_reference
    from engine.quant.triton_int8 import _launch, num_sms
    from engine.quant.triton_int8_mma import mma8_candidates
    torch.manual_seed(m)
    lin = torch.nn.Linear(4096, 1000, bias=False, device="cuda", dtype=dtype)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    ref = int8_linear_reference(x.float(), q.weight_int8, q.scales)
    cands = mma8_candidates(m, 1000, 4096, num_sms(x.device), asm=True)
    assert cands
    for cfg in cands:
        for _ in range(2):  # the serial split-K counters are reset for the next launch
            assert rel_err(_launch(x, q.weight_int8, q.scales, **cfg), ref) < 1e-2, cfg
    if dtype == torch.bfloat16:  # bfloat16 x beyond float16's range (up to ~1e5) is scaled into it
        big = x * 2e4
        assert rel_err(_launch(big, q.weight_int8, q.scales, **cands[0]), ref * 2e4) < 1e-2


def assert_codes_near(codes, scales, ref_codes, ref_scales):
    """Fused quantization against quantize_fp8_per_token of the unfused kernels' 16-bit output: the
    norm's sum of squares runs in another reduction order here, so a value on a rounding boundary may
    land one e4m3 step away; at most 0.1% of the codes, each within that step of the reference value."""
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == ref_codes.shape and scales.shape == ref_scales.shape
    assert torch.allclose(scales, ref_scales, rtol=2 ** -7, atol=0)  # one bf16 ulp of the row's absmax
    assert (codes.view(torch.uint8) != ref_codes.view(torch.uint8)).float().mean().item() <= 1e-3
    ref = ref_codes.float() * ref_scales
    # one step is <= 2^-3 of a normal value (2^-9 of the scale for a subnormal), plus the scales' gap
    assert ((codes.float() * scales - ref).abs() <= 0.14 * ref.abs() + 2 ** -8 * ref_scales).all()


@pytest.mark.parametrize("t", [1, 64, 300])
@pytest.mark.parametrize("n,inter", [(4096, 14336), (8192, 28672)])  # Llama-3.1-8B, -70B: 28672 in passes
def test_fused_fp8_quant_kernels_match_the_unfused_ones_and_replay_in_a_cuda_graph(n, inter, t):
    from engine.kernels.triton_fused import add_rms_norm_triton, silu_and_mul_triton
    from engine.quant.fp8 import quantize_fp8_per_token
    from engine.quant.triton_fp8 import add_rms_norm_fp8, silu_and_mul_fp8
    torch.manual_seed(t)
    x = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(t, n, device="cuda", dtype=torch.bfloat16) * 4
    weight = 1 + 0.1 * torch.randn(n, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(t, 2 * inter, device="cuda", dtype=torch.bfloat16) * 2
    x[0, 5] = 300.0  # an outlier in the norm's input and in a SwiGLU product
    h[0, 3], h[0, inter + 3] = 20.0, 50.0
    for res in (None, residual):
        codes, scales, res_out = add_rms_norm_fp8(x, res, weight, 1e-5)
        normed, ref_res = add_rms_norm_triton(x, res, weight, 1e-5)
        assert torch.equal(res_out, ref_res)
        assert_codes_near(codes, scales, *quantize_fp8_per_token(normed))
    codes, scales = silu_and_mul_fp8(h)
    assert_codes_near(codes, scales, *quantize_fp8_per_token(silu_and_mul_triton(h)))

    # CUDA graphs: no host reads; a replay on new inputs gives what an eager call gives
    outs = {}
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        add_rms_norm_fp8(x, residual, weight, 1e-5)  # compile outside the capture
        silu_and_mul_fp8(h)
        with torch.cuda.graph(graph, stream=stream):
            outs["norm"] = add_rms_norm_fp8(x, residual, weight, 1e-5)
            outs["silu"] = silu_and_mul_fp8(h)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn_like(x))
    h.copy_(torch.randn_like(h))
    graph.replay()
    torch.cuda.synchronize()
    eager = {"norm": add_rms_norm_fp8(x, residual, weight, 1e-5), "silu": silu_and_mul_fp8(h)}
    for got, expect in ((outs[k], eager[k]) for k in outs):
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, expect))


@pytest.mark.parametrize("m", [1, 64, 256])
def test_fp8_linear_on_fused_swiglu_quantization_matches_its_oracle(m):
    """forward_quantized on silu_and_mul_fp8's codes (the tuned GEMM) against the float oracle of the
    Linear on the unfused SwiGLU output."""
    from engine.kernels.reference import silu_and_mul_reference
    from engine.quant.fp8 import Fp8Linear, fp8_linear_reference, fp8_supported
    from engine.quant.triton_fp8 import silu_and_mul_fp8
    if not fp8_supported(torch.device("cuda")):
        pytest.skip("no fp8 tensor cores")
    lin = torch.nn.Linear(14336, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    f8 = Fp8Linear.from_linear(lin)
    h = torch.randn(m, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = f8.forward_quantized(*silu_and_mul_fp8(h), torch.bfloat16)
        ref = fp8_linear_reference(silu_and_mul_reference(h).float(), f8.weight_fp8, f8.weight_scale.view(-1))
    assert out.shape == (m, 4096) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
