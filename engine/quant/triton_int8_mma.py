"""Triton kernel: out = x @ (q * scale)^T for int8 per-channel weights, the codes unpacked in the MMA
operand's registers as float16 1152 + q, two per byte permute.

Reference: `int8_linear_reference` in int8.py. Layouts as triton_int8.py (q [N, K] int8, K contiguous,
scale [N] float32, x [M, K], out [M, N] in x's dtype).

Why: triton_int8's tl.dot kernel converts each code through float32 (sign extension, the 2^23 magic add,
a subtract, a rounding to 16 bits: ~3.5 instructions a code in sm_90 SASS). An 8-bit code does not fit
bfloat16's 7-bit mantissa, but it fits float16's 10: the bits 0x6400 | (q + 128) are the float16
1024 + 128 + q exactly, and one PRMT builds two of them from the word's bytes (q + 128 = q ^ 0x80, one
XOR per 2 codes). So the MMA runs in float16: for bfloat16 x, the x tile is converted to float16 scaled
by XSCALE = 2^-4 (exact for |x| from 2^-10 to 2^20; smaller values keep an absolute error below 2^-20,
far under bfloat16's own rounding), and the output is divided by it again. The constant 1152 is folded
out per step: acc -= 1152 * sum(x over the step), so the float32 accumulator never holds the large
offset sums. The codes are read as int16 half-words (two codes each) and each step is two dots, byte
plane P of the half-words (features 2j + P) against x's even / odd features: so each plane's unpack is
one pure one-operand inline asm with a constant selector on the loaded half-words (CUDA only; elsewhere
the same bits by integer ops), which lets Triton load them straight into the operand's register layout
and unpack there (~2.7 instructions a code at 16 rows x 256 channels in sm_90 SASS, against ~6 for
triton_int8's tl.dot kernel).
Swap-AB (acc[n, m] = W x^T: the weight tile is the MMA's A operand, from registers; rows of x its N),
grid (row tiles, column tiles, SPLIT_K), split-K partials as triton_int8 (a float32 [SPLIT_K, M, N]
scratch summed by torch.sum or, SERIAL, by the tile's last slice). float32 x (tests): the operand is q
itself, in float32, no fold.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_int8 import _store_tile, _tile, gemv_result, mm_block_m, split_for_waves, split_outputs

# 2 half-words ($1) = 4 int8 codes (bytes 0-3 = features 2j, 2j + 1, 2j', 2j' + 1) -> the float16 1152 + q
# of byte P of each half-word (features 2j + P, 2j' + P), one register ($0).
_I8_PLANE_PTX = tuple(tl.constexpr("{\n.reg .b32 t, m;\nxor.b32 t, $1, 0x80808080;\nmov.b32 m, 0x64646464;\n"
                                   f"prmt.b32 $0, t, m, {sel};\n}}") for sel in ("0x4240", "0x4341"))
_I8_PLANE_0, _I8_PLANE_1 = _I8_PLANE_PTX


@triton.jit
def _int8_plane(h, P: tl.constexpr, ASM: tl.constexpr):
    """Byte P of each int16 half-word h (two int8 codes) as float16 1152 + q, exact (ASM: inline PTX, one
    XOR and one PRMT per two half-words; else integer ops)."""
    if ASM:
        if P == 0:
            out = tl.inline_asm_elementwise(_I8_PLANE_0, "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(_I8_PLANE_1, "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
    else:
        u = ((h.to(tl.int32) >> (8 * P)) + 128) & 0xFF
        out = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    return out


@triton.jit(do_not_specialize=["M", "split_k"])
def _int8_mma_planes_kernel(x_ptr, h_ptr, s_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                            stride_xm, stride_hn, stride_os, stride_om,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SERIAL: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PRECISION: tl.constexpr):
    """_int8_mma_kernel with the codes read as int16 half-words (h_ptr: q viewed as int16, [N, K // 2],
    K % BLOCK_K == 0): per step a [BLOCK_N, BLOCK_K // 2] half-word tile and two dots, byte plane P taking
    features 2j + P, against x's even / odd features (x loaded in order, split in registers). Each
    plane's unpack is elementwise on the loaded half-words with a constant selector, two codes per PRMT."""
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    h_tile = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + offs_h[None, :]  # [BLOCK_N, BLOCK_K // 2]
    x_tile = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]  # x^T [BLOCK_K, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k_step in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        k0 = tl.multiple_of(k_step, BLOCK_K)  # (a new name: the loop variable is left alone)
        h = tl.load(h_tile + k0 // 2, mask=mask_n[:, None], other=0)
        xs = tl.load(x_tile + k0, mask=mask_m[None, :], other=0.0)
        if DT == tl.bfloat16:
            # x * XSCALE (2^-4) as the float32 exponent lowered by 4 in its bits (0 and values below 1e-30 go to
            # 0). Not `(x.to(float32) * 0.0625).to(float16)`: Triton 3.6 on sm_90 converts to float16 before
            # the multiply, so |x| >= 65520 became inf and the output NaN (the GPU test
            # test_int8_mma_candidates_match_reference's large x).
            xf = xs.to(tl.float32)
            xb = (xf.to(tl.int32, bitcast=True) - (4 << 23)).to(tl.float32, bitcast=True)
            xh = tl.where(tl.abs(xf) >= 1e-30, xb, 0.0).to(tl.float16)
        elif DT == tl.float16:
            xh = xs
        else:
            xh = xs.to(tl.float32)
        x0, x1 = tl.split(tl.permute(tl.reshape(xh, (BLOCK_K // 2, 2, BLOCK_M)), (0, 2, 1)))  # even, odd features
        if DT == tl.float32:
            acc = tl.dot(_int8_plane(h, 0, ASM).to(tl.float32) - 1152.0, x0, acc, input_precision=PRECISION)
            acc = tl.dot(_int8_plane(h, 1, ASM).to(tl.float32) - 1152.0, x1, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(_int8_plane(h, 0, ASM), x0, acc, input_precision=PRECISION)
            acc = tl.dot(_int8_plane(h, 1, ASM), x1, acc, input_precision=PRECISION)
            acc -= 1152.0 * tl.sum(xh.to(tl.float32), axis=0)[None, :]
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    if DT == tl.bfloat16:
        scale = scale * 16.0  # 1 / XSCALE
    acc = acc * scale[:, None]
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=True, SERIAL=SERIAL)


# ----- launch configs -----------------------------------------------------------------------------
# triton_int8_mma tiles per bucket of rows, (block_m, block_n, block_k, warps, stages); block_m 0: the row
# tile of m (mm_block_m).
MMA8_TILES = {
    2: ((16, 256, 128, 8, 3), (16, 128, 256, 4, 3), (16, 512, 128, 16, 3)),
    16: ((16, 256, 128, 8, 3), (16, 128, 128, 4, 3), (16, 256, 128, 8, 4), (16, 128, 256, 4, 3),
         (16, 512, 128, 16, 3)),
    32: ((32, 256, 128, 8, 3), (32, 128, 128, 4, 3), (32, 256, 128, 16, 3), (16, 256, 128, 8, 3)),
    64: ((64, 256, 128, 8, 3), (64, 128, 128, 4, 3), (64, 256, 128, 16, 3), (32, 256, 128, 8, 3)),
    256: ((64, 256, 128, 8, 3), (128, 128, 128, 8, 3), (64, 256, 128, 16, 3), (64, 128, 128, 4, 3)),
}


def mma8_ok(q: torch.Tensor, block_k: int) -> bool:
    """Whether triton_int8_mma can read q as int16 half-words in whole steps of block_k."""
    return q.shape[1] % block_k == 0 and q.stride(1) == 1 and q.stride(0) % 2 == 0 and q.data_ptr() % 4 == 0


def mma8_candidates(m: int, n: int, k: int, sms: int, asm: bool) -> list[dict]:
    """triton_int8_mma configs for m rows (split-K up to 2 programs per SM, 4 at up to 16 rows, reduced in
    the kernel, each also at the split that fits whole waves; only steps that divide K); asm: its inline-PTX
    unpack (CUDA, 16-bit x)."""
    bucket = next(b for b in sorted(MMA8_TILES) if m <= b or b == 256)
    out = []
    for i, (bm, bn, bk, warps, stages) in enumerate(MMA8_TILES[bucket]):
        if k % bk:
            continue
        bm = bm or mm_block_m(m)
        programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        for waves in ((2, 4) if m <= 16 and i < 2 else (2,)):
            for whole in (False, True):
                split = split_for_waves(programs, k // bk, sms, waves, whole)
                cfg = dict(gemv=False, kernel="mma", asm=asm, block_m=bm, block_n=bn, block_k=bk, split_k=split,
                           num_warps=warps, num_stages=stages)
                cfg = dict(cfg, serial=True) if split > 1 else cfg
                if cfg not in out:
                    out.append(cfg)
    return out


def _launch_mma(x, q, scales, *, block_m=None, block_n=None, block_k=None, split_k=None, num_warps=None,
                num_stages=None, serial=False, asm=False):
    """triton_int8_mma's kernel: swap-AB, float16 MMA of the codes as 1152 + q (two byte planes a step)."""
    m, k = x.shape
    n = q.shape[0]
    block_m = block_m or mm_block_m(m)
    block_n = block_n or 128
    block_k = block_k or 128
    if block_k < 32 or block_k & (block_k - 1) or not mma8_ok(q, block_k):
        raise ValueError(f"kernel='mma' needs block_k a power of two >= 32 that divides K ({k}), got {block_k}, "
                         "and int8 rows readable as 16-bit half-words")
    if asm and not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError("asm=True (inline PTX) runs on CUDA with float16 / bfloat16 x only")
    split_k = split_k or 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    grid, out, split_stride, locks, res = split_outputs(x.device, m, n, block_m, block_n, split_k, serial, x.dtype)
    half = q.view(torch.int16)  # [N, K // 2]: half-word j holds features 2j (low byte) and 2j + 1
    _int8_mma_planes_kernel[grid](x, half, scales, out, res, out if locks is None else locks, m, n, k, k_per_split,
                                  split_k, x.stride(0), half.stride(0), split_stride, out.stride(-2),
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SERIAL=locks is not None,
                                  STAGES=(num_stages or 3) if x.is_cuda else 1, ASM=asm,
                                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                  num_warps=num_warps or (8 if block_n >= 256 else 4))
    return res if locks is not None else gemv_result(out, x.dtype)
