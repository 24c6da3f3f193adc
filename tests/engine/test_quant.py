"""Quantization: each quantized linear against float references, the Triton dequantizing matmuls
against theirs (through Triton's CPU interpreter), quantize_model, the fp8 KV cache, and the engine
generating and reconfiguring across modes.

TRITON_INTERPRET is set before engine.quant.triton_* is imported (triton.jit picks the interpreter
when a kernel is decorated); where CUDA is present the kernel tests run compiled instead.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.kernels import AttentionMetadata, TorchBackend  # noqa: E402
from engine.kernels.reference import paged_attention_reference  # noqa: E402
from engine.model.weights import weight_bytes  # noqa: E402
from engine.quant import Fp8Linear, Int4Linear, Int8Embedding, Int8Linear, quantize_model  # noqa: E402
from engine.quant.fp8 import check_fp8_supported, fp8_linear_reference, quantize_fp8  # noqa: E402
from engine.quant.int4 import dequantize_int4, pack_int4, pack_int4_kernel, quantize_int4, unpack_int4  # noqa: E402
from engine.quant.int8 import dequantize_int8, quantize_int8  # noqa: E402
from engine.quant.kv_cache import quantize_kv, write_kv_fp8  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_linear(k: int, n: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.05)
        if bias:
            lin.bias.normal_(0.0, 0.05)
    return lin


def tiny_int4_config():
    """The tiny preset widened so every quantized input dim (64 * 2, 256) is a multiple of 128."""
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=1024,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


# --- formats and round trips -------------------------------------------------------------------

def test_int8_round_trip_error_is_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()  # the largest weight of each channel uses the full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_round_trip_error_is_half_a_step_per_group(dtype):
    torch.manual_seed(1)
    w = (torch.randn(24, 384) * 0.05 + torch.linspace(-0.1, 0.1, 384)).to(dtype)  # groups not centred on 0
    qweight, scales, zeros = quantize_int4(w)
    assert qweight.shape == (24, 192) and qweight.dtype == torch.uint8
    assert scales.shape == zeros.shape == (24, 3) and scales.dtype == dtype and zeros.max() <= 15
    err = (dequantize_int4(qweight, scales, zeros) - w.float()).abs().view(24, 3, 128)
    # Half a step; at the clamped top of the range also 15 x the scale's rounding to `dtype` (the stored
    # step can be short by a relative eps/2, so 15 steps fall short of max - min by 15 * eps/2 steps).
    slack = 15 * torch.finfo(dtype).eps / 2
    assert (err <= scales.float()[..., None] * (0.5 + slack) * (1 + 1e-5)).all()
    interior = err <= scales.float()[..., None] * 0.5 * (1 + 1e-5)
    assert interior.float().mean() > 0.99  # only codes clamped at the top may exceed half a step


def test_int4_packing_puts_even_features_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[1 | 2 << 4, 15, 7 | 8 << 4]]
    assert torch.equal(unpack_int4(packed), codes)


# --- quantized linears against float references -------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_its_dequantized_weights_and_stays_near_float(bias):
    lin = make_linear(256, 96, bias)
    x = torch.randn(5, 3, 256)
    qlin = Int8Linear.from_linear(lin)
    ref = F.linear(x, dequantize_int8(qlin.weight_int8, qlin.scales), lin.bias)
    out = qlin(x)
    assert out.shape == (5, 3, 96)
    assert rel_err(out, ref) < 1e-5
    # Per-channel int8: rounding error ~ step / sqrt(12) with step = max|w| / 127, about 0.5% of the output.
    assert 1e-4 < rel_err(out, lin(x).detach()) < 0.015


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_its_dequantized_weights_and_stays_near_float(bias):
    lin = make_linear(256, 96, bias)
    x = torch.randn(7, 256)
    qlin = Int4Linear.from_linear(lin)
    ref = F.linear(x, dequantize_int4(qlin.qweight, qlin.scales, qlin.zeros), lin.bias)
    out = qlin(x)
    assert rel_err(out, ref) < 1e-5
    # 16 levels over each group's range: ~8-10% relative error on Gaussian weights.
    assert 0.02 < rel_err(out, lin(x).detach()) < 0.15


def test_fp8_weights_and_reference_stay_near_float():
    lin = make_linear(256, 64)
    x = torch.randn(6, 256)
    w8, s = quantize_fp8(lin.weight)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert rel_err(w8.float() * s[:, None], lin.weight) < 0.04  # 3 mantissa bits: ~2-3% per element
    assert 1e-3 < rel_err(fp8_linear_reference(x, w8, s), lin(x).detach()) < 0.06


def test_fp8_on_the_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"quantization='fp8'.*compute capability >= 8.9"):
        check_fp8_supported(torch.device("cpu"))
    with pytest.raises(ValueError, match="quantization='fp8'"):
        Fp8Linear.from_linear(make_linear(64, 32))


# --- Triton kernels against their references ----------------------------------------------------

triton = pytest.importorskip("triton")
DTYPES = [torch.float32, torch.float16]
# (rows, out features, in features, launch overrides): GEMV with and without split-K, the tl.dot path,
# ragged N, several K slices of unequal length.
INT8_CASES = [(1, 48, 256, {}), (2, 40, 384, dict(split_k=3, block_n=16, block_k=64)),
              (5, 72, 256, {}), (33, 64, 128, dict(gemv=True))]
INT4_CASES = [(1, 48, 256, {}), (2, 40, 384, dict(split_k=2, block_n=16, chunks=4)),
              (1, 24, 512, dict(chunks=8, split_k=1)), (5, 72, 256, {}), (33, 64, 128, {})]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,kw", INT8_CASES)
def test_int8_triton_matmul_matches_reference(m, n, k, kw, dtype):
    from engine.quant.int8 import int8_linear_reference
    from engine.quant.triton_int8 import int8_matmul
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    out = int8_matmul(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), **kw)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out.cpu(), int8_linear_reference(x, q, s)) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,kw", INT4_CASES)
def test_int4_triton_matmul_matches_reference(m, n, k, kw, dtype):
    from engine.quant.int4 import int4_linear_reference
    from engine.quant.triton_int4 import int4_matmul
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    qweight, scales, zeros = quantize_int4((torch.randn(n, k, generator=g) * 0.05).to(dtype))
    out = int4_matmul(x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), **kw)
    assert out.dtype == dtype and out.shape == (m, n)
    # The tl.dot path rounds dequantized weights to x's dtype before the product.
    assert rel_err(out.cpu(), int4_linear_reference(x, qweight, scales, zeros)) < \
        (1e-5 if dtype == torch.float32 else 2e-3)


def test_every_tuning_candidate_computes_the_same_product():
    """tuning.pick may choose any GEMV candidate on the GPU; each must be correct (split-K, pipelined, mm)."""
    from engine.quant.int4 import int4_linear_reference
    from engine.quant.int8 import int8_linear_reference
    from engine.quant.triton_int4 import _launch as int4_launch
    from engine.quant.triton_int4 import candidates as int4_candidates
    from engine.quant.triton_int8 import _launch as int8_launch
    from engine.quant.triton_int8 import gemv_candidates
    g = torch.Generator().manual_seed(7)
    n, k = 24, 1024
    x = torch.randn(1, k, generator=g).to(DEVICE)
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = (t.to(DEVICE) for t in quantize_int8(w))
    qw, sc, z = (t.to(DEVICE) for t in quantize_int4(w))
    packed = pack_int4_kernel(qw)
    ref8 = int8_linear_reference(x.cpu(), q.cpu(), s.cpu())
    ref4 = int4_linear_reference(x.cpu(), qw.cpu(), sc.cpu(), z.cpu())
    cands8 = gemv_candidates({}, 132, 1, n, 4, "block_k")
    cands4 = int4_candidates(1, n, k, 128, 132)
    assert any(c.get("split_k", 1) > 1 for c in cands8) and any(c.get("num_stages", 1) > 1 for c in cands8)
    assert any(c["split_k"] > 1 for c in cands4) and any(c.get("serial") for c in cands4)
    assert any(c.get("serial") for c in cands8)
    for cfg in cands8:
        assert rel_err(int8_launch(x, q, s, **cfg).cpu(), ref8) < 1e-5, cfg
    for cfg in cands4:
        assert rel_err(int4_launch(x, packed, sc, z, 128, **cfg).cpu(), ref4) < 1e-5, cfg


# --- quantize_model -----------------------------------------------------------------------------

def test_quantize_model_swaps_decoder_linears_and_the_head_and_counts_their_bytes():
    llm = LLM.random(tiny_int4_config(), EngineConfig(device="cpu", max_model_len=64))
    model = llm.model
    vocab, hidden = model.embed_tokens.weight.shape
    embed_bytes = vocab * hidden + vocab * 4  # an untied table: int8 + a float32 scale per row
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = weight_bytes(model)
    after = quantize_model(model, "int4")
    assert isinstance(model.layers[1].mlp.down_proj, Int4Linear) and isinstance(model.lm_head, Int4Linear)
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.dtype == torch.float32
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # Packed codes (K/2 bytes) + a float32 scale and a uint8 zero per group of 128, per output channel.
    quantized = sum(n * (k // 2 + (k // 128) * (4 + 1)) for k, n in linears.values())
    norms = sum(p.numel() * 4 for name, p in model.named_parameters() if "norm" in name)
    assert after == weight_bytes(model) == embed_bytes + norms + quantized
    assert after < 0.3 * before  # float32 -> ~4.3 bits, the embedding table 8 bits


def test_tied_lm_head_is_left_in_float(hf_models):
    llm = LLM.from_hf_model(hf_models["qwen2"], EngineConfig(device="cpu", max_model_len=64, quantization="int8"))
    assert isinstance(llm.model.lm_head, nn.Linear) and llm.model.lm_head.weight is llm.model.embed_tokens.weight
    assert isinstance(llm.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert llm.model.layers[0].self_attn.qkv_proj.bias is not None  # qwen2's qkv bias survives
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 12


def test_int4_with_an_input_dim_off_the_group_size_names_the_layer():
    with pytest.raises(ValueError, match=r"group size 128.*layers\.0\.self_attn\.qkv_proj has in_features=64"):
        LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, quantization="int4"))
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    before = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    with pytest.raises(ValueError, match="group size 128"):
        llm.reconfigure(llm.config.replace(quantization="int4"))
    assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids == before  # untouched by the failed reconfigure


def test_fp8_weights_on_the_cpu_fail_before_any_change():
    with pytest.raises(ValueError, match="quantization='fp8'"):
        LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, quantization="fp8"))
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    with pytest.raises(ValueError, match="quantization='fp8'"):
        llm.reconfigure(llm.config.replace(quantization="fp8"))
    assert llm.config.quantization is None and len(llm.generate([[1, 2]], GREEDY)[0].token_ids) == 12


# --- the engine across modes --------------------------------------------------------------------

def test_reconfigure_none_int8_none_gives_back_the_original_tokens():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    prompts = [[5, 6, 7], [100, 200, 300, 400, 17]]
    original = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    bf_bytes = llm.engine.stats().weight_bytes
    llm.reconfigure(llm.config.replace(quantization="int8"))
    st = llm.engine.stats()
    assert st.quantization == "int8" and isinstance(llm.model.layers[0].mlp.gate_up_proj, Int8Linear)
    assert st.weight_bytes < 0.45 * bf_bytes  # float32 -> int8, embeddings kept in float32
    quantized = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert all(len(t) == 12 for t in quantized)
    llm.reconfigure(llm.config.replace(quantization=None))
    assert isinstance(llm.model.layers[0].mlp.gate_up_proj, nn.Linear)
    assert llm.engine.stats().weight_bytes == bf_bytes
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == original


def test_int4_engine_generates_and_int8_to_int4_requantizes_from_the_host_copy():
    llm = LLM.random(tiny_int4_config(), EngineConfig(device="cpu", max_model_len=64, quantization="int4"))
    assert isinstance(llm.model.lm_head, Int4Linear)
    out = llm.generate([[5, 6, 7], [9]], GREEDY)
    assert [len(o.token_ids) for o in out] == [12, 12]
    llm.reconfigure(llm.config.replace(quantization="int8"))
    assert isinstance(llm.model.lm_head, Int8Linear)
    llm.reconfigure(llm.config.replace(quantization="int4"))
    assert [o.token_ids for o in llm.generate([[5, 6, 7], [9]], GREEDY)] == [o.token_ids for o in out]


# --- fp8 KV cache -------------------------------------------------------------------------------

def prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one prompt run as a single prefill through the engine's paged cache."""
    runner, bs = llm.engine.runner, llm.config.block_size
    t = len(ids)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t), query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        block_tables=torch.arange(-(-t // bs), dtype=torch.int32)[None], num_decodes=0, max_query_len=t,
        max_seq_len=t, query_start_loc_cpu=[0, t], seq_lens_cpu=[t])
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids), torch.arange(t), runner.kv_caches, meta, runner.backend)
        return runner.model.compute_logits(hidden)


def test_kv_fp8_halves_bytes_per_token_and_doubles_blocks():
    cfg = EngineConfig(device="cpu", max_model_len=64, enable_prefix_caching=False)
    llm = LLM.random("tiny", cfg, dtype=torch.bfloat16)
    base = llm.engine.stats()
    llm.reconfigure(cfg.replace(kv_cache_dtype="fp8"))
    st = llm.engine.stats()
    assert st.kv_cache_dtype == "fp8" and llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert st.kv_bytes_per_token * 2 == base.kv_bytes_per_token
    assert st.num_gpu_blocks >= 1.99 * base.num_gpu_blocks
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 12


def test_kv_fp8_logits_stay_close_to_the_float_cache(hf_models):
    # The conftest's llama has larger weights than the presets' random init, so its greedy choices
    # are well separated and agreement measures the cache, not ties between near-equal logits.
    cfg = EngineConfig(device="cpu", max_model_len=128, block_size=8, enable_prefix_caching=False)
    llm = LLM.from_hf_model(hf_models["llama"], cfg)
    ids = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = prefill_logits(llm, ids)
    llm.reconfigure(cfg.replace(kv_cache_dtype="fp8"))
    out = prefill_logits(llm, ids)
    assert 0 < rel_err(out, ref) < 0.05
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 1e-3
    # Next-token choices from the same contexts (greedy runs diverge for good after one flip).
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert len(llm.generate([ids[:10]], GREEDY)[0].token_ids) == 12


def test_kv_fp8_scales_fold_into_attention():
    """A cache written with scales (k 0.5, v 4) attends like the float cache of its dequantized codes."""
    g = torch.Generator().manual_seed(0)
    num_blocks, bs, h, d, t = 4, 8, 2, 16, 20
    key, value = torch.randn(t, h, d, generator=g), torch.randn(t, h, d, generator=g) * 10
    k_cache = torch.zeros(num_blocks, bs, h, d, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    write_kv_fp8(key, value, k_cache, v_cache, slots, 0.5, 4.0)
    flat_v = v_cache.view(-1, h, d)[slots].float() * 4.0
    assert torch.equal(v_cache.view(-1, h, d)[slots].view(torch.uint8), quantize_kv(value, 4.0).view(torch.uint8))
    assert rel_err(flat_v, value) < 0.04
    # One request at positions 0..t-1 in blocks 0..3 (slot p = position p), the last 3 tokens new.
    k_cache2, v_cache2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    write_order = torch.arange(t)
    write_kv_fp8(key, value, k_cache2, v_cache2, write_order, 0.5, 4.0)
    table = torch.arange(num_blocks, dtype=torch.int32)[None]
    q = torch.randn(3, h * 2, d, generator=g)
    meta = AttentionMetadata(slot_mapping=write_order[-3:], query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
                             seq_lens=torch.tensor([t], dtype=torch.int32), block_tables=table, num_decodes=0,
                             max_query_len=3, max_seq_len=t, query_start_loc_cpu=[0, 3], seq_lens_cpu=[t],
                             k_scale=0.5, v_scale=4.0)
    out = TorchBackend().attend(q, k_cache2, v_cache2, meta, d ** -0.5)
    ref = paged_attention_reference(q, k_cache2.float() * 0.5, v_cache2.float() * 4.0, meta, d ** -0.5)
    assert rel_err(out, ref) < 1e-5


def test_compact_on_device_gives_every_tensor_new_storage_and_keeps_ties_types_and_outputs():
    """compact_on_device moves the model's tensors out and back (on CUDA, into fresh segments): every tensor gets new
    storage with the same values, parameters stay parameters (requires_grad kept), buffers stay buffers, tensors two
    modules share stay shared, and the quantized model computes the same logits."""
    from engine.quant import compact_on_device
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, num_gpu_blocks=32, block_size=8,
                                          quantization="int8"))
    model = llm.model
    model.lm_head.register_buffer("shared", model.layers[0].mlp.gate_up_proj.scales)  # ties across modules
    model.lm_head.tied_norm = model.norm.weight
    ids = torch.arange(5)
    before = model.lm_head(model.embed_tokens(ids))
    reference = [(n, t, t.clone(), type(t), t.requires_grad) for n, t in model.state_dict(keep_vars=True).items()]
    assert compact_on_device(model, torch.device("cpu"))
    state = model.state_dict(keep_vars=True)
    for name, old, value, kind, grad in reference:  # (the host may hand a freed address out again: not compared)
        t = state[name]
        assert t is not old and type(t) is kind and t.requires_grad == grad and torch.equal(t, value), name
    assert model.lm_head.shared is model.layers[0].mlp.gate_up_proj.scales
    assert model.lm_head.tied_norm is model.norm.weight and isinstance(model.norm.weight, nn.Parameter)
    assert torch.equal(model.lm_head(model.embed_tokens(ids)), before)


def test_compact_on_device_leaves_views_of_one_storage_in_place():
    """Two modules holding different views of one storage would each get a copy of their own: they stay put, and
    the rest still moves."""
    from engine.quant import compact_on_device
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    base = torch.arange(16.0)
    model[0].register_buffer("a", base[:8])
    model[1].register_buffer("b", base[8:])
    weight = model[0].weight
    assert compact_on_device(model, torch.device("cpu"))
    assert model[0].a.untyped_storage().data_ptr() == model[1].b.untyped_storage().data_ptr() == \
        base.untyped_storage().data_ptr()
    assert model[0].weight is not weight and torch.equal(model[0].weight, weight)
