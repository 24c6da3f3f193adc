"""int4 weight-only quantization: asymmetric, group-wise along the input dimension (AWQ/GPTQ-style).

Format (per Linear of weight W [N, K], group size G = 128, K % G == 0):
    qweight: [N, K // 2] uint8, two 4-bit codes per byte: input feature 2j in the low nibble, 2j + 1
             in the high nibble (GPTQ's order: its int32 words are these bytes, little-endian)
    scales:  [N, K // G] in the model dtype, scale = (max - min) / 15 over the group
    zeros:   [N, K // G] uint8 integer zero points in [0, 15], zero = round(-min / scale)
A code q stands for (q - zero) * scale. Rounding error per element <= scale / 2, except at the top
of a group's range, where the stored scale's own rounding (relative eps/2 of its dtype) can make
15 steps fall short of max - min: there the clamp adds up to 15 * eps/2 steps.

On CUDA the forward runs Triton kernels that unpack and dequantize in registers (triton_int4.py):
a GEMV-style kernel for a few rows (decode) and a tiled tl.dot kernel otherwise. On the CPU it
dequantizes with torch (`int4_linear_reference`), the oracle of those kernels.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GROUP_SIZE = 128
INT4_MAX = 15


def check_int4_shape(name: str, in_features: int, group_size: int = GROUP_SIZE) -> None:
    """Raise ValueError naming the layer if its input dim cannot be cut into whole groups."""
    if in_features % group_size != 0:
        raise ValueError(f"quantization='int4' needs every quantized layer's input dimension to be a multiple of "
                         f"the group size {group_size}, but {name} has in_features={in_features}: use "
                         "quantization='int8' (per-channel) for this model")


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (qweight [N, K//2] uint8, scales [N, K//G] scale_dtype, zeros [N, K//G] uint8).

    scale_dtype defaults to the weight's dtype. Codes are computed against the stored (rounded)
    scale, so dequantization reproduces exactly what the codes were chosen for.
    """
    n, k = weight.shape
    check_int4_shape("the weight", k, group_size)
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scales = ((hi - lo) / INT4_MAX).clamp(min=1e-8).to(scale_dtype or weight.dtype)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, INT4_MAX)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, INT4_MAX).to(torch.uint8).view(n, k)
    return pack_int4(q), scales, zeros.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] (values 0..15) -> [N, K // 2] uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> codes [N, K] uint8."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that (qweight, scales, zeros) stand for."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.view(n, groups, k // groups) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, k).to(dtype)


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequantized W^T in float32, returned in x's dtype."""
    return F.linear(x.float(), dequantize_int4(qweight, scales, zeros)).to(x.dtype)


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear holding packed int4 weights; qweight, scales, zeros (and bias) are
    buffers, so engine.model.weights.weight_bytes counts them."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int = GROUP_SIZE, perm: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        # GPTQ's act-order: the codes are stored with input feature perm[j] at column j (so that groups
        # stay contiguous) and the forward gathers x's features in that order. None: identity.
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64))

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "a Linear layer",
                    group_size: int = GROUP_SIZE) -> "Int4Linear":
        check_int4_shape(name, linear.in_features, group_size)
        qweight, scales, zeros = quantize_int4(linear.weight, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qweight, scales, zeros, bias, group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this layer multiplies by, in the original input order."""
        w = dequantize_int4(self.qweight, self.scales, self.zeros, dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if x.is_cuda:
            from .triton_int4 import int4_matmul
            out = int4_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros,
                              self.group_size)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = int4_linear_reference(x, self.qweight, self.scales, self.zeros)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group={self.group_size}")
