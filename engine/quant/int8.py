"""int8 weight-only quantization: symmetric, one scale per output channel; activations stay in 16 bits.

Format (per Linear of weight W [N, K], N output channels, K input features):
    weight_int8: [N, K] int8, q = round(W / scale) clamped to [-127, 127] (-128 unused: symmetric)
    scales:      [N] float32, scale = max_k |W[n, k]| / 127
Dequantized weight: q * scale[:, None]. Rounding error per element <= scale / 2.

On CUDA the forward runs a Triton matmul that dequantizes each weight tile in registers
(triton_int8.py); nothing of W is ever materialised in 16 bits. On the CPU it dequantizes with torch
(`int8_linear_reference`), which is also the oracle the Triton kernel is tested against.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (q [N, K] int8, scales [N] float32)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that (q, scales) stand for."""
    return (q.float() * scales.float()[:, None]).to(dtype)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequantized W^T in float32 (scale applied after the product, as the kernel does),
    returned in x's dtype."""
    out = F.linear(x.float(), q.float()) * scales.float()
    return out.to(x.dtype)


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear holding int8 weights; weight_int8, scales (and bias) are buffers, so
    engine.model.weights.weight_bytes counts them."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = quantize_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from .triton_int8 import int8_matmul
            out = int8_matmul(x.reshape(-1, self.in_features), self.weight_int8, self.scales)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = int8_linear_reference(x, self.weight_int8, self.scales)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"
