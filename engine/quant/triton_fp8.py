"""Triton kernel: per-token fp8 (e4m3) quantization of activations in one launch.

Reference: `quantize_fp8_per_token` in fp8.py (absmax per row, scale = max(absmax / 448, 1e-12),
codes = e4m3(clamp(x / scale, -448, 448)), round to nearest even). In torch that is five or six
kernels (abs, amax, divide, clamp, cast, ...) per Linear call, which at decode sizes cost more than
the fp8 GEMM saves; here it is one.

Layouts:
    x:      [M, K] float16 / bfloat16 / float32, K contiguous
    codes:  [M, K] float8_e4m3fn
    scales: [M, 1] float32
One program per row: pass 1 takes the row's absmax, pass 2 writes the codes (the row is re-read from
L2). Before the cast the values are rounded to the e4m3 grid in float32 (exponent from the bits,
round-half-even by the 1.5 * 2^23 trick), so the cast itself is exact: the same codes on every
backend, including Triton's CPU interpreter, whose float -> fp8 conversion mis-rounds values just
below a power of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def _round_to_e4m3_grid(v):
    """float32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), still float32."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below 2^-6 e4m3 is subnormal: a fixed step of 2^-9
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = v / ulp  # exact: a power of two
    r = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds |y| < 2^22 to an integer, ties to even
    return tl.where(r == 0.0, v * 0.0, r * ulp)  # keep the sign of values that round to zero, as a cast does


@triton.jit
def _fp8_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                          FP8_MAX: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + m * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, 1e-12)
    tl.store(s_ptr + m, scale)
    q_row = q_ptr + m * stride_qm
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(q_row + k0 + offs, _round_to_e4m3_grid(v).to(q_ptr.dtype.element_ty), mask=mask)


def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], float32 scales [M, 1]), as quantize_fp8_per_token, one launch."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    block = min(triton.next_power_of_2(k), 4096)
    _fp8_per_token_kernel[(m,)](x, codes, scales, k, x.stride(0), codes.stride(0), BLOCK_K=block, FP8_MAX=FP8_MAX,
                                num_warps=8 if block >= 2048 else 4)
    return codes, scales
