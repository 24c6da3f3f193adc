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
@pytest.mark.parametrize("m,k", [(1, 256), (5, 3000), (3, 8192)])
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
