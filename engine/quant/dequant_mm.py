"""Many rows: dequantize the weight into x's dtype, then one cuBLAS matmul (config kernel="dequant").

At a few hundred rows and more a matmul is bound by its arithmetic, not by reading the weight, so the
4x / 2x fewer weight bytes of int4 / int8 buy little there, and the fused kernels (triton_int4*.py,
triton_int8*.py) pay their in-register dequantization once per weight and row tile on top of an MMA
that cuBLAS runs faster. Writing the float weight once and handing it to cuBLAS costs one pass over
N x K 16-bit values, a small share of a prefill chunk's matmul; vLLM's AWQ layer does the same from 256
tokens on. tuning.pick times it, in three tiles of the dequantization kernel, beside the fused kernels
above 64 rows; above 256 rows (prefill chunks) its first tile is the untuned default.

The float weight is built and used in slices of at most SLICE_BYTES (output channels [a, b)), each
matmul writing its columns of the output in place, so the transient memory stays bounded for wide layers
(an LM head, a 70B MLP); the memory planner counts one slice.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .int4 import KERNEL_CHUNK
from .int4_layout import _word_offsets, layout_args

SLICE_BYTES = 128 * 2**20  # the largest dequantized weight slice alive at once (bytes)
DEQUANT_MIN_ROWS = 65  # rows from which tuning times the candidate (below, the fused kernels always win)
DEQUANT_FIRST_ROWS = 257  # rows from which it is the untuned default


@triton.jit
def _int4_dequant_kernel(p_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_p, stride_ps, stride_s, stride_w,
                         RUN: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """w[n, k] = (q[n, k] - zero[n, k // GROUP]) * scale[n, k // GROUP] for a [BLOCK_N, 32 * CHUNKS] tile, from
    int4.pack_int4_kernel's layout (nibble i of word r of chunk c is feature 32c + 4i + r): the 8 nibbles of
    each word are unpacked along a new axis and the tile permuted to feature order in registers."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = pid_k * 4 * CHUNKS + tl.arange(0, 4 * CHUNKS)
    chunks = pid_k * CHUNKS + tl.arange(0, CHUNKS)
    feats = pid_k * 32 * CHUNKS + tl.arange(0, 32 * CHUNKS)
    mask_n = rows < N
    w = tl.load(p_ptr + rows[:, None] * stride_p + _word_offsets(words, stride_ps, RUN)[None, :],
                mask=mask_n[:, None] & (words < K // 8)[None, :], other=0)
    q = (w[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 15  # [n, 4c + r, i]
    q = tl.permute(tl.reshape(q, (BLOCK_N, CHUNKS, 4, 8)), (0, 1, 3, 2))  # [n, c, i, r]: feature 32c + 4i + r
    # A chunk lies in one group (GROUP % 32 == 0): one scale and zero per row and chunk.
    params = rows[:, None] * stride_s + (chunks * 32 // GROUP)[None, :]
    pmask = mask_n[:, None] & (chunks * 32 < K)[None, :]
    scale = tl.load(s_ptr + params, mask=pmask, other=0.0).to(tl.float32)[:, :, None, None]
    zero = tl.load(z_ptr + params, mask=pmask, other=0).to(tl.float32)[:, :, None, None]
    val = tl.reshape((q.to(tl.float32) - zero) * scale, (BLOCK_N, 32 * CHUNKS))
    tl.store(w_ptr + rows[:, None] * stride_w + feats[None, :], val.to(w_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (feats < K)[None, :])


@triton.jit
def _int8_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, stride_q, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[n, k] = q[n, k] * scale[n] for a [BLOCK_N, BLOCK_K] tile."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0)
    scale = tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(w_ptr + rows[:, None] * stride_w + cols[None, :], (q.to(tl.float32) * scale[:, None]).to(
        w_ptr.dtype.element_ty), mask=mask)


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype, block_n: int = 32, chunks: int = 4) -> torch.Tensor:
    """The float weight [N, K] in `dtype` of the kernel layout `packed` [N, K // (8 * RUN), RUN] int32
    (int4.pack_int4_kernel); a program writes block_n rows x 32 * chunks features."""
    stride_p, stride_ps, run = layout_args(packed)
    n, k = packed.shape[0], packed[0].numel() * 8
    if k % KERNEL_CHUNK or group_size % KERNEL_CHUNK:
        raise ValueError(f"int4_dequantize needs K and group_size multiples of {KERNEL_CHUNK}, got {k} and "
                         f"{group_size}")
    if scales.stride() != zeros.stride() or scales.stride(1) != 1:
        raise ValueError("int4_dequantize needs scales and zeros with the same strides, row-major")
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, KERNEL_CHUNK * chunks))
    _int4_dequant_kernel[grid](packed, scales, zeros, w, n, k, stride_p, stride_ps, scales.stride(0), w.stride(0),
                               RUN=run, GROUP=group_size, BLOCK_N=block_n, CHUNKS=chunks)
    return w


def int8_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, block_n: int = 8,
                    block_k: int = 1024) -> torch.Tensor:
    """The float weight [N, K] in `dtype` of int8 codes q [N, K] (row-major) and per-channel scales [N]."""
    if q.stride(1) != 1:
        raise ValueError("int8_dequantize needs row-major codes")
    n, k = q.shape
    w = torch.empty((n, k), dtype=dtype, device=q.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _int8_dequant_kernel[grid](q, scales, w, n, k, q.stride(0), w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k)
    return w


# Tiles tuning times per format (the first is the default): (block_n, chunks of 32 features) for int4,
# (block_n, block_k) for int8.
INT4_TILES = ((32, 4), (16, 8), (64, 2))
INT8_TILES = ((8, 1024), (16, 512), (32, 256))


def with_dequant(m: int, candidates: list[dict], kind: str) -> list[dict]:
    """A dequantizing kernel's tuning candidates for m rows with this module's tiles for `kind` ("int4" or
    "int8") added: first from DEQUANT_FIRST_ROWS rows on (the first tile is then the untuned default), last from
    DEQUANT_MIN_ROWS, not at all below."""
    keys = ("block_n", "chunks") if kind == "int4" else ("block_n", "block_k")
    ours = [dict(kernel="dequant", **dict(zip(keys, tile))) for tile in (INT4_TILES if kind == "int4" else INT8_TILES)]
    if m >= DEQUANT_FIRST_ROWS:
        return ours + candidates
    return candidates + ours if m >= DEQUANT_MIN_ROWS else candidates


def slice_rows(k: int, element_size: int) -> int:
    """Output channels of a K-wide float weight slice of element_size-byte values (at most SLICE_BYTES, >= 1)."""
    return max(1, SLICE_BYTES // (k * element_size))


def sliced_matmul(x: torch.Tensor, n: int, weight_rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, where weight_rows(a, b) builds rows [a, b) of W in x's dtype;
    W is built in slices of slice_rows channels, each slice's matmul writing its output columns in place."""
    m, k = x.shape
    rows = slice_rows(k, x.element_size())
    if rows >= n:
        return x @ weight_rows(0, n).t()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        torch.mm(x, weight_rows(a, b).t(), out=out[:, a:b])
    return out


def int4_dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, block_n: int = 32, chunks: int = 4) -> torch.Tensor:
    """int4_matmul's kernel="dequant": the weight dequantized in slices, each multiplied by cuBLAS."""
    return sliced_matmul(x, packed.shape[0], lambda a, b: int4_dequantize(
        packed[a:b], scales[a:b], zeros[a:b], group_size, x.dtype, block_n, chunks))


def int8_dequant_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block_n: int = 8,
                        block_k: int = 1024) -> torch.Tensor:
    """int8_matmul's kernel="dequant": the weight dequantized in slices, each multiplied by cuBLAS."""
    return sliced_matmul(x, q.shape[0], lambda a, b: int8_dequantize(q[a:b], scales[a:b], x.dtype, block_n, block_k))
