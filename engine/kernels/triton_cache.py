"""Triton kernel: write the new tokens' K/V into the paged cache through the slot mapping.

Reference: `write_kv_reference` in reference.py (an index_copy_ over the flattened cache).

Layouts:
    key, value:       [T, num_kv_heads, head_dim], any strides (often a view of the fused qkv output)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous
    slot_mapping:     [T] int64, slot = block_id * block_size + offset; a negative slot is skipped
                      (padding tokens of a CUDA-graph batch write nothing)
One program writes one (token, kv head) row of head_dim elements for K and for V, cast to the
cache's dtype (so an fp8 cache takes a plain cast, as the reference does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        src_k = key_ptr + token.to(tl.int64) * stride_kt + head * stride_kh + offs_d
        src_v = value_ptr + token.to(tl.int64) * stride_vt + head * stride_vh + offs_d
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + head * stride_ch + offs_d
        k = tl.load(src_k, mask=mask_d)
        v = tl.load(src_v, mask=mask_d)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask_d)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask_d)


def write_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Scatter key/value ([T, num_kv_heads, head_dim]) into the paged caches at slot_mapping ([T]).

    No host sync: the grid is the shape (T, num_kv_heads).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("write_kv_triton needs key/value with a contiguous head_dim (stride 1)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("write_kv_triton needs k_cache and v_cache with the same strides and a contiguous head_dim")
    block_size = k_cache.shape[1]
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if head_dim <= 128 else 2,
    )
