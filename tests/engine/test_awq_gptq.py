"""AWQ and GPTQ: GPTQ's blocked Cholesky update against the paper's column-by-column formula with an
explicitly eliminated inverse Hessian, AWQ's scale folding and searches, the int4 kernels on layers
from AWQ/GPTQ checkpoints (Triton's CPU interpreter) against dequantize-then-matmul, and the engine
running quantization="awq"/"gptq"."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.quant.awq import fake_quant, scale_plan, search_clip, search_scale  # noqa: E402
from engine.quant.checkpoint import awq_to_int4, gptq_to_int4, save_quantized  # noqa: E402
from engine.quant.gptq import gptq_quantize_weight, group_params  # noqa: E402
from engine.quant.int4 import Int4Linear  # noqa: E402
from engine.quant.int8 import Int8Linear  # noqa: E402
from engine.quant.packing import pack_awq, pack_last, pack_rows  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


# --- GPTQ against the paper's formula -----------------------------------------------------------

def gptq_direct(W, H, group, act_order, sym, percdamp=0.01, static_groups=False, mse_grid=0):
    """GPTQ as the paper states it, with no Cholesky and no blocks: for each column q in order,
    quantize it, spread err = (w_q - quant(w_q)) / [H_F^-1]_qq over the remaining columns F through
    [H_F^-1]_{q,F}, and remove q from the inverse by Gaussian elimination. Group parameters are
    min/max of the group's (updated) weights when its first column comes up; with mse_grid, per row
    the shrink p of that range (p = 1 - i / mse_grid, i < 0.8 mse_grid, the first best) whose
    sum |w - q(w)|^2.4 is least."""
    W, H = W.double().clone(), H.double().clone()
    n, k = W.shape

    def range_params(lo, hi):
        if sym:
            scale = 2 * torch.maximum(lo.abs(), hi.abs()) / 15
            return scale, torch.full_like(scale, 8.0)
        scale = (hi - lo) / 15
        return scale, torch.round(-lo / scale).clamp(1, 15)

    def params(g):
        lo, hi = g.min(1).values, g.max(1).values
        if not mse_grid:
            return range_params(lo, hi)
        scale, zero = torch.empty_like(lo), torch.empty_like(lo)
        for r in range(g.shape[0]):
            errs = []
            for i in range(int(0.8 * mse_grid)):
                s, z = range_params(lo[r:r + 1] * (1 - i / mse_grid), hi[r:r + 1] * (1 - i / mse_grid))
                deq = ((torch.round(g[r] / s) + z).clamp(0, 15) - z) * s
                errs.append(((deq - g[r]).abs() ** 2.4).sum().item())
            best = errs.index(min(errs))
            s, z = range_params(lo[r:r + 1] * (1 - best / mse_grid), hi[r:r + 1] * (1 - best / mse_grid))
            scale[r], zero[r] = s[0], z[0]
        return scale, zero

    static = [params(W[:, i:i + group]) for i in range(0, k, group)]  # from the unquantized weights
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros((n, k), dtype=torch.float64)
    for q in range(k):
        if static_groups:
            scale, zero = static[int(perm[q]) // group]
        elif q % group == 0:
            scale, zero = params(W[:, q:q + group])
        c = (torch.round(W[:, q] / scale) + zero).clamp(0, 15)
        codes[:, q] = c
        err = (W[:, q] - (c - zero) * scale) / Hinv[q, q]
        W[:, q + 1:] -= err[:, None] * Hinv[q, q + 1:][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    if static_groups:  # back to the natural order
        natural = torch.empty_like(codes)
        natural[:, perm] = codes
        return natural, None
    return codes, (perm if act_order else None)


def correlated_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    scale = torch.linspace(0.2, 3.0, k, dtype=torch.float64)[torch.randperm(k, generator=gen)]
    return (torch.randn(t, k, generator=gen, dtype=torch.float64) @ mix) * scale


@pytest.mark.parametrize("act_order,sym,block,static,mse", [
    (False, False, 24, False, 0), (True, False, 16, False, 0), (True, True, 64, False, 0), (False, True, 128, False, 0),
    (True, False, 24, True, 0), (False, False, 24, False, 20), (True, True, 16, False, 20), (True, False, 24, True, 20)])
def test_gptq_blocked_update_matches_the_papers_formula(act_order, sym, block, static, mse):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(12, 64, generator=gen, dtype=torch.float64) * 0.05
    X = correlated_inputs(256, 64)
    H = X.t() @ X / 256
    codes, scales, zeros, perm = gptq_quantize_weight(W, H, group_size=16, act_order=act_order, sym=sym,
                                                      block_size=block, static_groups=static, mse_grid=mse)
    ref_codes, ref_perm = gptq_direct(W, H, 16, act_order, sym, static_groups=static, mse_grid=mse)
    assert (perm is None) == (ref_perm is None) and (perm is None or torch.equal(perm, ref_perm))
    assert torch.equal(codes.double(), ref_codes)
    assert scales.dtype == torch.float64 and zeros.dtype == torch.uint8


def layer_error(W, Wq, X):
    return ((X @ (W - Wq).t()) ** 2).sum().item()


def test_gptq_beats_round_to_nearest_on_its_calibration_inputs():
    torch.manual_seed(0)
    W = torch.randn(64, 256) * 0.05
    X = correlated_inputs(1024, 256).float()
    H = X.t() @ X / 1024
    for act_order in (False, True):
        codes, scales, zeros, perm = gptq_quantize_weight(W, H, 128, act_order=act_order)
        from engine.quant.int4 import pack_int4
        layer = Int4Linear(pack_int4(codes), scales, zeros, None, 128, perm)
        rtn = fake_quant(W, 128)
        assert layer_error(W, layer.dequantized_weight(), X) < 0.7 * layer_error(W, rtn, X)


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_range_search_never_increases_a_groups_rounding_error(sym):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 128, generator=gen) * 0.05
    w[::7, 3] = 0.5  # outliers that stretch some rows' ranges: shrinking pays there
    errs = {}
    for grid in (0, 100):
        scale, zero = group_params(w, sym, torch.float32, grid)
        deq = ((torch.round(w / scale[:, None]) + zero[:, None]).clamp(0, 15) - zero[:, None]) * scale[:, None]
        errs[grid] = ((deq - w).abs() ** 2.4).sum(1)
    assert (errs[100] <= errs[0]).all() and (errs[100] < errs[0]).sum() > 32


# --- AWQ ----------------------------------------------------------------------------------------

def test_awq_scale_search_helps_layers_with_salient_input_channels():
    torch.manual_seed(0)
    W = torch.randn(96, 256) * 0.05
    x = torch.randn(1024, 256)
    x[:, :8] *= 30  # a few channels with large activations, as LLMs have
    s = search_scale(W, x, x.abs().mean(0), 128)
    awq = fake_quant(W * s, 128) / s
    assert layer_error(W, awq, x) < 0.8 * layer_error(W, fake_quant(W, 128), x)
    assert s[:8].mean() > s[8:].mean()  # the salient channels were scaled up


def test_awq_mlp_head_is_the_rest_of_the_mlp_and_the_scale_search_never_loses_to_rtn_through_it():
    from engine.kernels import TorchBackend
    from engine.quant.awq import _mlp_head
    llm = LLM.random(tiny_config(), EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32, seed=4)
    mlp = llm.model.layers[1].mlp
    head = _mlp_head(llm.model, "layers.1.mlp.gate_up_proj")
    assert _mlp_head(llm.model, "layers.1.mlp.down_proj") is None
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    x[:, :4] *= 20
    with torch.no_grad():
        assert torch.allclose(head(x @ mlp.gate_up_proj.weight.t()), mlp(x, TorchBackend()), atol=1e-5, rtol=1e-4)
        W = mlp.gate_up_proj.weight.detach()
        s = search_scale(W, x, x.abs().mean(0), 64, head=head)

        def mlp_error(wq):
            return (head(x @ wq.t()) - head(x @ W.t())).pow(2).mean().item()
        assert mlp_error(fake_quant(W * s, 64) / s) <= mlp_error(fake_quant(W, 64))


def test_awq_clip_search_never_increases_the_group_output_error():
    torch.manual_seed(1)
    W = torch.randn(40, 256) * 0.05
    W[:, 3] = 0.6  # outliers that stretch their groups' ranges
    x = torch.randn(256, 256)
    clipped = search_clip(W, x, 128)
    assert (clipped.abs() <= W.abs() + 1e-7).all()
    assert layer_error(W, fake_quant(clipped, 128), x) <= layer_error(W, fake_quant(W, 128), x)
    rows = torch.arange(40) >= 20
    only = search_clip(W, x, 128, rows)
    assert torch.equal(only[:20], W[:20])


def test_awq_scale_folding_keeps_the_float_model():
    llm = LLM.random(tiny_config(), EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32, seed=1)
    ids = [1, 7, 33, 90, 4, 18, 250, 3]
    before = llm.prompt_logits(ids)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index in range(len(llm.model.layers) + 1):
            for name, module, fold, slots in scale_plan(llm.model, index):
                size = module.in_features if slots is None else int(slots.max()) + 1
                s = torch.rand(size, generator=gen) * 3 + 0.2
                fold(s)
                module.weight.mul_(s if slots is None else s[slots])
    assert torch.allclose(llm.prompt_logits(ids), before, atol=1e-4, rtol=1e-4)


# --- the engine ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["awq", "gptq"])
def test_engine_runs_awq_and_gptq_calibrated_on_given_text(mode, tmp_path):
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)).tolist()
    llm = LLM.random(tiny_config(), EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32, seed=2)
    llm.calibration = calib
    ids = [1, 7, 33, 90, 4, 18, 250, 3]
    ref = llm.prompt_logits(ids).log_softmax(-1)
    kls = {}
    for m in ("int4", mode):
        llm.reconfigure(EngineConfig(device="cpu", max_model_len=256, quantization=m))
        assert all(isinstance(llm.model.get_submodule(n), Int4Linear)
                   for n in ("layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj"))
        assert isinstance(llm.model.lm_head, Int4Linear if m == "int4" else Int8Linear)  # LM_HEAD_MODE
        lp = llm.prompt_logits(ids).log_softmax(-1)
        kls[m] = torch.nn.functional.kl_div(lp, ref, log_target=True, reduction="batchmean").item()
    assert 0 < kls[mode] < 1.0  # a quantized model, close to the float one
    out = llm.generate([ids], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 5
    assert llm.engine.stats().quantization == mode
    # Saved in the method's Hub layout (the int8 head as the float weight it stands for) and loaded back.
    save_quantized(llm.model, tiny_config().to_dict(), tmp_path, mode)
    loaded = LLM.from_pretrained(tmp_path, EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32)
    assert loaded.config.quantization == mode
    assert torch.allclose(loaded.prompt_logits(ids), llm.prompt_logits(ids), atol=1e-4, rtol=1e-4)


def test_gptq_act_order_with_static_groups_saves_and_loads_the_same_weights(tmp_path):
    """desc_act quantization order with static groups: the layers keep the natural order (no g_idx
    permutation), and the Hub GPTQ folder loads back to the same dequantized weights and logits."""
    from engine.quant.gptq import gptq_quantize_model
    llm = LLM.random(tiny_config(), EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32, seed=3)
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1)).tolist()
    names = [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                           "mlp.gate_up_proj", "mlp.down_proj")]
    gptq_quantize_model(llm.model, names, calib, group_size=64, act_order=True, static_groups=True)
    assert all(llm.model.get_submodule(n).perm is None for n in names)
    ids = [1, 7, 33, 90, 4, 18, 250, 3]
    save_quantized(llm.model, tiny_config().to_dict(), tmp_path, "gptq")
    loaded = LLM.from_pretrained(tmp_path, EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32)
    assert loaded.config.quantization == "gptq"
    for n in names:
        assert torch.equal(loaded.model.get_submodule(n).dequantized_weight(),
                           llm.model.get_submodule(n).dequantized_weight())
    assert torch.allclose(loaded.prompt_logits(ids), llm.prompt_logits(ids), atol=1e-4, rtol=1e-4)


def test_bad_calibration_and_modes_are_clear_errors():
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="awq4")
    llm = LLM.random(tiny_config(), EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32)
    llm.calibration = [[1, 2, 999]]
    with pytest.raises(ValueError, match="calibration"):
        llm.reconfigure(EngineConfig(device="cpu", max_model_len=256, quantization="gptq"))
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids  # still usable


# --- one int4 kernel for int4, AWQ and GPTQ layers ----------------------------------------------

triton = pytest.importorskip("triton")


def awq_layer(k, n, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen)
    scales = torch.rand((k // group, n), generator=gen) * 0.02 + 0.001
    ref = ((codes.float() - zeros.repeat_interleave(group, 0).float()) * scales.repeat_interleave(group, 0)).t()
    return awq_to_int4(pack_awq(codes), pack_awq(zeros), scales), ref


def gptq_layer(k, n, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen)  # stored zero - 1
    scales = torch.rand((k // group, n), generator=gen) * 0.02 + 0.001
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)]
    ref = (scales[g_idx] * (codes.float() - zeros[g_idx].float() - 1)).t()
    return gptq_to_int4(pack_rows(codes), pack_last(zeros), scales, g_idx.int(), group), ref


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("m,kw", [(1, {}), (2, dict(split_k=2, block_n=16, chunks=4)), (5, {}),
                                  (17, dict(gemv=False, split_k=2, block_n=32, num_warps=4, num_stages=2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_kernel_on_checkpoint_layers_matches_dequantize_then_matmul(fmt, m, kw, dtype):
    from engine.quant.triton_int4 import int4_matmul
    layer, formula = (awq_layer if fmt == "awq" else gptq_layer)(384, 48, 128)
    assert torch.allclose(layer.dequantized_weight(), formula, atol=1e-7)
    layer = layer.to(DEVICE)
    layer.scales = layer.scales.to(dtype)
    ref_w = layer.dequantized_weight()  # with the scales rounded to dtype
    x = torch.randn(m, 384, device=DEVICE).to(dtype)
    xp = x if layer.perm is None else x.index_select(1, layer.perm)
    out = int4_matmul(xp, layer.packed, layer.scales, layer.zeros, layer.group_size, **kw)
    ref = x.float() @ ref_w.t()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and torch.allclose(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("m", [5, 40])
def test_every_tl_dot_tuning_candidate_computes_the_same_product(m):
    """tuning.pick may choose any candidate of the multi-row kernel on the GPU (split-K included)."""
    from engine.quant.triton_int4 import _launch, candidates
    layer, _ = awq_layer(1024, 40, 128, seed=3)
    layer = layer.to(DEVICE)
    x = torch.randn(m, 1024, device=DEVICE)
    ref = x @ layer.dequantized_weight().t()
    cands = candidates(m, 40, 1024, 128, 132)
    assert any(c.get("split_k", 1) > 1 for c in cands)
    for cfg in cands:
        out = _launch(x, layer.packed, layer.scales, layer.zeros, 128, **cfg)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), cfg
