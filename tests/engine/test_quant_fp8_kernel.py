"""The fused per-token fp8 activation quantization kernels against quantize_fp8_per_token, byte for
byte (Triton's CPU interpreter here, compiled where CUDA is present): the standalone one, the ones fused
into add + RMSNorm and into SiLU-and-mul, Fp8Linear.forward_quantized, and the Triton W8A8 GEMM."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.fp8 import quantize_fp8_per_token  # noqa: E402

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 256), (5, 3000), (3, 8192), (3, 20000)])  # 20000: the two-pass path
def test_fused_fp8_per_token_quant_matches_the_torch_reference(m, k, dtype):
    from engine.quant.triton_fp8 import fp8_quantize_per_token
    gen = torch.Generator().manual_seed(k)
    # Magnitudes over six decades: e4m3 normals, subnormals and values that flush to (signed) zero.
    x = torch.randn(m, k, generator=gen) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=gen)]
    if m > 2:
        x[1] = 0.0           # an all-zero row: the scale floor
        x[2, 7] = 1e4        # one outlier sets the row's scale
    x = x.to(dtype).to(DEVICE)
    codes, scales = fp8_quantize_per_token(x)
    ref_codes, ref_scales = quantize_fp8_per_token(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (m, 1)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


def test_values_just_below_a_power_of_two_round_up_to_it():
    from engine.quant.triton_fp8 import fp8_quantize_per_token
    x = torch.tensor([[448.0, 7.9529, -1.97597, 0.0155, 239.9, -0.0015, 0.0009]], device=DEVICE)
    codes, scales = fp8_quantize_per_token(x)
    assert scales.item() == 1.0
    assert codes.float().cpu().tolist() == [[448.0, 8.0, -2.0, 0.015625, 240.0, -0.001953125, 0.0]]


# (m, n, k, config): ragged N, K off the K tile, split-K with unequal slices, two row tiles.
FP8_GEMM_CASES = [(1, 40, 384, dict(kernel="triton", block_n=32, block_k=128, split_k=1)),
                  (3, 72, 384, dict(kernel="triton", block_n=64, block_k=128, split_k=3)),
                  (5, 33, 200, dict(kernel="triton", block_n=32, block_k=64, split_k=2)),
                  (40, 24, 256, dict(kernel="triton", block_n=32, block_k=128, split_k=1)),
                  (3, 72, 384, dict(kernel="triton", block_n=32, block_k=64, split_k=4, serial=True)),
                  (3, 72, 384, dict(kernel="tma", block_n=64, block_k=128, split_k=3)),
                  (40, 40, 208, dict(kernel="tma", block_n=32, block_k=64, split_k=2, serial=True)),
                  (2, 50, 1024, None), (40, 72, 1024, None)]


@pytest.mark.parametrize("codes", ["e4m3", "float16"])
@pytest.mark.parametrize("m,n,k,cfg", FP8_GEMM_CASES)
def test_triton_w8a8_gemm_matches_scaled_float_product(m, n, k, cfg, codes):
    """The Triton W8A8 kernel: (x codes * row scale) @ (w codes * channel scale)^T in float32. Codes in
    e4m3, and in float16 too (the same kernel; the interpreter's fp8 support is the weaker check)."""
    from engine.quant.fp8 import fp8_supported, quantize_fp8, quantize_fp8_per_token
    from engine.quant.triton_fp8_gemm import HAS_TMA, fp8_candidates, fp8_matmul
    if cfg is not None and cfg["kernel"] == "tma" and not HAS_TMA:
        pytest.skip("this Triton has no host tensor descriptors")
    if codes == "e4m3" and DEVICE.type == "cuda" and not fp8_supported(DEVICE):
        pytest.skip("no fp8 tensor cores")
    gen = torch.Generator().manual_seed(m * n + k)
    wq, ws = quantize_fp8(torch.randn(n, k, generator=gen) * 0.05)
    xq, xs = quantize_fp8_per_token(torch.randn(m, k, generator=gen))
    ref = (xq.float() * xs) @ (wq.float() * ws[:, None]).t()
    if codes == "float16":
        xq, wq = xq.half(), wq.half()
    configs = [c for c in fp8_candidates(m, n, k, 132) if c["kernel"] != "scaled_mm"] if cfg is None else [cfg]
    assert cfg is not None or {c["kernel"] for c in configs} == ({"triton", "tma"} if HAS_TMA else {"triton"})
    assert cfg is not None or any(c["split_k"] > 1 for c in configs)
    for c in configs:
        stage_bytes = 2 * c.get("block_k", 128) * (c.get("block_n", 64) + c.get("block_m", 16))
        if codes == "float16" and DEVICE.type == "cuda" and c.get("num_stages", 3) * stage_bytes > 200 * 2**10:
            continue  # tiles sized for 1-byte codes: with 2-byte stand-ins they overflow shared memory (tuning skips)
        out = fp8_matmul(xq.to(DEVICE), xs.to(DEVICE), wq.to(DEVICE), ws.view(1, -1).to(DEVICE), torch.float32,
                         **c).cpu()
        assert out.shape == (m, n) and out.dtype == torch.float32
        # Hopper's fp8 MMAs add products with ~14 mantissa bits before the float32 accumulator (DeepSeek-V3
        # report, sec. 3.3.2): 1.4e-4 / 3.3e-4 measured on the H200 at K = 384 / 1024.
        bound = 1e-3 if codes == "e4m3" and DEVICE.type == "cuda" else 1e-5
        assert ((out - ref).norm() / ref.norm()).item() < bound, c


# ----- quantization fused into add + RMSNorm and SiLU-and-mul ----------------------------------------
def assert_same_codes(codes, scales, ref_codes, ref_scales, scale_ulps=0, near=False):
    """Codes byte for byte; scales to within scale_ulps float32 ulps (0: byte for byte too). near: a
    compiled kernel against another reduction order or exp (CUDA): scales within 2^-10 relative and
    at most 0.5% of the codes off, each by one e4m3 step (a 16-bit normed value rounded the other way
    flips its code: 4 of 2800 in float16 rows summed in passes on the H200)."""
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert codes.shape == ref_codes.shape and scales.shape == ref_scales.shape
    if near:
        assert torch.allclose(scales, ref_scales, rtol=2 ** -10, atol=0)
        a, b = codes.view(torch.uint8).long(), ref_codes.view(torch.uint8).long()
        off = a != b
        assert off.float().mean().item() <= 5e-3
        mag_a, mag_b = a[off] & 0x7F, b[off] & 0x7F  # e4m3 bytes: sign bit, then magnitude in order
        same_sign = (a[off] >> 7) == (b[off] >> 7)
        assert (((mag_a - mag_b).abs() <= 1) & (same_sign | ((mag_a <= 1) & (mag_b <= 1)))).all()
        return
    ulps = (scales.cpu().view(torch.int32).long() - ref_scales.cpu().view(torch.int32).long()).abs()
    assert ulps.max().item() <= scale_ulps, ulps.max().item()
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


def spread_rows(t, n, dtype, seed, scale=1.0):
    """t rows of n values over four decades; row 1 all zero (the scale floor), row 2 one outlier."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=gen) * torch.logspace(-2, 2, n)[torch.randperm(n, generator=gen)] * scale
    if t > 2:
        x[1] = 0.0
        x[2, 7] = 3e3 * scale
    return x.to(dtype).to(DEVICE)


# (t, n, max_row_block): one block per row, a row off a power of two, and rows in passes (n over the
# block: 20000 at the real MAX_ROW_BLOCK, 700 with it lowered to 256 so the passes end mid-block).
FUSED_SHAPES = [(1, 64, None), (5, 1000, None), (4, 20000, None), (4, 700, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("t,n,max_block", FUSED_SHAPES)
def test_add_rms_norm_fp8_is_quantize_of_add_rms_norm(t, n, max_block, with_residual, dtype, monkeypatch):
    """Codes and scales of the fused kernel are quantize_fp8_per_token of the pure-torch
    add_rms_norm_reference's output, and residual_out is its residual, byte for byte; with one
    allowance: float32 scales may differ by a few ulps, since the norm's mean of squares is a sum in
    another order (and 1 / sqrt is not torch.rsqrt), which moves a float32 normed value by an ulp or
    two; in float16 the rounding to the model dtype absorbs that. Against the unfused Triton pair
    (add_rms_norm_triton, then the per-token kernel) it is byte for byte with no allowance where the
    row is one block (rows in passes sum their squares in another order)."""
    from engine.kernels.reference import add_rms_norm_reference
    from engine.kernels.triton_fused import add_rms_norm_triton
    from engine.quant import triton_fp8
    if max_block is not None:
        monkeypatch.setattr(triton_fp8, "MAX_ROW_BLOCK", max_block)
    x = spread_rows(t, n, dtype, seed=n)
    residual = spread_rows(t, n, dtype, seed=n + 1, scale=0.5) if with_residual else None
    if residual is not None and t > 2:
        residual[1] = 0.0  # x + residual = 0: the zero row survives the sum
    weight = (1 + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(0))).to(dtype).to(DEVICE)
    codes, scales, res_out = triton_fp8.add_rms_norm_fp8(x, residual, weight, 1e-5)

    normed, ref_res = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(res_out, ref_res)
    assert_same_codes(codes, scales, *quantize_fp8_per_token(normed), scale_ulps=4 if dtype == torch.float32 else 0,
                      near=DEVICE.type == "cuda")
    if t > 2:
        assert (scales[1] == 1e-12).all() and (codes[1].float() == 0).all()
    if triton_fp8.MAX_ROW_BLOCK >= n:
        normed_triton, res_triton = add_rms_norm_triton(x, residual, weight, 1e-5)
        assert torch.equal(res_out, res_triton)
        assert_same_codes(codes, scales, *quantize_fp8_per_token(normed_triton), near=DEVICE.type == "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# (t, I, chunk): one chunk; 2 with a ragged end; 20 (a row's absmax over more chunks than a power of two);
# 3 with the chunk lowered to 256.
@pytest.mark.parametrize("t,i,chunk", [(1, 64, None), (5, 1500, None), (3, 20000, None), (4, 700, 256)])
def test_silu_and_mul_fp8_is_quantize_of_silu_and_mul(t, i, chunk, dtype, monkeypatch):
    """Codes and scales are quantize_fp8_per_token of silu_and_mul_reference's output, byte for byte
    (float32 scales within a few ulps: the interpreter's exp is numpy's, torch's silu its own), and of
    the unfused Triton silu_and_mul's output with no allowance, rows over several chunks included."""
    from engine.kernels.reference import silu_and_mul_reference
    from engine.kernels.triton_fused import silu_and_mul_triton
    from engine.quant import triton_fp8
    if chunk is not None:
        monkeypatch.setattr(triton_fp8, "SWIGLU_CHUNK", chunk)
    gen = torch.Generator().manual_seed(i)
    h = torch.randn(t, 2 * i, generator=gen) * 3
    if t > 2:
        h[1] = 0.0                     # silu(0) * 0: the scale floor
        h[2, 7], h[2, i + 7] = 30.0, 200.0  # one outlier sets the row's scale
    h = h.to(dtype).to(DEVICE)
    codes, scales = triton_fp8.silu_and_mul_fp8(h)
    assert codes.shape == (t, i)
    # inplace: the activation staged in h's gate half (no scratch), the same codes; the up half untouched
    staged = h.clone()
    in_codes, in_scales = triton_fp8.silu_and_mul_fp8(staged, inplace=True)
    assert torch.equal(in_codes.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(in_scales, scales)
    assert torch.equal(staged[:, i:], h[:, i:]) and torch.equal(staged[:, :i], silu_and_mul_triton(h))
    assert_same_codes(codes, scales, *quantize_fp8_per_token(silu_and_mul_reference(h)),
                      scale_ulps=4 if dtype == torch.float32 else 0, near=DEVICE.type == "cuda")
    assert_same_codes(codes, scales, *quantize_fp8_per_token(silu_and_mul_triton(h)), near=DEVICE.type == "cuda")
    if t > 2:
        assert (scales[1] == 1e-12).all() and scales[2].item() == pytest.approx(30.0 * 200.0 / 448, rel=1e-3)


def test_fused_quant_takes_every_width_strided_rows_and_no_rows():
    from engine.quant.triton_fp8 import add_rms_norm_fp8, silu_and_mul_fp8
    x = torch.empty(0, 64, device=DEVICE)
    codes, scales, res = add_rms_norm_fp8(x, None, torch.ones(64, device=DEVICE), 1e-5)
    assert codes.shape == (0, 64) and scales.shape == (0, 1) and res.shape == (0, 64)
    assert silu_and_mul_fp8(torch.empty(0, 128, device=DEVICE))[0].shape == (0, 64)
    # rows with a stride (a column slice of a wider tensor) read as such, no copy needed
    wide = torch.randn(3, 200, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = silu_and_mul_fp8(wide[:, 10:138])
    expect = silu_and_mul_fp8(wide[:, 10:138].contiguous())
    assert torch.equal(got[0].view(torch.uint8), expect[0].view(torch.uint8)) and torch.equal(got[1], expect[1])
    got = add_rms_norm_fp8(wide[:, :64], wide[:, 100:164], torch.ones(64, device=DEVICE), 1e-5)
    expect = add_rms_norm_fp8(wide[:, :64].contiguous(), wide[:, 100:164].contiguous(), torch.ones(64, device=DEVICE),
                              1e-5)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got[:2], expect[:2]))
    assert torch.equal(got[2], expect[2])
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_fp8(torch.zeros(2, 129, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm_fp8(torch.zeros(2, 64, device=DEVICE), None, torch.ones(32, device=DEVICE), 1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_forward_quantized_is_forward_without_the_quantization(bias):
    """forward(x) is forward_quantized(quantize(x)) (the CPU path: torch._scaled_mm), both the float
    product of the codes; and fed by the fused norm it computes the Linear of the quantized norm."""
    from engine.kernels.reference import add_rms_norm_reference
    from engine.quant.fp8 import Fp8Linear, fp8_linear_reference, quantize_fp8
    from engine.quant.triton_fp8 import add_rms_norm_fp8
    if DEVICE.type == "cuda":
        pytest.skip("the CPU path; tests/gpu/test_quant_gpu.py runs the CUDA one")
    gen = torch.Generator().manual_seed(3)
    wq, ws = quantize_fp8(torch.randn(48, 64, generator=gen) * 0.05)
    b = torch.randn(48, generator=gen) if bias else None
    lin = Fp8Linear(wq, ws, b)
    x = torch.randn(2, 3, 64, generator=gen)
    out = lin(x)
    xq, xs = quantize_fp8_per_token(x.reshape(-1, 64))
    assert torch.equal(out, lin.forward_quantized(xq, xs, torch.float32).view(2, 3, 48))
    expect = fp8_linear_reference(x, wq, ws) + (0 if b is None else b)
    assert ((out - expect).norm() / expect.norm()).item() < 1e-6

    x2, residual = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    norm_w = 1 + 0.1 * torch.randn(64, generator=gen)
    codes, scales, _ = add_rms_norm_fp8(x2, residual, norm_w, 1e-5)
    fused = lin.forward_quantized(codes, scales, torch.float32)
    expect = fp8_linear_reference(add_rms_norm_reference(x2, residual, norm_w, 1e-5)[0], wq, ws)
    expect = expect + (0 if b is None else b)
    assert ((fused - expect).norm() / expect.norm()).item() < 1e-6
    with pytest.raises(ValueError, match="forward_quantized: xq has shape"):
        lin.forward_quantized(codes[:, :32], scales, torch.float32)


def test_triton_backend_feeds_fp8_layers_their_quantized_input_from_the_norm_and_swiglu(monkeypatch):
    """TritonFusedBackend.norm_linear / silu_linear before an Fp8Linear: the norm / SwiGLU kernel writes the
    layer's fp8 codes and scales (no per-token quantization launch) and the result is the unfused
    composition's, residual included."""
    from engine.kernels.reference import add_rms_norm_reference, silu_and_mul_reference
    from engine.kernels.triton_fused import TritonFusedBackend
    from engine.model.llama import RMSNorm
    from engine.quant import fp8, triton_fp8
    from engine.quant.fp8 import Fp8Linear, quantize_fp8
    if DEVICE.type == "cuda":
        pytest.skip("the CPU path (torch._scaled_mm on the CPU); tests/gpu/test_quant_gpu.py runs the CUDA one")
    gen = torch.Generator().manual_seed(5)
    lin = Fp8Linear(*quantize_fp8(torch.randn(48, 64, generator=gen) * 0.05), None)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = 1 + 0.1 * torch.randn(64, generator=gen)
    x, residual = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    backend = TritonFusedBackend()
    unfused = []  # a separate quantization of the layer's input (Fp8Linear.forward's, on either device)
    for module, name in ((triton_fp8, "fp8_quantize_per_token"), (fp8, "quantize_fp8_per_token")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real: unfused.append(1) or real(*a))
    out, res = backend.norm_linear(x, residual, norm, lin)
    h = torch.randn(3, 128, generator=gen)
    down = backend.silu_linear(h.clone(), lin)  # (h is the caller's to lose: the activation is staged in it)
    monkeypatch.setattr(triton_fp8, "SWIGLU_CHUNK", 16)  # the intermediate size in 4 chunks: fused all the same
    torch.testing.assert_close(backend.silu_linear(h.clone(), lin), down, rtol=1e-5, atol=1e-5)
    assert not unfused
    monkeypatch.undo()
    normed, ref_res = add_rms_norm_reference(x, residual, norm.weight, norm.eps)
    assert torch.equal(res, ref_res)
    torch.testing.assert_close(out, lin(normed), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(down, lin(silu_and_mul_reference(h)), rtol=1e-5, atol=1e-5)
