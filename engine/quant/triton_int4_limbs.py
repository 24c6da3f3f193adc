"""Group-wise int4 weights at many rows on int8 tensor cores, the activations as two int8 limbs a token.

Reference: `int4_linear_reference` in int4.py, which this matches to within the limbs' rounding
(triton_int8_limbs: x ~ scale_t * (128 hi + lo), |error| <= max|x_t| / 32512). Used by int4_matmul's tuner
as candidates (kernel="limbs") from 17 rows; int4, AWQ and GPTQ layers alike (the same layout).

The int4 kernels of triton_int4 / _tc / _mma dequantize every code to a 16-bit float for a bf16/fp16 MMA, and
from 64 rows on the H200 their decode step ran at 0.61-0.73x bf16 (quant_kernels_h200_mma.json). Here a code
goes into an s8 MMA as the integer q itself (0..15), from two bit operations on its byte:

    the weight in int4's kernel layout (pack_int4_kernel) read as bytes [N, K / 2]: in each 16-byte run of a
    32-feature chunk, byte j = 4r + b holds feature 8b + r (low nibble) and 8b + 4 + r (high nibble);
    the limbs in the matching order (int8_limbs(chunk_order=True): feature u = 8b + 4h + r of a chunk at
    position 16h + 4r + b), so the low nibbles of a step's bytes meet the first 16 limbs of each chunk and
    the high nibbles the last 16: two dots, each operand a contiguous load.

For a K step inside one group g (the step divides the group), with L the limb rows,
    acc[n, l] += s[n, g] * (sum_k q[n, k] L[l, k] - z[n, g] * sum_k L[l, k])
the integer part exact in int32 (|q L| sums <= 15 * 127 * step), the zero point folded out by the step's limb
sums (int8_limbs gives each limb row's sums over runs of 32 features), the group scale applied once a step (the
integer to float32 by its bits: Hopper converts 16 integers a clock per SM, a quarter of its float rate); the epilogue joins each token's two limb rows (triton_fp8_gemm's
_join_limbs). Grid (limb-row tiles, column tiles, SPLIT_K), rows fastest, split-K partials as triton_int8.
Nothing reads device values on the host (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fp8_gemm import _join_limbs
from .triton_int8 import _store_tile, _tile, gemv_result, split_outputs, split_variants
from .triton_int8_limbs import int8_limbs


@triton.jit(do_not_specialize=["M", "split_k"])
def _int4_limbs_kernel(l_ptr, xs_ptr, c_ptr, b_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split,
                       split_k, stride_lm, stride_cm, stride_bn, stride_sn, stride_os, stride_om,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SERIAL: tl.constexpr, STAGES: tl.constexpr):
    """M: limb rows (two a token); c_ptr: their run sums [M, K / 32]; b_ptr: the weight bytes [N, K / 2]; every step
    whole and inside one group."""
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    HALF: tl.constexpr = BLOCK_K // 2
    offs_j = tl.arange(0, HALF)  # a step's bytes; limb position of byte j's low nibble: 32 (j // 16) + j % 16
    pos_lo = 32 * (offs_j // 16) + offs_j % 16
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    l_cols = l_ptr + offs_m.to(tl.int64)[None, :] * stride_lm
    c_cols = c_ptr + offs_m.to(tl.int64)[None, :] * stride_cm
    offs_r = tl.arange(0, BLOCK_K // 32)
    s_rows = offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k_step in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        k0 = tl.multiple_of(k_step, BLOCK_K)
        wb = tl.load(b_rows + (k0 // 2 + offs_j)[None, :], mask=mask_n[:, None], other=0)
        lo = (wb & 0xF).to(tl.int8)
        hi = (wb >> 4).to(tl.int8)
        x_lo = tl.load(l_cols + (k0 + pos_lo)[:, None], mask=mask_m[None, :], other=0)  # [HALF, BLOCK_M]
        x_hi = tl.load(l_cols + (k0 + 16 + pos_lo)[:, None], mask=mask_m[None, :], other=0)
        part = tl.dot(lo, x_lo, out_dtype=tl.int32)
        part = tl.dot(hi, x_hi, part, out_dtype=tl.int32)
        lsum = tl.sum(tl.load(c_cols + (k0 // 32 + offs_r)[:, None], mask=mask_m[None, :], other=0), axis=0)
        g = k0 // GROUP
        scale = tl.load(s_ptr + s_rows + g, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + s_rows + g, mask=mask_n, other=0).to(tl.int32)
        # |part - zero * lsum| < 2^22: to float32 by the 1.5 * 2^23 bits (an add, a subtract), not the slow converter
        t = (part - zero[:, None] * lsum[None, :] + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        acc += t * scale[:, None]
    out, offs_t, mask_t = _join_limbs(acc, xs_ptr, pid_m, M, BLOCK_M)
    _store_tile(out_ptr, out, offs_t, offs_n, mask_t, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=True, SERIAL=SERIAL)


def int4_limbs_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, *, block_m: int = 64, block_n: int = 128, block_k: int = 128, split_k: int = 1,
                      num_warps: int = 4, num_stages: int = 3, serial: bool = False) -> torch.Tensor:
    """x [M, K] @ dequant(packed [N, K / 8] int32 kernel layout, scales, zeros)^T -> [M, N] in x's dtype.
    block_m counts limb rows (two a token, even); block_k divides the group and is a multiple of 64."""
    m, k = x.shape
    n = packed.shape[0]
    if block_m % 2 or block_k % 64 or group_size % block_k:
        raise ValueError(f"block_m={block_m} must be even and block_k={block_k} a multiple of 64 (each nibble's dot "
                         f"a K of 32, an int8 MMA's) dividing the group ({group_size})")
    limbs, xs, sums = int8_limbs(x, chunk_order=True)
    weight_bytes = packed.view(torch.uint8)  # [N, K / 2]: little-endian bytes of the words
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    grid, out, split_stride, locks, res = split_outputs(x.device, m, n, block_m // 2, block_n, split_k, serial, x.dtype)
    _int4_limbs_kernel[grid](
        limbs, xs, sums, weight_bytes, scales, zeros, out, res, out if locks is None else locks, 2 * m, n, k,
        k_per_split, split_k, limbs.stride(0), sums.stride(0), weight_bytes.stride(0), scales.stride(0), split_stride,
        out.stride(-2),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SERIAL=locks is not None,
        STAGES=num_stages if x.is_cuda else 1, num_warps=num_warps)
    return res if locks is not None else gemv_result(out, x.dtype)


# (block_m limb rows, block_n, num_warps, num_stages), K steps of 128 features (64 bytes a weight row)
LIMBS4_TILES = ((32, 128, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3),
                (256, 128, 8, 3), (128, 256, 8, 3))


def int4_limbs_candidates(m: int, n: int, k: int, group_size: int, sms: int) -> list[dict]:
    """int4_matmul's tuning candidates on this path for m rows: LIMBS4_TILES whose row tile fits 2m limb rows (the
    smallest that covers them at least), split-K up to 2 programs per SM while each slice keeps >= 4 K steps (up to
    256 tokens: prefill chunks share one tuned config, so unsplit there)."""
    if group_size % 64:
        return []
    block_k = 128 if group_size % 128 == 0 else 64
    fit = min((bm for bm, *_ in LIMBS4_TILES if bm >= 2 * m), default=256)
    cands = []
    for block_m, block_n, warps, stages in LIMBS4_TILES:
        if block_m > fit:
            continue
        programs = triton.cdiv(2 * m, block_m) * triton.cdiv(n, block_n)
        split = 1 if m > 256 else max(1, min(triton.cdiv(2 * sms, programs), k // block_k // 4 or 1, 8))
        cands.append(dict(kernel="limbs", block_m=block_m, block_n=block_n, block_k=block_k, split_k=split,
                          num_warps=warps, num_stages=stages))
    return split_variants(cands)
