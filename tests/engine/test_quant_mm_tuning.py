"""The multi-row int8 kernel's tuning candidates (split-K included): each computes the product of its
reference (Triton's CPU interpreter here), since tuning.pick may choose any of them on a GPU."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int8 import int8_linear_reference, quantize_int8  # noqa: E402

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("m", [3, 40])
def test_every_int8_tl_dot_candidate_computes_the_same_product(m):
    from engine.quant.triton_int8 import _launch, mm_candidates
    g = torch.Generator().manual_seed(m)
    n, k = 40, 1024
    q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g)
    ref = int8_linear_reference(x, q, s)
    cands = mm_candidates(m, n, triton.cdiv(k, 128), 132, "block_k", (128,))
    assert any(c.get("split_k", 1) > 1 for c in cands)
    for cfg in cands:
        out = _launch(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), **cfg).cpu()
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,cfg", [(1, 33, 200, dict(gemv=True, block_n=16, block_k=64, split_k=3)),
                                       (2, 33, 512, dict(gemv=True, block_n=32, block_k=128, split_k=3)),
                                       (7, 33, 200, dict(gemv=False, block_n=32, block_k=64, split_k=2)),
                                       (40, 24, 384, dict(gemv=False, block_n=32, block_k=128, split_k=1)),
                                       (20, 24, 192, dict(gemv=False, block_m=256, block_n=32, block_k=64)),
                                       (17, 33, 200, dict(gemv=False, swap=False, block_m=16, block_n=32,
                                                          block_k=64, split_k=2)),
                                       (70, 40, 384, dict(gemv=False, swap=False, block_m=64, block_n=32,
                                                          block_k=128, split_k=3, serial=True))])
def test_int8_kernels_on_ragged_shapes(m, n, k, cfg, dtype):
    """K off the K tile (masked steps) and on it (mask-free steps), split-K with unequal slices."""
    from engine.quant.triton_int8 import _launch
    g = torch.Generator().manual_seed(k + m)
    q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int8_linear_reference(x, q, s).float()
    out = _launch(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), **cfg).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("m", [40, 200])
def test_every_int8_gemm_candidate_without_swap_computes_the_same_product(m):
    """The plain-GEMM tiles (x as the MMA's A, the converted weight as B, scale in the epilogue) that
    int8_matmul times for many rows, split-K serial or not."""
    from engine.quant.triton_int8 import _launch, gemm_candidates
    g = torch.Generator().manual_seed(m)
    n, k = 40, 1024
    q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g)
    ref = int8_linear_reference(x, q, s)
    cands = gemm_candidates(m, n, k, 132)
    assert all(not c["swap"] for c in cands) and any(c["block_m"] == 128 and c["num_stages"] >= 4 for c in cands)
    for cfg in cands:
        out = _launch(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), **cfg).cpu()
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), cfg


W = dict(gemv=True, kernel="words")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,cfg", [(1, 33, 200, dict(W, block_n=16, block_k=64, split_k=3)),  # ragged K, split
                                       (2, 40, 512, dict(W, block_n=32, block_k=128, split_k=2, serial=True)),
                                       (1, 24, 1024, dict(W, block_n=16, block_k=1024, split_k=1)),
                                       (2, 24, 260, dict(W, block_n=8, block_k=256, split_k=1))])
def test_int8_word_gemv_matches_reference(m, n, k, cfg, dtype):
    """triton_int8_words: every byte of a word, negative codes and -127 included, meets its own feature of x."""
    from engine.quant.triton_int8 import _launch
    g = torch.Generator().manual_seed(k + m)
    q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    q[0, :8] = torch.tensor([-127, 127, -1, 0, 1, -128 + 1, 64, -64], dtype=torch.int8)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int8_linear_reference(x, q, s).float()
    out = _launch(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), **cfg).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-3)


def test_int8_word_gemv_reads_each_code_exactly_and_rejects_what_it_cannot_read():
    from engine.quant.triton_int8 import _launch, words_candidates, words_ok
    n, k = 16, 64
    q = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    ones = torch.ones(n)
    for col in (0, 1, 2, 3, 5, 62, 63):
        x = torch.zeros(1, k)
        x[0, col] = 1.0
        out = _launch(x.to(DEVICE), q.to(DEVICE), ones.to(DEVICE), kernel="words", block_n=16, block_k=32).cpu()
        assert torch.equal(out[0], q[:, col].float()), col
    # codes as denormals: x over 2^-40 .. 2^36 (the products' scaling overflows only from 2^38), one power of two per
    # feature, so each product is exact and so is the sum of 4 of them in float32 when they are far apart
    x = torch.zeros(1, k)
    x[0, :4] = torch.tensor([2.0 ** 36, 2.0 ** -40, -(2.0 ** 20), 2.0 ** -12])
    out = _launch(x.to(DEVICE), q.to(DEVICE), ones.to(DEVICE), kernel="words", block_n=16, block_k=32).cpu()
    torch.testing.assert_close(out, (x.double() @ q.double().t()).float(), rtol=1e-6, atol=0)
    assert not words_ok(torch.zeros(4, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match="K % 4"):
        _launch(torch.randn(1, 6), torch.zeros(4, 6, dtype=torch.int8), torch.ones(4), kernel="words")
    with pytest.raises(ValueError, match="no inline PTX"):
        _launch(torch.randn(1, 64).to(DEVICE), q.to(DEVICE), ones.to(DEVICE), kernel="words", asm=True)
    cands = words_candidates(1, 4096, 4096, 132)
    assert all(c["kernel"] == "words" for c in cands) and any(c.get("serial") for c in cands)


def test_tuning_agrees_rejects_wrong_or_non_finite_outputs():
    from engine.quant.tuning import agrees
    ref = torch.randn(4, 8)
    assert agrees(ref + 1e-4 * torch.randn(4, 8), ref)
    assert agrees(ref.half(), ref)
    assert not agrees(ref * 1.1, ref)
    assert not agrees(ref[:, :4], ref)
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert not agrees(bad, ref)
    assert agrees(torch.zeros(2, 2), torch.zeros(2, 2))


def _splits(cands, **tile):
    return {c["split_k"] for c in cands if all(c.get(key) == v for key, v in tile.items())}


def test_int8_and_fp8_tuning_offer_each_tile_at_whole_waves():
    """Beside the fewest slices that reach two programs an SM, the most that stay within (split_for_waves), hand
    counted on 132 SMs: a grid just past a whole wave runs a second, nearly empty one."""
    from engine.quant.triton_fp8_gemm import dot_candidates
    from engine.quant.triton_int8 import gemm_candidates, mm_candidates
    from engine.quant.triton_int8_mma import mma8_candidates
    # fp8, o_proj at 64 rows, 64 x 64 tiles: 64 programs, 5 slices (320 programs) reach 264 slots, 4 (256) stay within
    assert {4, 5} <= _splits(dot_candidates(64, 4096, 4096, 132), block_m=64, block_n=64, block_k=128)
    # int8 without swap, qkv at 64 rows, 64 x 128 tiles: 48 programs, 6 or 5 slices
    assert {5, 6} <= _splits(gemm_candidates(64, 6144, 4096, 132), block_m=64, block_n=128)
    # int8 tl.dot, qkv at 64 rows, 64-row tiles: 96 programs at 64 columns, 3 or 2 slices; 48 at 128, 6 or 5
    cands = mm_candidates(64, 6144, 32, 132, "block_k", (128,))
    assert {2, 3} <= _splits(cands, block_n=64) and {5, 6} <= _splits(cands, block_n=128, num_warps=4)
    # int8 mma, down_proj at 16 rows, 16 x 128 tiles: 32 programs, 9 or 8 slices
    assert {8, 9} <= _splits(mma8_candidates(16, 4096, 14336, 132, True), block_n=128, block_k=128, num_warps=4)
