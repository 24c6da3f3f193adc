"""int8 weights at many rows on int8 tensor cores: each token's activations as two int8 limbs.

Reference: `int8_limbs_reference` below, and `int8_linear_reference` in int8.py, which it matches to within
the limbs' rounding (the bound below). Used by int8_matmul's tuner as candidates (kernel="limbs") from 17 rows.

Why. The int8 kernels of triton_int8 / triton_int8_mma convert every weight code to a 16-bit float on its way
into a bf16/fp16 MMA, and from 64 rows on the H200 they lost to cuBLAS bf16 (decode step 0.96x at 64, 0.67x
at 256: quant_kernels_h200_mma.json). The W8A8 fp8 GEMM (triton_fp8_gemm), whose operands go straight from
memory into the MMA, beat bf16 there (1.3x). Here the weight codes also go straight into an int8 MMA (s8 wgmma,
twice bf16's rate); the activations become int8 instead, without giving up 16-bit precision: per token,
    scale = max(|x|) / 16256,  v = rint(x / scale) (|v| <= 16256 = 127 * 128),
    hi = rint(v / 128) (|hi| <= 127),  lo = v - 128 hi (|lo| <= 64),
so x ~ scale * (128 hi + lo) with |x - scale * v| <= scale / 2 = max|x| / 32512: a 15-bit fixed point of
the token's range, finer than bfloat16's own rounding (2^-9 relative) for every value above max|x| / 64.
The two limbs are two rows of one int8 GEMM (rows 2t and 2t + 1 for token t; the products are exact in its
int32 sums), whose epilogue forms scale_t * w_scale_n * (128 acc[2t] + acc[2t + 1]). Twice the rows cost
twice the MMA work, which is bf16's at int8's doubled rate, while the weights are read as 1-byte codes and
never converted.

Launches: the limbs in one kernel per token (triton_fp8's per-token quantization with LIMBS), then
triton_fp8_gemm's kernel with LIMBS. Layouts: x [M, K] float, limbs [2M, K] int8 (K contiguous),
scales [M, 1] float32; q [N, K] int8, w_scale [N] float32 as int8.py; out [M, N] in x's dtype.
"""
from __future__ import annotations

import torch

from .triton_fp8 import _fp8_per_token_kernel, _row_launch
from .triton_fp8_gemm import _fp8_launch, dot_candidates

LIMB = 128  # hi's place value
LIMBS_MAX = 127 * LIMB  # the largest |v|: hi stays within int8
# chunk_order: feature u of a run of 32 at position CHUNK_PERM[u] (u = 8b + 4h + r -> 16h + 4r + b)
CHUNK_PERM = tuple(16 * ((u // 4) % 2) + 4 * (u % 4) + u // 8 for u in range(32))


def int8_limbs(x: torch.Tensor, chunk_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (limbs [2M, K] int8, scales [M, 1] float32): rows 2t, 2t + 1 are token t's hi and lo.
    chunk_order: each run of 32 features in the order of int4's kernel layout read as bytes (K % 32 == 0;
    triton_int4_limbs, CHUNK_PERM)."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    limbs = torch.empty((2 * m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return limbs, scales
    block, warps = _row_launch(k)
    _fp8_per_token_kernel[(m,)](x, limbs, scales, k, x.stride(0), 2 * k, BLOCK_K=block, FP8_MAX=float(LIMBS_MAX),
                                SINGLE=block >= k, HW_CAST=False, LIMBS=2 if chunk_order else 1, num_warps=warps)
    return limbs, scales


def int8_limbs_reference(x: torch.Tensor, chunk_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_limbs in torch (float32 arithmetic, the same roundings)."""
    xf = x.float()
    if chunk_order:  # position p holds the feature u with CHUNK_PERM[u] = p
        inverse = torch.tensor(CHUNK_PERM).argsort()
        xf = xf.view(x.shape[0], -1, 32)[:, :, inverse].reshape(x.shape)
    scales = (xf.abs().amax(dim=1, keepdim=True) * (1.0 / LIMBS_MAX)).clamp(min=1e-12)
    v = torch.round(xf / scales).clamp(-LIMBS_MAX, LIMBS_MAX)
    hi = torch.round(v * (1.0 / LIMB))
    limbs = torch.stack((hi, v - LIMB * hi), dim=1).to(torch.int8).reshape(2 * x.shape[0], x.shape[1])
    return limbs, scales


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
    """int8_matmul's tuning candidates for m rows on this path: the W8A8 kernel's tiles for 2m rows (their
    split-K variants up to 256 tokens; above, prefill chunks sharing one tuned config, unsplit tiles only)."""
    cands = dot_candidates(2 * m, n, k, sms)
    if m >= 128:  # 128 tokens a tile: 256 limb rows, the widest N of an MMA, so each weight tile is read once or twice
        wide = [dict(kernel=kernel, block_m=256, block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=3)
                for kernel in ("triton", "tma") if kernel == "triton" or any(c["kernel"] == "tma" for c in cands)]
        cands += wide
    if m > 256:
        cands = [c for c in cands if c.get("split_k", 1) == 1]
    return [dict(kernel="limbs", tma=c["kernel"] == "tma", **{key: v for key, v in c.items() if key != "kernel"})
            for c in cands]
