"""triton_int8_mma (int8 kernel="mma"): the float16 MMA of int8 codes as 1152 + q, two byte planes a step,
against the int8 reference through Triton's CPU interpreter (compiled where CUDA is present): float32,
float16 and bfloat16 x (bfloat16 goes through float16 scaled by 2^-4, so the interpreter's float16 dot
runs it), split-K (torch.sum and serial, with empty slices), rows and N off the tile, every code read back
exactly, activations far from 1 in size, and the configs the tuner is offered."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int8 import int8_linear_reference, quantize_int8  # noqa: E402

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MMA = dict(gemv=False, kernel="mma")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 48, 256, dict(MMA, block_m=16, block_n=16, block_k=128)),
    (5, 40, 512, dict(MMA, block_m=16, block_n=32, block_k=64, split_k=3, serial=True)),
    (17, 33, 384, dict(MMA, block_m=16, block_n=16, block_k=128, split_k=2)),   # 2 row tiles, ragged N
    (40, 24, 256, dict(MMA, block_m=32, block_n=16, block_k=32, split_k=16)),   # empty slices
])
def test_int8_mma_matches_reference(m, n, k, cfg, dtype):
    from engine.quant.triton_int8 import _launch
    g = torch.Generator().manual_seed(m * 100 + n)
    q, scales = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    out = _launch(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), **cfg).cpu()
    ref = int8_linear_reference(x.float(), q, scales)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_mma_reads_back_every_code_exactly(dtype):
    """Scale 1, x = unit rows: the output is each code -127..127 itself (the 1152 offset folded out exactly)."""
    from engine.quant.triton_int8 import _launch
    n, k = 24, 256
    q = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    out = _launch(torch.eye(k, dtype=dtype).to(DEVICE), q.to(DEVICE), torch.ones(n, device=DEVICE), **MMA,
                  block_m=32, block_n=16, block_k=128, split_k=2).cpu()
    assert torch.equal(out.float(), q.t().float())


@pytest.mark.parametrize("size", [3e4, 1e-3])
def test_int8_mma_bfloat16_activations_far_from_one(size):
    """bfloat16 x beyond float16's range unscaled (|x| up to ~1e5 > 65504) and small ones stay accurate."""
    from engine.quant.triton_int8 import _launch
    g = torch.Generator().manual_seed(3)
    q, scales = quantize_int8(torch.randn(32, 256, generator=g) * 0.05)
    x = (torch.randn(4, 256, generator=g) * size).to(torch.bfloat16)
    out = _launch(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), **MMA, block_m=16, block_n=16).cpu()
    ref = int8_linear_reference(x.float(), q, scales)
    assert torch.isfinite(out).all() and ((out.float() - ref).norm() / ref.norm()).item() < 8e-3


def test_int8_mma_rejects_what_it_cannot_run():
    from engine.quant.triton_int8 import _launch
    q, scales = quantize_int8(torch.randn(8, 192))
    with pytest.raises(ValueError, match="block_k"):  # 128 does not divide 192
        _launch(torch.randn(2, 192), q, scales, kernel="mma", block_k=128)
    with pytest.raises(ValueError, match="block_k"):
        _launch(torch.randn(2, 192), q, scales, kernel="mma", block_k=48)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="inline PTX"):
            _launch(torch.randn(2, 192), q, scales, kernel="mma", block_k=64, asm=True)


def test_int8_mma_configs_offered_to_the_tuner():
    from engine.quant.triton_int8_mma import mma8_candidates, mma8_ok
    for m in (1, 2, 16, 33, 64, 256):
        cands = mma8_candidates(m, 4096, 4096, 132, asm=True)
        assert cands and all(c["kernel"] == "mma" and c["asm"] and 4096 % c["block_k"] == 0 for c in cands)
        assert all(c["split_k"] == 1 or c.get("serial") for c in cands)
    assert not mma8_candidates(16, 4096, 4032, 132, asm=True)  # no step of 128 or 256 divides K
    q = torch.zeros(8, 4096, dtype=torch.int8)
    assert mma8_ok(q, 128) and not mma8_ok(q[:, 1:], 128)


def test_every_int8_mma_candidate_computes_the_product():
    from engine.quant.triton_int8 import _launch
    from engine.quant.triton_int8_mma import mma8_candidates
    g = torch.Generator().manual_seed(4)
    q, scales = quantize_int8(torch.randn(40, 512, generator=g) * 0.05)
    for m in (1, 16, 64, 200):
        x = torch.randn(m, 512, generator=g)
        ref = int8_linear_reference(x, q, scales)
        for cfg in mma8_candidates(m, 40, 512, 8, asm=False):
            out = _launch(x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), **cfg).cpu()
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5, cfg
