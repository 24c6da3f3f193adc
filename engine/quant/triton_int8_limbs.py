"""int8 weights at many rows on int8 tensor cores: each token's activations as two int8 limbs.

Reference: `int8_limbs_reference` below, and `int8_linear_reference` in int8.py, which it matches to within
the limbs' rounding (the bound below). Used by int8_matmul's tuner as candidates (kernel="limbs") from 17 rows.

Why. The int8 kernels of triton_int8 / triton_int8_mma convert every weight code to a 16-bit float on its way
into a bf16/fp16 MMA, and from 64 rows on the H200 they lost to cuBLAS bf16 (the decode step's GEMMs 0.99x at
64 rows, 0.56x at 256: quant_kernels_h200_mma.json). The W8A8 fp8 GEMM (triton_fp8_gemm), whose operands go
straight from memory into the MMA, beat bf16 there (1.3x). Here the weight codes also go straight into an int8
MMA (s8 wgmma, twice bf16's rate); the activations become int8 instead, without giving up 16-bit precision:
per token,
    scale = max(|x|) / 16256,  v = rint(x / scale) (|v| <= 16256 = 127 * 128),
    hi = rint(v / 128) (|hi| <= 127),  lo = v - 128 hi (|lo| <= 64),
so x ~ scale * (128 hi + lo) with |x - scale * v| <= scale / 2 = max|x| / 32512: a 15-bit fixed point of
the token's range, finer than bfloat16's own rounding (2^-9 relative) for every value above max|x| / 64.
The two limbs are two rows of one int8 GEMM (rows 2t and 2t + 1 for token t; the products are exact in its
int32 sums), whose epilogue forms scale_t * w_scale_n * (128 acc[2t] + acc[2t + 1]). Twice the rows cost
twice the MMA work, which is bf16's at int8's doubled rate, while the weights are read as 1-byte codes and
never converted.

Measured on the H200 (quant_kernels_limbs_h200_run3.json): the tuner picked this path for every layer of
llama-3.1-8b at 64 and 256 rows, the decode step's GEMMs 1.23x / 0.81x bf16 there (0.96x / 0.56x without it).
The same done for int4 codes (a nibble unpack into the MMA operand, a per-group scale each K step) lost to the
existing int4 kernels at every shape (quant_kernels_limbs_h200_run2.json) and was removed.

Launches: the limbs in one kernel per token (_limbs_kernel), then triton_fp8_gemm's kernel with LIMBS.
Layouts: x [M, K] float, limbs [2M, K] int8 (K contiguous), scales [M, 1] float32; q [N, K] int8,
w_scale [N] float32 as int8.py; out [M, N] in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fp8 import _row_launch
from .triton_fp8_gemm import _fp8_launch, dot_candidates

LIMB = 128  # hi's place value
LIMBS_MAX = 127 * LIMB  # the largest |v|: hi stays within int8
_LIMBS_MAX = tl.constexpr(float(LIMBS_MAX))  # (what a @triton.jit function may read)


@triton.jit
def _rint(v):
    """v rounded to the nearest integer, ties to even (1.5 * 2^23 added and taken off; |v| < 2^22), as a float."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _store_limbs(l_row, n, k0, y, scale, mask, BLOCK: tl.constexpr):
    """Features k0 .. k0 + BLOCK of one token (y float32, masked to 0): the int8 limbs of v = rint(y / scale)
    (|v| <= LIMBS_MAX), hi = rint(v / 128) at l_row and lo = v - 128 hi (|lo| <= 64) at l_row + n, so that
    y ~ scale * (128 hi + lo)."""
    v = tl.math.div_rn(y, scale)
    v = _rint(v)
    v = tl.minimum(tl.maximum(v, -_LIMBS_MAX), _LIMBS_MAX)
    hi = _rint(v * (1.0 / 128.0))
    offs = k0 + tl.arange(0, BLOCK)
    tl.store(l_row + offs, hi.to(tl.int8), mask=mask)
    tl.store(l_row + n + offs, (v - 128.0 * hi).to(tl.int8), mask=mask)


@triton.jit
def _limbs_kernel(x_ptr, l_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """One program a token: its scale (absmax / LIMBS_MAX, floored at 1e-12), then its limbs (_store_limbs); the
    row read once when it fits a block, else absmax over the row, then the limbs, the row re-read (from L2)."""
    t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + t * stride_xm
    l_row = l_ptr + 2 * t * K
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        y = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(y), 0) * (1.0 / _LIMBS_MAX), 1e-12)
        _store_limbs(l_row, K, 0, y, scale, offs < K, BLOCK)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, 0) * (1.0 / _LIMBS_MAX), 1e-12)
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            y = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            _store_limbs(l_row, K, k0, y, scale, mask, BLOCK)
    tl.store(s_ptr + t, scale)


def int8_limbs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (limbs [2M, K] int8, scales [M, 1] float32): rows 2t, 2t + 1 are token t's hi and lo."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    limbs = torch.empty((2 * m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return limbs, scales
    block, warps = _row_launch(k)
    _limbs_kernel[(m,)](x, limbs, scales, k, x.stride(0), BLOCK=block, SINGLE=block >= k, num_warps=warps)
    return limbs, scales


def int8_limbs_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_limbs in torch (float32 arithmetic, the same roundings)."""
    xf = x.float()
    scales = (xf.abs().amax(dim=1, keepdim=True) * (1.0 / LIMBS_MAX)).clamp(min=1e-12)
    v = torch.round(xf / scales).clamp(-LIMBS_MAX, LIMBS_MAX)
    hi = torch.round(v * (1.0 / LIMB))
    return torch.stack((hi, v - LIMB * hi), dim=1).to(torch.int8).reshape(2 * x.shape[0], x.shape[1]), scales


def limbs_matmul(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, *, tma: bool = False,
                 block_m: int | None = None, block_n: int | None = None, block_k: int = 128,
                 split_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                 serial: bool = False) -> torch.Tensor:
    """x [M, K] @ (q [N, K] int8 * w_scale [N])^T -> [M, N] in x's dtype through the limbs. block_m counts
    limb rows (two a token, even); tma: tensor-descriptor loads (Triton >= 3.4, K % 16 == 0)."""
    if block_m is not None and block_m % 2:
        raise ValueError(f"block_m={block_m}: limb rows come in pairs, expected an even tile")
    limbs, scales = int8_limbs(x)
    return _fp8_launch(limbs, scales, q, w_scale, x.dtype, kernel="tma" if tma else "triton", block_m=block_m,
                       block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                       num_stages=num_stages, serial=serial, limbs=True)


def limbs_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """int8_matmul's tuning candidates for m rows on this path: the W8A8 kernel's tiles for 2m limb rows with their
    split-K variants (tensor-descriptor loads where they can run, else pointer loads), and from 128 rows 128-token
    tiles (256 limb rows, the widest MMA N: each weight tile read once or twice). None above 256 rows: a prefill
    chunk's limbs would be a second copy of its activations, past the activation peak the memory planner models,
    and there the dequantize-then-cuBLAS path won anyway on the H200 (all but the LM head at 512 rows,
    quant_engine_limbs_h200_run3.json)."""
    if m > 256:
        return []
    cands = dot_candidates(2 * m, n, k, sms)
    # Tensor-descriptor loads where they can run: they won all 10 layer x row-bucket choices on the H200, the same
    # tile with pointer loads within 1-2% (quant_kernels_limbs_h200_run3.json): pointer variants only cost tuning.
    cands = [c for c in cands if c["kernel"] == "tma"] or cands
    if m >= 128:
        cands.append(dict(block_m=256, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=3,
                          kernel=cands[0]["kernel"]))
    return [dict(kernel="limbs", tma=c["kernel"] == "tma", **{key: v for key, v in c.items() if key != "kernel"})
            for c in cands]
