"""Triton kernel: the int4 GEMV (1-2 rows) in packed half2 math, two codes per instruction.

Reference: `int4_linear_reference` in int4.py. Same layouts and grid as triton_int4's `_int4_gemv_kernel`
(kernel layout of int4.pack_int4_kernel: nibble i of word r of chunk c holds feature 32c + 4i + r).

Why: under Nsight Compute the float32 GEMV moved gate_up's weights at 1.79 TB/s on an H200, bound by
instruction issue (3.5-4.3 sm_90 instructions a code), against 4.05 TB/s for cuBLAS in bf16. Here a
word's 8 codes cost, in PTX, 3 shifts, 4 LOP3 `(w >> 4j & 0x000F000F) | 0x64006400` (the float16 pairs
1024 + q of planes j and j + 4, Marlin's magic number), 4 packed subtractions of 1024 + zero (exact:
q - zero), 4 packed FMAs with x (planes j, j + 4 of x, packed once per step and shared by the rows a
thread holds), 2 conversions and an add into float32: ~2.3 instructions a code, then one FFMA by the
group's scale.

Accuracy: each word's two half2 lanes sum 4 products (q - zero) * x' in float16 (11-bit mantissa), then
go to float32. x' = x * 2^-X_SHIFT (exact), so a lane holds at most 60 * |x| * 2^-4: no overflow for
|x| < ~17,000, and x below ~1e-3 loses bits to float16's subnormals (an absolute error under 2^-24 * 15
a product, in units of x). bf16 x is converted to float16 (exact within that range). The error is
a few float16 roundings per 8 codes, about the bf16 output's own rounding; tests compare against the
float32 reference with the bf16 tolerance.

ASM=False runs the same arithmetic in Triton float16 ops (one code per instruction), which is what the
interpreter executes on the CPU: the tiling, x pairing, zero point, scale and split-K are tested there,
the PTX on the GPU (tests/gpu/test_quant_gpu.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_int4 import _group_params
from .triton_int8 import _serial_split_reduce

X_SHIFT = tl.constexpr(4)  # x is scaled by 2^-X_SHIFT before float16, the sum by 2^X_SHIFT after

_PTX_H2_WORD = tl.constexpr(
    "{\n.reg .b32 t0, t1, t2, t3, u, one, acc;\n.reg .b16 lo, hi;\n.reg .f32 flo, fhi;\n"
    "mov.b32 one, 0x3C003C00;\n"
    "lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;\n"
    "shr.u32 u, $1, 4;\nlop3.b32 t1, u, 0x000F000F, 0x64006400, 0xEA;\n"
    "shr.u32 u, $1, 8;\nlop3.b32 t2, u, 0x000F000F, 0x64006400, 0xEA;\n"
    "shr.u32 u, $1, 12;\nlop3.b32 t3, u, 0x000F000F, 0x64006400, 0xEA;\n"
    "fma.rn.f16x2 t0, t0, one, $2;\nfma.rn.f16x2 t1, t1, one, $2;\n"
    "fma.rn.f16x2 t2, t2, one, $2;\nfma.rn.f16x2 t3, t3, one, $2;\n"
    "mul.rn.f16x2 acc, t0, $3;\nfma.rn.f16x2 acc, t1, $4, acc;\n"
    "fma.rn.f16x2 acc, t2, $5, acc;\nfma.rn.f16x2 acc, t3, $6, acc;\n"
    "mov.b32 {lo, hi}, acc;\ncvt.f32.f16 flo, lo;\ncvt.f32.f16 fhi, hi;\nadd.f32 $0, flo, fhi;\n}")


@triton.jit
def _half_bits(x):
    """float16 x as the int32 of its 16 bits (high half zero)."""
    return x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _word_dot(w, zero, x0, x1, x2, x3, x4, x5, x6, x7, ASM: tl.constexpr):
    """Per word of w [BLOCK_N, WORDS]: sum over its 8 planes i of (q_i - zero) * x_i in float16 lanes
    (planes j and j + 4 share a lane pair), as float32. x_i: [WORDS] float16, plane i's features."""
    if ASM:
        mz = tl.broadcast_to((0xE400 | zero.to(tl.int32)) * 0x10001, w.shape)  # packed -(1024 + zero)
        p0 = tl.broadcast_to((_half_bits(x0) | (_half_bits(x4) << 16))[None, :], w.shape)
        p1 = tl.broadcast_to((_half_bits(x1) | (_half_bits(x5) << 16))[None, :], w.shape)
        p2 = tl.broadcast_to((_half_bits(x2) | (_half_bits(x6) << 16))[None, :], w.shape)
        p3 = tl.broadcast_to((_half_bits(x3) | (_half_bits(x7) << 16))[None, :], w.shape)
        return tl.inline_asm_elementwise(_PTX_H2_WORD, "=r,r,r,r,r,r,r", [w, mz, p0, p1, p2, p3],
                                         dtype=tl.float32, is_pure=True, pack=1)
    z = zero.to(tl.float16)
    lo = ((w & 15).to(tl.float16) - z) * x0[None, :]
    hi = (((w >> 16) & 15).to(tl.float16) - z) * x4[None, :]
    lo += (((w >> 4) & 15).to(tl.float16) - z) * x1[None, :]
    hi += (((w >> 20) & 15).to(tl.float16) - z) * x5[None, :]
    lo += (((w >> 8) & 15).to(tl.float16) - z) * x2[None, :]
    hi += (((w >> 24) & 15).to(tl.float16) - z) * x6[None, :]
    lo += (((w >> 12) & 15).to(tl.float16) - z) * x3[None, :]
    hi += (((w >> 28) & 15).to(tl.float16) - z) * x7[None, :]
    return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _x_plane(x_row, kc, i: tl.constexpr, mask_k):
    """Plane i's x (features kc + 4i, runs of 4) as float16, times 2^-X_SHIFT."""
    xk = tl.max_contiguous(tl.multiple_of(kc + 4 * i, 4), 4)
    x = tl.load(x_row + xk, mask=mask_k, other=0.0).to(tl.float32)
    return (x * (2.0 ** -X_SHIFT)).to(tl.float16)


@triton.jit
def _int4_gemv_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, N, K, k_per_split, split_k,
                         stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, ONE_GROUP: tl.constexpr,
                         EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
    WORDS: tl.constexpr = 4 * CHUNKS
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, WORDS)
    col_k = 32 * (offs_w // 4) + offs_w % 4  # plane 0's feature of each word column, from the step start
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = offs_n.to(tl.int64) * stride_sn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, 32 * CHUNKS, num_stages=STAGES):
        kc = k0 + col_k
        if EVEN_K:  # every step whole: masks constant along K, so loads stay 16-byte vectors
            mask_k = tl.full([WORDS], 1, tl.int1)
        else:  # whole chunks: K and every split bound are multiples of 32
            mask_k = kc < k_end
        mask = mask_n[:, None] & mask_k[None, :]
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        w = tl.load(w_rows + (kw + offs_w)[None, :], mask=mask, other=0)
        scale, zero = _group_params(s_ptr, z_ptr, s_rows, mask_n, kc, mask, k0, GROUP, ONE_GROUP)
        part = _word_dot(w, zero, _x_plane(x_row, kc, 0, mask_k), _x_plane(x_row, kc, 1, mask_k),
                         _x_plane(x_row, kc, 2, mask_k), _x_plane(x_row, kc, 3, mask_k),
                         _x_plane(x_row, kc, 4, mask_k), _x_plane(x_row, kc, 5, mask_k),
                         _x_plane(x_row, kc, 6, mask_k), _x_plane(x_row, kc, 7, mask_k), ASM)
        acc += part * scale
    out = tl.sum(acc, 1) * (2.0 ** X_SHIFT)
    offs = m.to(tl.int64) * stride_om + offs_n
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs, out.to(out_ptr.dtype.element_ty), mask=mask_n)
    if SERIAL:
        _serial_split_reduce(out_ptr, stride_os, offs, mask_n, res_ptr, offs, lock_ptr,
                             m * tl.num_programs(1) + pid_n, split_k)
