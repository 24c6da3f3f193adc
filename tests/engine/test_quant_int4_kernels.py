"""The int4 kernel layout (int4.pack_int4_kernel) and the int4 kernels (triton_int4.py, triton_int4_tc.py)
against the dequantize-then-matmul reference, through Triton's CPU interpreter (compiled where CUDA is
present): the GEMV, the per-plane tl.dot kernel and the one-dot-per-step kernel (both orientations, its
dequantization modes but the CUDA-only inline PTX, x gathered or permuted), split-K, N and K that are no
multiple of a tile, groups of 128 and 32, steps that lie inside one group and steps that span several."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int4 import (Int4Linear, dequantize_int4, int4_linear_reference, pack_int4,  # noqa: E402
                               pack_int4_kernel, quantize_int4, unpack_int4_kernel)

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fits_shared_memory(launch):
    """launch() on CUDA, or None where its config does not fit the GPU's shared memory (float32 x doubles the x
    tiles of the interpreter-sized cases; tuning.pick skips such a candidate the same way). Any other error
    raises."""
    try:
        return launch()
    except triton.runtime.errors.OutOfResources as exc:
        if "shared memory" not in str(exc):
            raise
        return None


@pytest.mark.parametrize("k, run", [(256, 16), (96, 4)])
def test_kernel_layout_puts_feature_32c_4i_r_in_nibble_i_of_word_r(k, run):
    """Known answer, bit by bit: every code is distinct per position, read back with Python integers from the
    flat storage, where word w of row n sits at (w // RUN) * N * RUN + n * RUN + w % RUN (runs of RUN words of
    consecutive rows contiguous: 16 when K % 128 == 0, else 4)."""
    n = 3
    codes = torch.tensor([[(7 * row + 3 * col + col // 16) % 16 for col in range(k)] for row in range(n)],
                         dtype=torch.uint8)
    packed = pack_int4_kernel(pack_int4(codes))
    assert packed.dtype == torch.int32 and packed.shape == (n, k // (8 * run), run)
    assert packed.stride() == (run, n * run, 1)
    flat = torch.empty(packed.numel(), dtype=torch.int32)
    flat.set_(packed.untyped_storage(), packed.storage_offset(), (packed.numel(),))
    for row in range(n):
        for word in range(k // 8):
            bits = int(flat[(word // run) * n * run + row * run + word % run]) & 0xFFFFFFFF
            c, r = divmod(word, 4)
            for i in range(8):
                assert (bits >> (4 * i)) & 0xF == int(codes[row, 32 * c + 4 * i + r]), (row, word, i)


def test_kernel_layout_round_trips_and_int4linear_keeps_one_copy():
    g = torch.Generator().manual_seed(0)
    qweight, scales, zeros = quantize_int4(torch.randn(40, 256, generator=g), 32)
    assert torch.equal(unpack_int4_kernel(pack_int4_kernel(qweight)), qweight)
    layer = Int4Linear(qweight, scales, zeros, None, 32)
    assert torch.equal(layer.qweight, qweight)
    assert "qweight" not in dict(layer.named_buffers())  # the codes are held once, as `packed`
    assert layer.packed.numel() * 4 == qweight.numel()
    assert torch.equal(layer.dequantized_weight(), dequantize_int4(qweight, scales, zeros))
    with pytest.raises(ValueError, match="in_features % 32"):
        pack_int4_kernel(torch.zeros(2, 8, dtype=torch.uint8))


GEMV = dict(gemv=True)
DOT = dict(gemv=False)
# (m, n, k, group, config): ragged N everywhere; K = 96 and 160 are no multiple of a 128-feature step;
# chunks=8 with group 128 and any step with group 32 take the several-groups-per-step path.
CASES = [
    (1, 48, 256, 128, dict(GEMV, block_n=16, chunks=4, split_k=1)),
    (1, 40, 384, 128, dict(GEMV, block_n=32, chunks=4, split_k=3)),      # split-K, one group a slice
    (1, 33, 512, 128, dict(GEMV, block_n=16, chunks=8, split_k=2)),      # 256-feature steps: 2 groups
    (2, 24, 96, 32, dict(GEMV, block_n=16, chunks=4, split_k=1)),        # 3 chunks of 32, a partial step
    (2, 24, 160, 32, dict(GEMV, block_n=32, chunks=1, split_k=4)),       # unequal slices, empty ones
    (1, 50, 1024, 128, {}),                                              # the heuristic (split-K)
    (3, 40, 384, 128, dict(DOT, block_n=32, chunks=4, split_k=1)),
    (5, 72, 256, 128, dict(DOT, block_n=64, chunks=4, split_k=2)),
    (17, 33, 96, 32, dict(DOT, block_n=32, chunks=4, split_k=1)),        # 2 row tiles, a partial step
    (9, 40, 512, 32, dict(DOT, block_n=32, chunks=8, split_k=3)),        # 8 groups a step, split-K
    (40, 24, 256, 128, {}),
    (1, 40, 384, 128, dict(GEMV, block_n=16, chunks=4, split_k=3, serial=True)),  # in-kernel reduction
    (2, 24, 160, 32, dict(GEMV, block_n=16, chunks=1, split_k=4, serial=True)),   # with empty slices
    (9, 40, 512, 32, dict(DOT, block_n=32, chunks=8, split_k=3, serial=True)),
    (16, 24, 256, 128, dict(GEMV, block_n=16, split_k=2)),               # the GEMV with many rows
    (1, 40, 384, 128, dict(GEMV, block_n=8, chunks=16, split_k=1)),      # 512-feature steps, a partial one
    (2, 33, 1024, 128, dict(GEMV, block_n=4, chunks=32, split_k=2, num_warps=1)),
    # prefetch: the next step's scale and zero loaded a step ahead (unequal and empty slices, a partial step)
    (1, 40, 384, 128, dict(GEMV, block_n=16, chunks=4, split_k=3, serial=True, prefetch=True)),
    (2, 24, 160, 32, dict(GEMV, block_n=16, chunks=1, split_k=4, prefetch=True)),
    (1, 33, 96, 32, dict(GEMV, block_n=32, chunks=1, split_k=1, prefetch=True)),
    (2, 33, 1024, 256, dict(GEMV, block_n=8, chunks=4, split_k=2, serial=True, prefetch=True)),  # 2 steps a group
]
TC = dict(gemv=False, kernel="tc")
# The one-dot-per-step kernel (triton_int4_tc), both orientations: rows 1..70, ragged N, K off the step,
# split-K with unequal and empty slices, groups inside a step and steps over several groups.
TC_CASES = [
    (1, 48, 256, 128, dict(TC, block_m=16, block_n=16, chunks=4, split_k=1)),
    (2, 40, 384, 128, dict(TC, block_m=16, block_n=32, chunks=4, split_k=3, serial=True)),
    (3, 33, 160, 32, dict(TC, block_m=16, block_n=32, chunks=2, split_k=2)),
    (17, 33, 96, 32, dict(TC, block_m=16, block_n=32, chunks=4, split_k=1, swap=False)),
    (64, 40, 512, 128, dict(TC, block_m=64, block_n=32, chunks=8, split_k=1, swap=False)),
    (70, 24, 384, 128, dict(TC, block_m=32, block_n=16, chunks=2, split_k=3, swap=False, serial=True)),
    (5, 40, 512, 32, dict(TC, block_m=16, block_n=32, chunks=16, split_k=1)),
    (40, 24, 256, 128, dict(TC, block_m=32, block_n=16, chunks=4, split_k=2, swap=True)),
    # dequant="exact": q - zero in 16 bits, the group's scale after the step's dot (steps inside a group)
    (1, 48, 256, 128, dict(TC, block_m=16, block_n=16, chunks=4, split_k=1, dequant="exact")),
    (2, 40, 384, 128, dict(TC, block_m=16, block_n=32, chunks=2, split_k=3, serial=True, dequant="exact")),
    (3, 33, 160, 32, dict(TC, block_m=16, block_n=32, chunks=1, split_k=2, dequant="exact")),
    (70, 24, 384, 128, dict(TC, block_m=32, block_n=16, chunks=4, split_k=2, swap=False, dequant="exact")),
    # x_natural: x loaded in feature order and permuted into the tile's column order in registers
    (1, 40, 384, 128, dict(TC, block_m=16, block_n=16, chunks=4, split_k=2, x_natural=True, dequant="exact")),
    (3, 33, 160, 32, dict(TC, block_m=16, block_n=32, chunks=2, split_k=2, x_natural=True)),
    (17, 33, 96, 32, dict(TC, block_m=16, block_n=32, chunks=1, split_k=1, swap=False, x_natural=True)),
    (70, 40, 512, 128, dict(TC, block_m=64, block_n=32, chunks=8, split_k=1, swap=False, x_natural=True)),
    # prefetch: each step loads the next step's scale and zero (steps inside a group; unequal and empty slices)
    (70, 24, 384, 128, dict(TC, block_m=32, block_n=16, chunks=2, split_k=3, swap=False, serial=True, prefetch=True)),
    (40, 24, 256, 64, dict(TC, block_m=32, block_n=16, chunks=1, split_k=16, swap=True, prefetch=True)),
    (5, 33, 384, 128, dict(TC, block_m=16, block_n=32, chunks=4, split_k=2, dequant="exact", prefetch=True)),
    # x_perm: x permuted into the tile's column order before the launch (both orientations, K off the step)
    (70, 24, 384, 128, dict(TC, block_m=32, block_n=16, chunks=2, split_k=3, swap=False, serial=True, x_perm=True)),
    (17, 33, 96, 32, dict(TC, block_m=16, block_n=32, chunks=4, split_k=1, swap=False, x_perm=True)),
    (5, 40, 512, 128, dict(TC, block_m=16, block_n=32, chunks=4, split_k=2, x_perm=True, prefetch=True)),
]


MMA = dict(gemv=False, kernel="mma")
MMA_CASES = [  # triton_int4_mma (kernel="mma"): (m, n, k, group, cfg)
    (1, 48, 256, 128, dict(MMA, block_m=16, block_n=16, block_k=128)),
    (5, 40, 512, 128, dict(MMA, block_m=16, block_n=32, block_k=64, split_k=3, serial=True)),  # 2 steps a group
    (17, 33, 256, 64, dict(MMA, block_m=16, block_n=16, block_k=64, split_k=2)),     # 2 row tiles, ragged N
    (3, 24, 160, 32, dict(MMA, block_m=16, block_n=16, block_k=32, split_k=4)),      # an empty slice
    (40, 40, 384, 128, dict(MMA, block_m=32, block_n=16, block_k=128, swap=False)),
    (70, 24, 256, 128, dict(MMA, block_m=32, block_n=16, block_k=64, swap=False, split_k=2, serial=True)),
    (9, 40, 256, 128, dict(MMA, block_m=16, block_n=32, block_k=128, fold=False)),
    (33, 24, 384, 64, dict(MMA, block_m=16, block_n=16, block_k=32, swap=False, fold=False, split_k=3)),
    # layout="pairs": the words as half-words, 4 dots a step (without asm here: the CUDA-only inline PTX)
    (1, 40, 256, 128, dict(MMA, layout="pairs", block_m=16, block_n=16, block_k=128)),
    (19, 33, 512, 128, dict(MMA, layout="pairs", block_m=16, block_n=32, block_k=128, split_k=3, serial=True)),
    (5, 24, 768, 256, dict(MMA, layout="pairs", block_m=16, block_n=16, block_k=256, split_k=2)),  # K = 64 dots
    (40, 24, 512, 128, dict(MMA, layout="pairs", block_m=32, block_n=16, block_k=128, split_k=4)),  # empty slice
    # unfolded pairs ((q - zero) * scale as the operand, one accumulator a dot), x gathered or permuted first
    (19, 33, 512, 128, dict(MMA, layout="pairs", fold=False, block_m=16, block_n=32, block_k=128, split_k=3,
                            serial=True)),
    (40, 24, 512, 128, dict(MMA, layout="pairs", fold=False, x_perm=True, block_m=32, block_n=16, block_k=128,
                            split_k=4)),
    (5, 24, 768, 256, dict(MMA, layout="pairs", fold=False, x_perm=True, block_m=16, block_n=16, block_k=256)),
    # and each step's scale and zero loaded a step ahead (the tuned unfolded tiles), over split-K with an empty slice
    (40, 24, 512, 128, dict(MMA, layout="pairs", fold=False, x_perm=True, prefetch=True, block_m=32, block_n=16,
                            block_k=128, split_k=4, serial=True)),
    (5, 24, 768, 256, dict(MMA, layout="pairs", fold=False, x_perm=True, prefetch=True, block_m=16, block_n=16,
                           block_k=256)),
]


def run_case(m: int, n: int, k: int, group: int, cfg: dict, dtype: torch.dtype):
    """int4_matmul with config cfg on random group-quantized weights [n, k] and x [m, k] of dtype (seeded by the
    shape): (x, qweight, scales, zeros, out on the CPU), out checked for dtype and shape."""
    from engine.quant.triton_int4 import int4_matmul
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
    scales = scales.to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    out = fits_shared_memory(lambda: int4_matmul(x.to(DEVICE), pack_int4_kernel(qweight).to(DEVICE),
                                                 scales.to(DEVICE), zeros.to(DEVICE), group, **cfg))
    if out is None:
        pytest.skip(f"{cfg} with {dtype} x needs more shared memory than this GPU has")
    out = out.cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    return x, qweight, scales, zeros, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,group,cfg", CASES + TC_CASES + MMA_CASES)
def test_int4_kernels_match_dequantize_then_matmul(m, n, k, group, cfg, dtype):
    x, qweight, scales, zeros, out = run_case(m, n, k, group, cfg, dtype)
    ref = int4_linear_reference(x, qweight, scales, zeros).float()
    # fp16: the tl.dot kernel rounds dequantized weights to fp16 before the product.
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("cfg", [dict(GEMV, block_n=16, chunks=4, split_k=2), dict(GEMV, block_n=32, chunks=1),
                                 dict(DOT, block_n=32, chunks=8),
                                 dict(TC, block_m=16, block_n=32, chunks=4, split_k=2),
                                 dict(TC, block_m=32, block_n=16, chunks=8, swap=False),
                                 dict(TC, block_m=16, block_n=32, chunks=1, swap=True, dequant="exact"),
                                 dict(TC, block_m=32, block_n=16, chunks=1, swap=False, dequant="exact"),
                                 dict(TC, block_m=16, block_n=16, chunks=1, x_natural=True, dequant="exact"),
                                 dict(TC, block_m=32, block_n=16, chunks=2, swap=False, x_natural=True)])
def test_int4_kernels_read_back_every_code_exactly(cfg):
    """Scale 1, zero 0, x = unit rows: the output is the integer codes themselves, each one."""
    from engine.quant.triton_int4 import int4_matmul
    n, k, group = 24, 256, 32
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ones = torch.ones(n, k // group)
    # the GEMV: every nibble plane (feature 32c + 4i + r: plane i) and word of a chunk, and a few chunks
    rows = range(k) if not cfg["gemv"] else (0, 1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 31, 32, 33, 61, 100, 255)
    x = torch.eye(k)[list(rows)]
    packed = pack_int4_kernel(pack_int4(codes)).to(DEVICE)
    if cfg["gemv"]:
        out = torch.cat([int4_matmul(r[None].to(DEVICE), packed, ones.to(DEVICE),
                                     torch.zeros(n, k // group, dtype=torch.uint8, device=DEVICE), group, **cfg)
                         for r in x]).cpu()
    else:
        out = fits_shared_memory(lambda: int4_matmul(x.to(DEVICE), packed, ones.to(DEVICE), torch.zeros(
            n, k // group, dtype=torch.uint8, device=DEVICE), group, **cfg))
        if out is None:
            pytest.skip(f"{cfg} with float32 x needs more shared memory than this GPU has")
        out = out.cpu()
    assert torch.equal(out, codes[:, list(rows)].t().float())


@pytest.mark.parametrize("magnitude", [1e-15, 1e-3, 1.0, 1e5, 1e10])
def test_int4_gemv_keeps_float32_accuracy_over_the_range_of_x(magnitude):
    """The GEMV multiplies the codes as float32 denormals by x scaled by up to 2^90: over 25 decades of x
    (products normal from |x| >= 2^-67, x finite below 2^38) it matches a float64 product to float32
    rounding, with the zero points and scales of random groups and x of both signs and exact zeros."""
    from engine.quant.triton_int4 import int4_matmul
    g = torch.Generator().manual_seed(7)
    n, k, group = 40, 512, 128
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
    x = torch.randn(2, k, generator=g) * magnitude
    x[:, ::17] = 0.0
    ref = x.double() @ dequantize_int4(qweight, scales, zeros, torch.float64).t()
    for cfg in (dict(GEMV, block_n=16, chunks=4, split_k=2), dict(GEMV, block_n=32, chunks=8)):
        out = int4_matmul(x.to(DEVICE), pack_int4_kernel(qweight).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE),
                          group, **cfg).cpu().double()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-6, cfg


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_gemv_candidates_keep_each_step_inside_one_group(group):
    """A GEMV step over several groups gathers a scale and zero per word (~4x slower on an H200,
    int4_gemv_ab_tiles_h200.json): the tuner's GEMV candidates, the heuristic first, never take one."""
    from engine.quant.triton_int4 import candidates
    gemv = [c for c in candidates(1, 4096, 4096, group, 132) if c.get("gemv")]
    assert len(gemv) >= 5 and candidates(1, 4096, 4096, group, 132)[0]["gemv"]
    assert all(group % (32 * c["chunks"]) == 0 for c in gemv)


@pytest.mark.parametrize("programs, steps, waves, ceil, whole", [
    (32, 112, 2, 9, 8),    # down_proj at 16 rows, 16 x 128 tiles: 288 programs just past 264 slots, or 256 within
    (64, 112, 2, 5, 4),    # down_proj at 64 rows, 64 x 64 tiles
    (48, 32, 2, 6, 5),     # qkv at 16 rows
    (300, 32, 2, 1, 1),    # more tiles than two waves: no split either way
    (32, 12, 2, 3, 3),     # the >= 4 steps a slice bound
    (32, 112, 4, 17, 16),  # four programs an SM: at most 16 slices
])
def test_split_for_waves_fills_whole_waves_when_asked(programs, steps, waves, ceil, whole):
    """Hand-counted on 132 SMs: the fewest slices reaching `waves` programs an SM, or the most that stay within."""
    from engine.quant.triton_int8 import split_for_waves
    assert split_for_waves(programs, steps, 132, waves) == min(ceil, 16)
    assert split_for_waves(programs, steps, 132, waves, whole_waves=True) == whole


def test_int4_tuning_offers_the_pairs_and_tc_tiles_at_whole_waves():
    """down_proj (N 4096, K 14336) at 16 and 64 rows: the x_perm tiles also at the split whose grid fits two
    programs an SM, beside the heuristic's (int4_pairs_scan16_h100.json: 22.4 against 27.1 us at 16 rows)."""
    from engine.quant.triton_int4 import candidates
    # 16 rows, 16 x 128 tiles: 32 programs, 9 slices reach 264 slots, 8 stay within; 64 rows, 64 x 64: 64, 5 and 4
    for m, bm, bn, splits in ((16, 16, 128, {8, 9}), (64, 64, 64, {4, 5})):
        cands = [c for c in candidates(m, 4096, 14336, 128, 132, asm=True) if c.get("x_perm")]
        offered = {c["split_k"] for c in cands if c["block_m"] == bm and c["block_n"] == bn}
        assert splits <= offered, (m, bm, bn, offered)


def test_int4_tc_launch_rejects_dequant_modes_it_cannot_run():
    from engine.quant.triton_int4 import _launch
    qweight, scales, zeros = quantize_int4(torch.randn(8, 256), 128)
    packed, x = pack_int4_kernel(qweight), torch.randn(1, 256)
    with pytest.raises(ValueError, match="dequant='bogus'"):
        _launch(x, packed, scales, zeros, 128, kernel="tc", dequant="bogus")
    with pytest.raises(ValueError, match="one group"):  # 256-feature steps span two groups of 128
        _launch(x, packed, scales, zeros, 128, kernel="tc", chunks=8, dequant="exact")
    for cfg in (dict(kernel="tc", chunks=8), dict(gemv=False), dict(gemv=True, chunks=8)):  # 2 groups a step; tl.dot
        with pytest.raises(ValueError, match="prefetch=True"):
            _launch(x, packed, scales, zeros, 128, **cfg, prefetch=True)
    for cfg in (dict(gemv=False), dict(kernel="tc", x_natural=True)):
        with pytest.raises(ValueError, match="x_perm=True"):
            _launch(x, packed, scales, zeros, 128, **cfg, x_perm=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            _launch(x, packed, scales, zeros, 128, kernel="tc", dequant="asm")


def test_permute_x_puts_each_chunk_in_the_tc_tiles_column_order():
    """Column 8 r + i of a 32-feature chunk holds the chunk's feature 4 p(i) + r, p(i) = _unpacked_tile's plane of
    column i (hand-listed: i = 4a + 2b + c gives plane a + 2b + 4c)."""
    from engine.quant.triton_int4_tc import permute_x
    x = torch.arange(3 * 96, dtype=torch.float32).view(3, 96)
    xp = permute_x(x)
    planes = [0, 4, 2, 6, 1, 5, 3, 7]
    expected = torch.tensor([32 * c + 4 * planes[i] + r for c in range(3) for r in range(4) for i in range(8)])
    assert torch.equal(xp, x[:, expected])


def test_int4_matmul_rejects_groups_the_layout_cannot_tile():
    from engine.quant.triton_int4 import int4_matmul
    qweight, scales, zeros = quantize_int4(torch.randn(8, 64), 16)
    with pytest.raises(ValueError, match="group_size % 32"):
        int4_matmul(torch.randn(1, 64), pack_int4_kernel(qweight), scales, zeros, 16)


def test_serial_split_k_leaves_its_tile_counters_zero_for_the_next_launch():
    from engine.quant.triton_int4 import int4_matmul
    from engine.quant.triton_int8 import split_locks
    g = torch.Generator().manual_seed(5)
    qweight, scales, zeros = quantize_int4(torch.randn(40, 512, generator=g) * 0.05, 128)
    packed = pack_int4_kernel(qweight).to(DEVICE)
    x = torch.randn(3, 512, generator=g).to(DEVICE)
    ref = int4_linear_reference(x.cpu(), qweight, scales, zeros)
    for cfg in (dict(GEMV, block_n=16, split_k=4, serial=True), dict(DOT, block_n=32, split_k=4, serial=True)):
        for _ in range(2):  # a second launch reuses the counters
            out = int4_matmul(x, packed, scales.to(DEVICE), zeros.to(DEVICE), 128, **cfg).cpu()
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5, cfg
        assert not split_locks(x.device, 1).any()


@pytest.mark.parametrize("m", [1, 17, 64, 200])
def test_every_int4_tuning_candidate_computes_the_same_product(m):
    """tuning.pick may choose any candidate (GEMV tiles, both tensor-core kernels, both orientations,
    split-K serial or not) on a GPU: each computes the dequantize-then-matmul product."""
    from engine.quant.triton_int4 import _launch, candidates
    g = torch.Generator().manual_seed(m)
    n, k = 40, 1024
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g) * 0.05, 128)
    x = torch.randn(m, k, generator=g)
    ref = int4_linear_reference(x, qweight, scales, zeros)
    cands = candidates(m, n, k, 128, 132)
    # off CUDA no "asm": few rows take the exact planes (scale after the dot), many the scaled ones
    assert any(c.get("kernel") == "tc" and c["dequant"] == ("exact" if m <= 32 else "scale") for c in cands)
    assert not any(c.get("dequant", "").startswith("asm") for c in cands)
    if m >= 64:
        assert any(c.get("kernel") == "tc" and not c["swap"] and c["block_m"] >= 64 and c["block_n"] >= 128
                   and c["num_stages"] >= 4 for c in cands)
    if m > 128:  # swap-AB over all rows of the 256 bucket (weights in the MMA's register operand)
        assert any(c.get("kernel") == "tc" and c["swap"] and c["block_m"] == 256 and c.get("x_perm") for c in cands)
    packed = pack_int4_kernel(qweight).to(DEVICE)
    built = 0
    for cfg in cands:
        out = fits_shared_memory(lambda: _launch(x.to(DEVICE), packed, scales.to(DEVICE), zeros.to(DEVICE), 128,
                                                 **cfg))
        if out is not None:
            built += 1
            assert ((out.cpu() - ref).norm() / ref.norm()).item() < 1e-5, cfg
    assert built >= len(cands) // 2, f"{len(cands) - built} of {len(cands)} candidates do not fit shared memory"


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("cfg", [dict(TC, block_m=16, block_n=32, chunks=4, split_k=2, x_perm=True, prefetch=True),
                                 dict(MMA, layout="pairs", fold=False, x_perm=True, prefetch=True, block_m=16,
                                      block_n=16, block_k=128, split_k=2, serial=True),
                                 dict(TC, block_m=16, block_n=32, chunks=4, split_k=1),
                                 dict(kernel="dp4a", block_n=16, chunks=4, split_k=2, serial=True)],
                         ids=["tc_x_perm", "pairs_x_perm", "tc_in_order", "dp4a_limbs"])
def test_norm_and_swiglu_store_an_int4_layers_input_in_its_kernels_order(monkeypatch, cfg, act_order):
    """TritonFusedBackend.norm_linear / silu_linear before an Int4Linear whose tuned kernel reads x permuted
    (x_perm) or that gathers x by GPTQ's act-order: the norm / SwiGLU kernel stores each feature where that
    kernel reads it (Int4Linear.input_columns), and SwiGLU for the dp4a GEMV its int8 limbs (input_limbs), so no
    permuting copy or gather runs, and no limbs kernel but the one after the norm (measured faster than a norm
    writing them); the outputs are the torch reference's of the unfused composition (the residual too, in the
    features' own order)."""
    from engine.kernels.reference import add_rms_norm_reference, silu_and_mul_reference
    from engine.kernels.triton_fused import TritonFusedBackend
    from engine.model.llama import RMSNorm
    from engine.quant import triton_int4_dp4a, triton_int4_mma, triton_int4_tc, tuning
    from engine.quant.triton_int4 import tuning_key
    m, hidden, inter, n, group, dtype = 5, 512, 256, 40, 128, torch.float16
    gen = torch.Generator().manual_seed(11)

    def layer(k, out):
        qweight, scales, zeros = quantize_int4(torch.randn(out, k, generator=gen) * 0.05, group)
        perm = torch.randperm(k, generator=gen) if act_order else None
        lin = Int4Linear(qweight, scales.to(dtype), zeros, None, group, perm).to(DEVICE)
        monkeypatch.setitem(tuning.chosen, tuning_key(m, out, k, group, dtype, x_ordered=True), cfg)
        return lin
    qkv, down = layer(hidden, n), layer(inter, n)
    norm = RMSNorm(hidden, 1e-5).to(DEVICE)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    x, residual = (torch.randn(m, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
    h = torch.randn(m, 2 * inter, generator=gen).to(DEVICE, dtype)
    fused = cfg.get("x_perm") or act_order
    assert qkv.input_columns(m, dtype, x.device).numel() == (hidden if fused else 0)  # (empty: in order)
    assert qkv.input_limbs(m, dtype, x.device) == (4 if cfg.get("kernel") == "dp4a" else None)
    copies = []  # the launch's own permutation of x (x_order calls them on index rows, not on activations)
    for module, name in ((triton_int4_tc, "permute_x"), (triton_int4_mma, "permute_pairs_x"),
                         (triton_int4_dp4a, "x_limbs")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda t, *a, real=real: copies.append(t.dtype) or real(t, *a))
    backend = TritonFusedBackend()
    out, res = backend.norm_linear(x, residual, norm, qkv)
    down_out = backend.silu_linear(h, down)
    assert len([d for d in copies if d.is_floating_point]) == (cfg.get("kernel") == "dp4a")
    normed, ref_res = add_rms_norm_reference(x.float(), residual.float(), norm.weight.float(), norm.eps)
    torch.testing.assert_close(res.float(), ref_res, rtol=1e-3, atol=1e-3)
    for got, lin, inp in ((out, qkv, normed), (down_out, down, silu_and_mul_reference(h.float()))):
        ref = F.linear(inp, lin.dequantized_weight())
        assert ((got.float() - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.parametrize("max_seq_len, dp4a, act_order", [(4096, True, False), (64, True, False),
                                                          (4096, False, False), (4096, True, True)],
                         ids=["reduce_limbs", "one_split", "not_dp4a", "act_order"])
def test_attention_stores_o_projs_limbs_in_its_decode_reduce(monkeypatch, max_seq_len, dp4a, act_order):
    """TritonFusedBackend.attend_linear for 2 decode rows before an int4 o_proj whose kernel for producer-stored
    input is the dp4a GEMV: the decode reduce stores the layer's limbs (no x_limbs kernel on the attention output)
    when the context is split; with one split (the split kernel writes the output), another kernel or GPTQ's
    act-order the plain path runs. Every case equals the torch backend's attention then the dequantized layer."""
    from engine.kernels.reference import random_paged_batch, reference_on_cpu
    from engine.kernels.triton_fused import TritonFusedBackend
    from engine.quant import triton_int4_dp4a, tuning
    from engine.quant.triton_int4 import tuning_key
    m, heads, head_dim, n, group, dtype = 2, 4, 64, 40, 128, torch.float16
    q, k_cache, v_cache, meta, _, _ = random_paged_batch([(40, 1), (90, 1)], num_kv_heads=2, group=heads // 2,
                                                         head_dim=head_dim, block_size=16, dtype=dtype, seed=13,
                                                         device=DEVICE)
    meta.max_seq_len = max_seq_len  # (a decode graph's: the split count follows it)
    gen = torch.Generator().manual_seed(13)
    k = heads * head_dim
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group)
    o_proj = Int4Linear(qweight, scales.to(dtype), zeros, None, group,
                        torch.randperm(k, generator=gen) if act_order else None).to(DEVICE)
    cfg = dict(kernel="dp4a", block_n=16, chunks=2, split_k=2, serial=True) if dp4a else \
        dict(TC, block_m=16, block_n=32, chunks=4, split_k=1)
    monkeypatch.setitem(tuning.chosen, tuning_key(m, n, k, group, dtype, x_ordered=True), cfg)
    calls = {"x_limbs": 0, "decode_reduce_limbs": 0}
    for name in calls:
        real = getattr(triton_int4_dp4a, name)
        monkeypatch.setattr(triton_int4_dp4a, name, lambda *a, name=name, real=real, **kw:
                            calls.__setitem__(name, calls[name] + 1) or real(*a, **kw))
    got = TritonFusedBackend().attend_linear(q, k_cache, v_cache, meta, 0.125, o_proj)
    fused = dp4a and max_seq_len > 64 and not act_order
    assert calls["decode_reduce_limbs"] == fused and not (fused and calls["x_limbs"])
    ref_attn = reference_on_cpu(q, k_cache, v_cache, meta, 0.125)
    ref = F.linear(ref_attn.reshape(m, -1), o_proj.dequantized_weight().cpu().float())
    assert got.shape == (m, n) and ((got.float().cpu() - ref).norm() / ref.norm()).item() < 5e-3


def test_tuning_for_ordered_input_gives_each_candidate_x_in_its_kernels_order():
    """tuned_config's x_ordered key times each candidate on x already permuted into its kernel's order (as the
    norm stores it; the dp4a GEMV on x's limbs, made before the timing), so every candidate, permuting or not,
    computes the same product: tuning.pick's agreement check holds, and the permutation is outside what is timed."""
    from engine.quant.triton_int4 import _ordered_launch
    m, n, k, group = 5, 24, 512, 128
    gen = torch.Generator().manual_seed(12)
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    ref = int4_linear_reference(x.cpu(), qweight, scales, zeros)
    launch = _ordered_launch()
    args = (pack_int4_kernel(qweight).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group)
    for cfg in (dict(TC, block_m=16, block_n=32, chunks=4, split_k=2, x_perm=True),
                dict(MMA, layout="pairs", fold=False, x_perm=True, block_m=16, block_n=16, block_k=128),
                dict(TC, block_m=16, block_n=32, chunks=4, split_k=1), dict(GEMV, block_n=16, chunks=4),
                dict(kernel="dp4a", block_n=16, chunks=2, split_k=2, serial=True)):
        out = launch(cfg, x, *args).cpu()
        tol = 2e-4 if cfg.get("kernel") == "dp4a" else 1e-5  # (dp4a: x's limbs' rounding, test_quant_int4_dp4a)
        assert ((out - ref).norm() / ref.norm()).item() < tol, cfg
