"""fp8 W8A8: e4m3 weights with one scale per output channel, activations quantized per token on the fly.

Format (per Linear of weight W [N, K]):
    weight_fp8:   [N, K] float8_e4m3fn, W / scale saturated to +-448
    weight_scale: [N] float32, scale = max_k |W[n, k]| / 448
Forward: each row of x gets its own scale max|x_row| / 448, is cast to e4m3 (on CUDA by one fused
Triton kernel, triton_fp8.py), and
the fp8 tensor cores multiply with both scale vectors applied to the float32 accumulator (row-wise
scaling): torch._scaled_mm, or triton_fp8_gemm's swap-AB tl.dot kernel where tuning measured it faster
(small batches, where _scaled_mm's tiles fit poorly). That needs compute capability >= 8.9 (Ada,
Hopper): elsewhere
`check_fp8_supported` raises a ValueError that names `quantization`.
`fp8_linear_reference` is the float oracle: the same rounding of W and x, a float32 product.
`Fp8Linear.forward_quantized` takes the input already quantized, for the kernels that fuse the
quantization into whatever produces the activation (triton_fp8.add_rms_norm_fp8, silu_and_mul_fp8).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_supported(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_supported(device: torch.device) -> None:
    """Raise ValueError naming the quantization setting if `device` has no fp8 matrix units."""
    device = torch.device(device)
    if fp8_supported(device):
        return
    where = "the CPU" if device.type != "cuda" else \
        f"{torch.cuda.get_device_name(device)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
    raise ValueError(f"quantization='fp8' needs a GPU with fp8 tensor cores (compute capability >= 8.9: Ada, "
                     f"Hopper or later), but the model is on {where}: use quantization='int8' or 'int4', or None")


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (e4m3 [N, K], scales [N] float32)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scales [M, 1] float32), one dynamic scale per row."""
    # amax * (1 / 448), not amax / 448: torch on CUDA divides by a scalar that way, on the CPU exactly; a product
    # gives the same bits on both, and in the Triton kernels.
    scales = (x.abs().amax(dim=1, keepdim=True).float() * (1.0 / FP8_MAX)).clamp(min=1e-12)
    return (x.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scales


def fp8_linear_reference(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What the fp8 forward computes, in float32 on any device: both operands rounded to e4m3."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_fp8_per_token(x2)
    out = F.linear(xq.float() * xs, weight_fp8.float() * weight_scale[:, None])
    return out.view(*x.shape[:-1], -1).to(x.dtype)


class Fp8Linear(nn.Module):
    """Drop-in for nn.Linear running W8A8 through torch._scaled_mm; weight_fp8, weight_scale (and bias)
    are buffers, so engine.model.weights.weight_bytes counts them."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.view(1, -1))  # [1, N]: _scaled_mm's row-wise layout
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        check_fp8_supported(linear.weight.device)
        w, scales = quantize_fp8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:  # one fused kernel instead of torch's five or six (triton_fp8.py)
            from .triton_fp8 import fp8_quantize_per_token
            xq, xs = fp8_quantize_per_token(x2)
        else:
            xq, xs = quantize_fp8_per_token(x2)
        return self.forward_quantized(xq, xs, x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The Linear on an input already quantized per token: xq [M, K] e4m3 codes, xs [M, 1] float32
        scales (fp8_quantize_per_token, or a producer that fused it: triton_fp8.add_rms_norm_fp8,
        silu_and_mul_fp8) -> [M, N] in out_dtype, bias added."""
        if xq.dim() != 2 or xq.shape[1] != self.in_features:
            raise ValueError(f"Fp8Linear.forward_quantized: xq has shape {tuple(xq.shape)}, expected "
                             f"[M, {self.in_features}]")
        if xq.is_cuda:  # the GEMM tuning measured fastest for this shape: _scaled_mm or the Triton kernel
            from .triton_fp8_gemm import fp8_matmul
            out = fp8_matmul(xq, xs, self.weight_fp8, self.weight_scale, out_dtype)
        else:
            # weight_fp8.t() is the column-major [K, N] operand _scaled_mm wants, without a copy.
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                   out_dtype=out_dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 W8A8"
