"""The decode GEMV with its fused prologue (norm, SwiGLU, none) against the unfused torch ops, and the engine
running it end to end (CPU interpreter, float32/16)."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# (rows, N, K, tile): N not a multiple of the tile, K not a multiple of BLOCK_K (masked loads), K a multiple.
CASES = [(1, 40, 96, dict(block_n=8, block_k=64, num_warps=4)),
         (3, 33, 128, dict(block_n=16, block_k=64, num_warps=4)),
         (2, 24, 200, dict(block_n=4, block_k=128, num_warps=2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prologue", ["none", "norm", "norm_first_layer", "silu"])
@pytest.mark.parametrize("m,n,k,tile", CASES)
def test_gemv_matches_the_unfused_ops(m, n, k, tile, prologue, dtype):
    from engine.kernels.triton_gemv import gemv, gemv_reference
    g = torch.Generator().manual_seed(m * n + k)
    kind = "norm" if prologue.startswith("norm") else prologue
    x = torch.randn(m, 2 * k if kind == "silu" else k, generator=g).to(DEVICE, dtype)
    w = (0.05 * torch.randn(n, k, generator=g)).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if m == 3 else None
    kw = {}
    if kind == "norm":
        kw = dict(residual=None if prologue == "norm_first_layer" else torch.randn(m, k, generator=g).to(DEVICE, dtype),
                  norm_weight=(1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype), eps=1e-5)
    out = gemv(x, w, bias, kind, **kw, **tile)
    ref = gemv_reference(x, w, bias, kind, **kw)
    if kind == "norm":
        (out, res), (ref, ref_res) = out, ref
        torch.testing.assert_close(res, ref_res, atol=0, rtol=0)  # the new residual, bit for bit
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_only_plain_linears_at_decode_size_are_fused():
    from engine.kernels.triton_gemv import GEMV_MAX_ROWS, fusable
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(1, 64)
    assert fusable(x, lin, "norm")
    assert not fusable(torch.randn(GEMV_MAX_ROWS + 1, 64), lin, "norm")  # prefill / big batches: cuBLAS
    assert not fusable(x.half(), lin, "norm")
    hook = lin.register_forward_pre_hook(lambda mod, args: None)  # calibration must see the input
    assert not fusable(x, lin, "norm")
    hook.remove()

    class Sharded(torch.nn.Linear):  # e.g. the all-reducing RowParallelLinear
        pass
    assert not fusable(x, Sharded(64, 32), "silu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
def test_engine_with_the_fused_gemv_matches_the_torch_engine(monkeypatch):
    """Every decode step of up to GEMV_MAX_ROWS rows runs its norms and SwiGLU inside the GEMVs (the GEMV
    forced first among the candidates, as tuning would pick it on a GPU); the greedy tokens are the torch
    backend's."""
    from engine import LLM, EngineConfig, SamplingParams
    from engine.kernels import triton_gemv
    calls = []
    gemv = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "candidates", lambda: [dict(kernel="gemv", block_n=8, block_k=64, num_warps=4)])
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **kw: calls.append(a[3]) or gemv(*a, **kw))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 20, 37)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, block_size=8, num_gpu_blocks=64,
                                              max_num_batched_tokens=24, attention_backend=backend))
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]
    layers = llm.spec.num_layers
    assert calls.count("norm") >= 2 * layers * 5 and calls.count("silu") >= layers * 5  # every decode step fused
