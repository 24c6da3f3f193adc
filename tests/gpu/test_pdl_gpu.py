"""Programmatic dependent launch (engine/kernels/pdl.py) on the GPU.

A chain of MLP blocks where every kernel reads what the kernel before it wrote (norm -> gate_up GEMV ->
SwiGLU -> down GEMV -> next block's norm), captured in a CUDA graph with PDL launches and the norm / SwiGLU
kernels releasing early, gives bit for bit what the same chain of plain launches gives,
for each GEMV that launches with PDL (bf16 with its fused prologues, the int8 word GEMV and the int4 GEMV,
both with split-K reduced in the kernel). A GEMV that read its input before `gdc_wait` would race the
kernel before it. Plain launches are checked against torch's matmuls first. And an engine with
ENGINE_PDL=1 decodes the shipped model's greedy tokens as one with ENGINE_PDL=0 does.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                reason="needs CUDA sm_90+ (programmatic dependent launch)")

HIDDEN, INTER, BLOCKS = 1024, 2048, 6
MODEL = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"


def _weights(kind, n, k, gen):
    from engine.quant.int4 import dequantize_int4, pack_int4_kernel, quantize_int4
    w = torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5
    if kind == "bf16":
        return (w.to(torch.bfloat16),), w.to(torch.bfloat16).float()
    if kind == "int8":
        scale = w.abs().amax(1) / 127
        q = torch.clamp((w / scale[:, None]).round(), -127, 127).to(torch.int8)
        return (q, scale), q.float() * scale[:, None]
    q, s, z = quantize_int4(w, 128, scale_dtype=torch.bfloat16)
    return (pack_int4_kernel(q), s, z), dequantize_int4(q, s, z)


def _chain(kind, blocks, x, norm_w, pdl):
    """BLOCKS MLP blocks over x [1, HIDDEN]; pdl: PDL launches and early releases, or neither."""
    from engine.kernels.triton_fused import add_rms_norm_triton, silu_and_mul_triton
    from engine.kernels.triton_gemv import gemv
    from engine.quant import triton_int4, triton_int8
    flags = dict(pdl=pdl)

    def linear(a, w, prologue="none", residual=None):
        if kind == "bf16":
            return gemv(a, w[0], None, prologue, residual, norm_w if prologue == "norm" else None, 1e-5,
                        block_n=8, block_k=512, **flags)
        if kind == "int8":
            return triton_int8._launch(a, *w, kernel="words", block_n=32, block_k=256, split_k=4, serial=True,
                                       **flags)
        return triton_int4._launch(a, *w, 128, gemv=True, block_n=64, chunks=4, split_k=4, serial=True, **flags)

    residual = torch.zeros_like(x)
    for gate_up, down in blocks:
        if kind == "bf16":
            h, residual = linear(x, gate_up, "norm", residual)
            x = linear(h, down, "silu")
        else:
            a, residual = add_rms_norm_triton(x, residual, norm_w, 1e-5, release_early=pdl)
            x = linear(silu_and_mul_triton(linear(a, gate_up), release_early=pdl), down)
    return x


def _reference(blocks, x, norm_w):
    residual = torch.zeros_like(x, dtype=torch.float32)
    x = x.float()
    for gate_up, down in blocks:
        residual = x + residual
        a = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.float()
        h = a @ gate_up.t()
        x = (F.silu(h[:, :INTER]) * h[:, INTER:]) @ down.t()
    return x


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_pdl_chain_in_a_cuda_graph_equals_plain_launches(kind):
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = [(_weights(kind, 2 * INTER, HIDDEN, gen), _weights(kind, HIDDEN, INTER, gen)) for _ in range(BLOCKS)]
    kernel_w = [(g[0], d[0]) for g, d in blocks]
    x = torch.randn(1, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
    norm_w = (torch.rand(HIDDEN, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)

    plain = _chain(kind, kernel_w, x, norm_w, pdl=False)
    ref = _reference([(g[1], d[1]) for g, d in blocks], x, norm_w)
    assert ((plain.float() - ref).norm() / ref.norm()).item() < 3e-2

    outs = {}
    for pdl in (False, True):
        _chain(kind, kernel_w, x, norm_w, pdl)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(kind, kernel_w, x, norm_w, pdl)
        for _ in range(20):  # replays back to back: a race would show in some of them
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, plain), (kind, pdl)
        outs[pdl] = out.clone()
    assert torch.equal(outs[True], outs[False])


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_engine_decodes_the_same_tokens_with_and_without_pdl(monkeypatch, quantization):
    from engine import LLM, EngineConfig, SamplingParams
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 4096, (20 + 7 * i,), generator=gen).tolist() for i in range(3)]
    tokens = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("ENGINE_PDL", flag)
        cfg = EngineConfig(max_model_len=256, block_size=16, num_gpu_blocks=64, quantization=quantization)
        llm = LLM.from_pretrained(MODEL, cfg, dtype=torch.float32 if quantization is None else torch.bfloat16)
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        assert any(s.cuda_graph for s in llm.engine.stats().steps)
        tokens[flag] = [o.token_ids for o in outs]
        del llm
        torch.cuda.empty_cache()
    assert tokens["1"] == tokens["0"]
