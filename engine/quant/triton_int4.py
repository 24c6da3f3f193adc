"""Triton kernels: out = x @ dequant(W)^T for group-wise int4 weights, unpacked and dequantized in registers.

Reference: `int4_linear_reference` in int4.py.

Layouts (G = group size, 128 by default):
    x:       [M, K] float16 / bfloat16 / float32, K contiguous
    qweight: [N, K // 2] uint8; byte j of row n holds code k = 2j (low nibble) and k = 2j + 1 (high)
    scales:  [N, K // G] float; zeros: [N, K // G] uint8; a code c stands for (c - zero) * scale
    out:     [M, N] in x's dtype
The two nibbles of a byte meet the even and the odd input features, so neither kernel interleaves
weights: they load x contiguously, split it into even and odd features (tl.reshape + tl.split),
and contract each half with one nibble.
- `_int4_gemv_kernel` (M <= GEMV_MAX_ROWS, decode): grid (M, cdiv(N, BLOCK_N), SPLIT_K), row fastest
  (programs that share a weight tile run together). Each iteration loads a [BLOCK_N, GROUPS, G/2]
  byte tile (GROUPS whole groups), with one scale and zero per (channel, group), and reduces the
  group's products once; with SPLIT_K > 1 the K slices store float32 partials that one torch.sum
  reduces (as in triton_int8.py). The group loop can be software-pipelined (STAGES).
- `_int4_mm_kernel` (more rows): one group per iteration, the [BLOCK_N, G/2] tiles of both nibbles
  dequantized to x's dtype and fed to two tl.dot calls (x's even and odd features loaded as two
  stride-2 tiles); grid (row tiles, column tiles, SPLIT_K), split-K partials summed like the GEMV's,
  so that 16-64 rows of a 4096-wide layer still fill the GPU. Its config (column tile, split,
  warps, stages) is measured on the device per shape and bucket of rows (mm_bucket), like the GEMV's.
Codes become floats with the exponent trick (bits 0x4B000000 | c are the float 2^23 + c), and the
2^23 is folded into the zero point: dequantization is an OR, a subtract and a multiply.
Which tile, split and pipelining a decode shape gets is measured on the device (tuning.py).
Nothing reads device values on the host, so the launches can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .triton_int8 import (gemv_candidates, gemv_output, gemv_result, gemv_split_k, mm_block_m, mm_bucket,
                          mm_candidates, num_sms)

GEMV_MAX_ROWS = 2


@triton.jit
def _nibbles_to_float(b):
    """uint8 bytes -> (low codes, high codes) as float32 2^23 + code."""
    b = b.to(tl.int32)
    lo = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True)
    hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, num_groups, split_k,
                      stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_g = tl.arange(0, GROUPS)
    offs_j = tl.arange(0, HALF)
    offs_k = tl.arange(0, GROUP)
    groups_per_split = tl.cdiv(tl.cdiv(num_groups, split_k), GROUPS) * GROUPS
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for g0 in tl.range(g_start, g_end, GROUPS, num_stages=STAGES):
        gg = g0 + offs_g
        mask_g = gg < g_end
        mask_ng = mask_n[:, None] & mask_g[None, :]
        b = tl.load(w_rows + (gg * HALF)[None, :, None] + offs_j[None, None, :], mask=mask_ng[:, :, None], other=0)
        scale = tl.load(s_ptr + s_rows + gg[None, :], mask=mask_ng, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + s_rows + gg[None, :], mask=mask_ng, other=0).to(tl.float32) + 8388608.0
        # x of these groups, contiguous, split into the features that meet low and high nibbles.
        x = tl.load(x_row + gg[:, None] * GROUP + offs_k[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, (GROUPS, HALF, 2)))
        lo, hi = _nibbles_to_float(b)
        z3 = zero[:, :, None]
        part = tl.sum((lo - z3) * xe[None, :, :] + (hi - z3) * xo[None, :, :], 2)
        acc += part * scale
    out = tl.sum(acc, 1)
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch, summed afterwards (see triton_int8.py).
    dst = out_ptr + pid_k.to(tl.int64) * stride_os + m.to(tl.int64) * stride_om + offs_n
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_mm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, num_groups, split_k,
                    stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # The even and odd input features of a group, loaded as two stride-2 tiles (they share cache lines),
    # meet the low and the high nibbles: no reshape of x in registers.
    x_even = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + 2 * offs_j[None, :]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_j[None, :]
    s_rows = offs_n.to(tl.int64) * stride_sn
    groups_per_split = tl.cdiv(num_groups, split_k)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in tl.range(g_start, g_end, num_stages=STAGES):
        xe = tl.load(x_even + g * GROUP, mask=mask_m[:, None], other=0.0)
        xo = tl.load(x_even + g * GROUP + 1, mask=mask_m[:, None], other=0.0)
        b = tl.load(w_rows + g * HALF, mask=mask_n[:, None], other=0)
        scale = tl.load(s_ptr + s_rows + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(z_ptr + s_rows + g, mask=mask_n, other=0).to(tl.float32)[:, None] + 8388608.0
        lo, hi = _nibbles_to_float(b)
        w_lo = ((lo - zero) * scale).to(xe.dtype)
        w_hi = ((hi - zero) * scale).to(xe.dtype)
        acc += tl.dot(xe, tl.trans(w_lo))
        acc += tl.dot(xo, tl.trans(w_hi))
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch, summed afterwards (as the GEMV's).
    dst = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int = 128, *, block_n: int | None = None, groups_per_iter: int | None = None,
                split_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                gemv: bool | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight [N, K/2], scales, zeros)^T -> [M, N] in x's dtype.

    With no keyword argument, a decode-sized call (M <= GEMV_MAX_ROWS) on CUDA uses the config
    tuning.pick measured fastest for its shape; the keywords force a config (tests, benchmarks).
    """
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 2 != k or k % group_size != 0:
        raise ValueError(f"int4_matmul: x has {k} features but the weight holds {qweight.shape[1] * 2} "
                         f"in groups of {group_size}")
    if scales.stride() != zeros.stride():
        raise ValueError("int4_matmul needs scales and zeros with the same strides")
    if x.stride(1) != 1:
        x = x.contiguous()
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    forced = dict(block_n=block_n, groups_per_iter=groups_per_iter, split_k=split_k, num_warps=num_warps,
                  num_stages=num_stages, gemv=gemv)
    forced = {key: v for key, v in forced.items() if v is not None}
    if not forced:
        copies = lambda: [(x, qweight if i == 0 else qweight.clone(), scales, zeros, group_size)  # noqa: E731
                          for i in range(tuning.weight_copies(qweight.numel()))]
        if m <= GEMV_MAX_ROWS:
            cands = gemv_candidates(dict(gemv=True), num_sms(x.device), m, n, triton.cdiv(k // group_size, 2),
                                    "groups_per_iter")
            key = ("int4", m, n, k, x.dtype)
        else:  # one tuned config per bucket of m, not per m (the engine's graphs alone use ~35 sizes)
            cands = mm_candidates(m, n, k // group_size, num_sms(x.device))  # K tile: one group
            key = ("int4_mm", mm_bucket(m), n, k, x.dtype)
        forced = tuning.pick(key, cands, lambda c, *a: _launch(*a, **c), copies, x.device)
    return _launch(x, qweight, scales, zeros, group_size, **forced)


def _launch(x, qweight, scales, zeros, group_size, *, block_n=None, groups_per_iter=None, split_k=None,
            num_warps=None, num_stages=None, gemv=None):
    m, k = x.shape
    n = qweight.shape[0]
    num_groups = k // group_size
    if gemv is None:
        gemv = m <= GEMV_MAX_ROWS
    if gemv:
        block_n = block_n or 32
        groups = groups_per_iter or 2
        if split_k is None:
            split_k = gemv_split_k(m, triton.cdiv(n, block_n), triton.cdiv(num_groups, groups), num_sms(x.device))
        out, split_stride = gemv_output(x, n, split_k)
        _int4_gemv_kernel[(m, triton.cdiv(n, block_n), split_k)](
            x, qweight, scales, zeros, out, n, num_groups, split_k,
            x.stride(0), qweight.stride(0), scales.stride(0), split_stride, out.stride(-2),
            GROUP=group_size, BLOCK_N=block_n, GROUPS=groups, STAGES=num_stages or 1, num_warps=num_warps or 4)
        return gemv_result(out, x.dtype)
    block_m = mm_block_m(m)
    block_n = block_n or (64 if m <= 64 else 128)
    split_k = split_k or 1
    out, split_stride = gemv_output(x, n, split_k)
    _int4_mm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)](
        x, qweight, scales, zeros, out, m, n, num_groups, split_k,
        x.stride(0), qweight.stride(0), scales.stride(0), split_stride, out.stride(-2),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=(num_stages or 3) if x.is_cuda else 1,
        num_warps=num_warps or 4)
    return gemv_result(out, x.dtype)
