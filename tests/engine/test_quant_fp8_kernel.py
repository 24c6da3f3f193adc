"""The fused per-token fp8 activation quantization kernel against quantize_fp8_per_token, byte for
byte (Triton's CPU interpreter here, compiled where CUDA is present)."""
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
                  (2, 50, 1024, None)]


@pytest.mark.parametrize("codes", ["e4m3", "float16"])
@pytest.mark.parametrize("m,n,k,cfg", FP8_GEMM_CASES)
def test_triton_w8a8_gemm_matches_scaled_float_product(m, n, k, cfg, codes):
    """The Triton W8A8 kernel: (x codes * row scale) @ (w codes * channel scale)^T in float32. Codes in
    e4m3, and in float16 too (the same kernel; the interpreter's fp8 support is the weaker check)."""
    from engine.quant.fp8 import fp8_supported, quantize_fp8, quantize_fp8_per_token
    from engine.quant.triton_fp8 import fp8_candidates, fp8_matmul
    if codes == "e4m3" and DEVICE.type == "cuda" and not fp8_supported(DEVICE):
        pytest.skip("no fp8 tensor cores")
    gen = torch.Generator().manual_seed(m * n + k)
    wq, ws = quantize_fp8(torch.randn(n, k, generator=gen) * 0.05)
    xq, xs = quantize_fp8_per_token(torch.randn(m, k, generator=gen))
    ref = (xq.float() * xs) @ (wq.float() * ws[:, None]).t()
    if codes == "float16":
        xq, wq = xq.half(), wq.half()
    configs = [c for c in fp8_candidates(m, n, k, 132) if c["kernel"] == "triton"] if cfg is None else [cfg]
    assert cfg is not None or any(c["split_k"] > 1 for c in configs)
    for c in configs:
        out = fp8_matmul(xq.to(DEVICE), xs.to(DEVICE), wq.to(DEVICE), ws.view(1, -1).to(DEVICE), torch.float32,
                         **c).cpu()
        assert out.shape == (m, n) and out.dtype == torch.float32
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5, c
