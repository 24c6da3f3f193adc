"""Triton kernel: out = x @ dequant(W)^T for group-wise int4 weights, one tensor-core dot per K step.

Reference: `int4_linear_reference` in int4.py. Same layouts as triton_int4.py (the weight in the kernel
layout of int4.pack_int4_kernel: per row, each chunk of 32 input features is 4 int32 words, nibble i
of word r holding feature 32c + 4i + r; scales [N, K // G]; zeros [N, K // G] uint8).

Why a second tensor-core kernel: triton_int4's `_int4_dot_kernel` multiplies each nibble plane by its
own tl.dot (8 dots of K = 4 * CHUNKS per step, each with its own operand staging), which starves the
tensor cores once many rows share the weight tile (prefill chunks, batches of 64-256). Here the 8
dequantized planes [BLOCK_N, WORDS] are interleaved in registers with tl.join into one
[BLOCK_N, 8 * WORDS] tile whose column j is nibble j % 8 of word j // 8, i.e. input feature
    32 * (w // 4) + 4 * (j % 8) + w % 4,   w = j // 8  (from the step's start),
and x is read in that same column order (a gather from a contiguous range, cached), so one dot of
K = 32 * CHUNKS (128-512) does the step. The joins only regroup values a thread already holds, so
the unpacked tile costs no data movement; dequantization is the magic-number trick of triton_int4
(`_plane`: one LOP3 and a float subtract per code, the scale multiply, a conversion to x's dtype).

Two orientations, a constexpr:
- SWAP (out^T = W x^T, as Marlin/Machete do for small batches): acc [BLOCK_N, BLOCK_M], the
  dequantized tile is the MMA's A operand (from registers), rows of x its N (16 at the least).
- not SWAP (large batches, prefill): acc [BLOCK_M, BLOCK_N] = x W^T, big row tiles (64-128), the
  dequantized tile transposed into the B operand, as a plain GEMM would be.
grid (row tiles, column tiles, SPLIT_K), rows fastest (the programs sharing a weight tile run
together). Split-K partials as in triton_int4 (a float32 [SPLIT_K, M, N] scratch summed by torch.sum
or, serial, by the tile's last slice). Nothing reads device values on the host (CUDA-graph safe).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_int4 import _group_params, _plane
from .triton_int8 import _serial_split_reduce


@triton.jit
def _dequant(w, w_hi, scale, zero, I: tl.constexpr, DT: tl.constexpr):
    """Nibble plane I of the words as (q - zero) * scale in DT (scale, zero float32, broadcastable)."""
    step = 1 << (4 * (I % 4))  # the place value of plane I's nibble in its half-word
    return ((_plane(w, w_hi, I) - (zero * step + 8388608.0)) * (scale * (1.0 / step))).to(DT)


@triton.jit
def _unpacked_tile(w, scale, zero, DT: tl.constexpr):
    """[BLOCK_N, WORDS] int32 words -> [BLOCK_N, 8 * WORDS] dequantized codes in DT, column j = nibble
    j % 8 of word j // 8 (the joins nest so that the plane index is the minor one)."""
    w_hi = w >> 16
    p0 = _dequant(w, w_hi, scale, zero, 0, DT)
    p1 = _dequant(w, w_hi, scale, zero, 1, DT)
    p2 = _dequant(w, w_hi, scale, zero, 2, DT)
    p3 = _dequant(w, w_hi, scale, zero, 3, DT)
    p4 = _dequant(w, w_hi, scale, zero, 4, DT)
    p5 = _dequant(w, w_hi, scale, zero, 5, DT)
    p6 = _dequant(w, w_hi, scale, zero, 6, DT)
    p7 = _dequant(w, w_hi, scale, zero, 7, DT)
    # t[..., a, b, c] = plane 4a + 2b + c
    t = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tl.reshape(t, (w.shape[0], 8 * w.shape[1]))


@triton.jit
def _int4_tc_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                    stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                    ONE_GROUP: tl.constexpr, EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr,
                    SWAP: tl.constexpr, PRECISION: tl.constexpr):
    WORDS: tl.constexpr = 4 * CHUNKS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_w = tl.arange(0, WORDS)
    col_k = 32 * (offs_w // 4) + offs_w % 4  # plane 0's feature of each word, from the step's start
    offs_j = tl.arange(0, 8 * WORDS)
    feat_j = 32 * ((offs_j // 8) // 4) + 4 * (offs_j % 8) + (offs_j // 8) % 4  # feature of tile column j
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = offs_n.to(tl.int64) * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, 32 * CHUNKS, num_stages=STAGES):
        kc = k0 + col_k
        kj = k0 + feat_j
        if EVEN_K:  # every step whole: masks constant along K
            mask_k = tl.full([WORDS], 1, tl.int1)
            mask_j = tl.full([8 * WORDS], 1, tl.int1)
        else:  # whole chunks: K and every split bound are multiples of 32
            mask_k = kc < k_end
            mask_j = kj < k_end
        mask = mask_n[:, None] & mask_k[None, :]
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        w = tl.load(w_rows + (kw + offs_w)[None, :], mask=mask, other=0)
        scale, zero = _group_params(s_ptr, z_ptr, s_rows, mask_n, kc, mask, k0, GROUP, ONE_GROUP)
        wd = _unpacked_tile(w, scale, zero, DT)  # masked words dequantize to garbage; their x is 0
        if SWAP:
            xt = tl.load(x_rows[None, :] + kj[:, None], mask=mask_j[:, None] & mask_m[None, :], other=0.0)
            acc = tl.dot(wd, xt, acc, input_precision=PRECISION)
        else:
            xs = tl.load(x_rows[:, None] + kj[None, :], mask=mask_m[:, None] & mask_j[None, :], other=0.0)
            acc = tl.dot(xs, tl.trans(wd), acc, input_precision=PRECISION)
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch (every slice writes, empty ones zeros).
    if SWAP:
        offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        mask = mask_n[:, None] & mask_m[None, :]
    else:
        offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if SERIAL:
        _serial_split_reduce(out_ptr, stride_os, offs, mask, res_ptr, offs, lock_ptr,
                             pid_m * tl.num_programs(1) + pid_n, split_k)
