"""Triton kernel: RMSNorm of every query and key head in place inside the fused qkv projection output
(Qwen3, Gemma 3), one launch instead of the split / copy / norm / concatenate chain of the torch path.

Reference: `add_rms_norm_reference` (reference.py) applied per head with residual None, which is what
engine/model/llama.py's torch path computes.

Layout: qkv [T, (H + 2 Hkv) D], row-contiguous per token; heads 0..H-1 are queries (normed with q_weight
[D]), heads H..H+Hkv-1 keys (k_weight [D]); the V section is left alone. Grid (T, H + Hkv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_kernel(qkv_ptr, qw_ptr, kw_ptr, stride_t, eps, H: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    ptr = qkv_ptr + t.to(tl.int64) * stride_t + head * D + offs
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    y = (x * inv).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    if head < H:
        w = tl.load(qw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.load(kw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (w * y).to(qkv_ptr.dtype.element_ty), mask=mask)


def qk_norm_triton_(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int,
                    num_kv_heads: int, head_dim: int, eps: float) -> torch.Tensor:
    """Norm qkv's query and key heads in place; returns qkv."""
    if qkv.stride(1) != 1:
        raise ValueError("qk_norm_triton_ needs qkv with a contiguous last dimension")
    _qk_norm_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
        qkv, q_weight, k_weight, qkv.stride(0), eps, H=num_heads, D=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim))
    return qkv
