"""triton_int8_limbs (int8 kernel="limbs"): activations as two int8 limbs a token on the int8 MMA, through
Triton's CPU interpreter (compiled where CUDA is present): the limbs against a hand-computed row and the torch
reference byte for byte (one block and rows in passes), their reconstruction bound, the product against
int8_linear_reference within the bound the limbs' rounding allows (float32, float16, bfloat16 x, split-K
by torch.sum and serial, ragged rows, N and K, empty slices), activations of any size, and the configs
offered to the tuner."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int8 import int8_linear_reference, quantize_int8  # noqa: E402

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LIMBS = dict(gemv=False, kernel="limbs")


def test_limbs_of_a_hand_computed_row():
    """max|x| = 16256 gives scale 1: v = rint(x), hi = rint(v / 128) (ties to even), lo = v - 128 hi."""
    from engine.quant.triton_int8_limbs import int8_limbs
    x = torch.tensor([[16256.0, -300.4, 64.5, 0.0, -16256.0, 16192.0, 191.0, -0.49]])
    limbs, scales = int8_limbs(x.to(DEVICE))
    assert scales.item() == 1.0
    assert limbs.cpu().tolist() == [[127, -2, 0, 0, -127, 126, 1, 0],  # 16192 / 128 = 126.5 -> 126
                                     [0, -44, 64, 0, 0, 64, 63, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 64), (7, 4096), (3, 20000), (2, 5)])  # 20000: a row in passes
def test_limbs_match_the_reference_and_bound_the_error(m, k, dtype):
    from engine.quant.triton_int8_limbs import LIMBS_MAX, int8_limbs, int8_limbs_reference
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    x[0, :3] = 0.0
    limbs, scales = int8_limbs(x.to(DEVICE))
    ref_limbs, ref_scales = int8_limbs_reference(x)
    assert torch.equal(scales.cpu(), ref_scales) and torch.equal(limbs.cpu(), ref_limbs)
    hi, lo = limbs.cpu().view(m, 2, k).unbind(1)
    assert hi.abs().max() <= 127 and lo.abs().max() <= 64
    # half a step of the limbs' grid, and x / scale's float32 rounding (|x / scale| <= 16256: 2^-10 at most)
    err = (x.double() - ref_scales.double() * (128.0 * hi.double() + lo.double())).abs()
    assert (err <= ref_scales.double() * (0.5 + 2 ** -10)).all()
    assert torch.allclose(ref_scales.squeeze(1), x.float().abs().amax(1) / LIMBS_MAX)


def test_zero_rows_have_zero_limbs():
    from engine.quant.triton_int8_limbs import int8_limbs
    limbs, scales = int8_limbs(torch.zeros(3, 40, device=DEVICE))
    assert not limbs.any() and (scales > 0).all()


def _bound(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """|limbs product - exact product| <= w_scale * (token scale / 2) * sum |q| (the limbs' rounding), per output."""
    from engine.quant.triton_int8_limbs import int8_limbs_reference
    _, token_scale = int8_limbs_reference(x)
    return token_scale * (0.5 + 2 ** -10) * (q.float().abs().sum(1) * scales)[None, :]


@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 48, 256, dict(block_m=16, block_n=16, block_k=128)),
    (9, 40, 512, dict(block_m=16, block_n=32, block_k=64, split_k=3, serial=True)),  # ragged rows and N
    (17, 33, 384, dict(block_m=32, block_n=16, block_k=128, split_k=2)),  # split summed by torch.sum
    (20, 24, 200, dict(block_m=16, block_n=16, block_k=32, split_k=16)),  # ragged K, empty slices
])
def test_limbs_product_within_the_rounding_bound(m, n, k, cfg):
    from engine.quant.triton_int8 import _launch
    from engine.quant.triton_int8_limbs import int8_limbs_reference
    g = torch.Generator().manual_seed(m * 100 + n)
    q, scales = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g)
    x[:, 0] *= 50.0  # an outlier feature: the limbs' scale is set by it
    out = _launch(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), **LIMBS, **cfg).cpu()
    ref = int8_linear_reference(x, q, scales)
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert ((out - ref).abs() <= _bound(x, q, scales) + 1e-5 * ref.abs() + 1e-6).all()
    # and it is the product of the reference limbs (exact integer sums, then the scales): the limbs are what ran
    limbs, token_scale = int8_limbs_reference(x)
    sums = limbs.double() @ q.double().t()
    joined = (128.0 * sums[0::2] + sums[1::2]) * token_scale.double() * scales.double()[None, :]
    assert torch.allclose(out.double(), joined, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out.double(), ref.double(), rtol=1e-6, atol=0.0)  # (they differ from x's product)


@pytest.mark.parametrize("dtype,size", [(torch.float16, 1e-3), (torch.float16, 1e3), (torch.bfloat16, 1e-3),
                                        (torch.bfloat16, 1.0), (torch.bfloat16, 3e4)])  # 3e4: past float16's range
def test_limbs_product_in_16_bits_at_any_size(dtype, size):
    from engine.quant.triton_int8 import _launch
    g = torch.Generator().manual_seed(5)
    q, scales = quantize_int8(torch.randn(32, 256, generator=g) * 0.05)
    x = (torch.randn(24, 256, generator=g) * size).to(dtype)
    out = _launch(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), **LIMBS, block_m=16, block_n=16).cpu()
    ref = int8_linear_reference(x.float(), q, scales)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 8e-3)


def test_limbs_reject_an_odd_row_tile():
    from engine.quant.triton_int8 import _launch
    q, scales = quantize_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="block_m=15"):
        _launch(torch.randn(4, 64), q, scales, **LIMBS, block_m=15)


def test_limbs_configs_offered_to_the_tuner():
    from engine.quant.triton_int8_limbs import limbs_candidates
    for m in (17, 64, 128, 256):
        cands = limbs_candidates(m, 4096, 4096, 132)
        assert cands and all(c["kernel"] == "limbs" and c["block_m"] % 2 == 0 for c in cands)
        assert all(c["tma"] for c in cands) == _has_tma()  # the pointer loads only where descriptors cannot run
        assert any(c["block_m"] == 256 for c in cands) == (m >= 128)  # the MMA's widest N: 128 tokens a tile
    assert not limbs_candidates(257, 4096, 4096, 132)  # prefill chunks: the limbs would be a second activation copy
    ragged = limbs_candidates(64, 4096, 4100, 132)  # rows not 16-byte strided: no descriptors
    assert ragged and not any(c["tma"] for c in ragged)


def _has_tma() -> bool:
    from engine.quant.triton_fp8_gemm import HAS_TMA
    return HAS_TMA


def test_every_limbs_candidate_computes_the_product():
    from engine.quant.triton_int8 import _launch
    from engine.quant.triton_int8_limbs import limbs_candidates
    g = torch.Generator().manual_seed(4)
    q, scales = quantize_int8(torch.randn(40, 512, generator=g) * 0.05)
    for m in (17, 64):
        x = torch.randn(m, 512, generator=g)
        ref = int8_linear_reference(x, q, scales)
        for cfg in limbs_candidates(m, 40, 512, 8):
            if not torch.cuda.is_available():
                cfg = dict(cfg, tma=False)  # the same tile with pointer loads (tensor descriptors need a GPU)
            out = _launch(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), **dict(cfg, gemv=False)).cpu()
            assert ((out - ref).abs() <= _bound(x, q, scales) + 1e-5 * ref.abs() + 1e-6).all(), cfg

