"""fp8 KV cache: K and V stored as float8_e4m3fn (1 byte per element instead of 2), one scale each.

A cached element c stands for c * k_scale (or v_scale). Writing divides by the scale, saturates to
+-448 (a plain cast to e4m3fn would turn overflow into NaN on some torch versions) and casts.
Reading never dequantizes the cache as a whole: attention is linear in V and K only enters the
scores, so softmax(q . (k_scale K)^T * s) (v_scale V) = v_scale * softmax(q . K^T * (s * k_scale)) V:
the backend multiplies the softmax scale by k_scale and the output by v_scale, and casts tiles to
float as it loads them.

The scales are fixed at 1.0, as vLLM does when a checkpoint carries none: e4m3 is a floating-point
format, so a unit scale keeps ~3 significant bits (relative error <= 2^-4) for any |x| in
[2^-6, 448], which covers the K/V of Llama-family models. We do not calibrate from the memory
profile run: it feeds token id 0 everywhere, so its K/V absmax says nothing about real inputs.
The scales travel in AttentionMetadata (k_scale, v_scale), one pair for all layers.
"""
from __future__ import annotations

import torch

KV_FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_CACHE_SCALE = 1.0


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the paged cache for EngineConfig.kv_cache_dtype ("auto" | "fp8")."""
    if kv_cache_dtype == "fp8":
        return KV_FP8_DTYPE
    if kv_cache_dtype == "auto":
        return model_dtype
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not allowed: choose 'auto' or 'fp8'")


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> e4m3 codes of x / scale, saturated."""
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)


def write_kv_fp8(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Scatter new K/V ([T, num_kv_heads, head_dim]) into e4m3 caches at slot_mapping ([T]).

    The scatter goes through uint8 views: index_copy_ has no float8 kernel on every device.
    """
    num_blocks, block_size, h, d = k_cache.shape
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        codes = quantize_kv(x, scale).view(torch.uint8)
        cache.view(torch.uint8).view(num_blocks * block_size, h, d).index_copy_(0, slot_mapping, codes)
