"""Triton kernel: the W8A8 GEMM out = (x codes * row scale) @ (w codes * channel scale)^T, e4m3 codes.

Reference: `fp8_linear_reference` in fp8.py. torch._scaled_mm (cuBLASLt / CUTLASS row-wise) is the other
candidate; which one a shape and row bucket runs is measured on the device (fp8_candidates, tuning.pick):
the Triton tiles pay at decode sizes, where a few rows need split-K to fill the GPU, and above 256 rows
(prefill chunks) scaled_mm alone runs. The activations' codes come from triton_fp8.py's kernels.

Layouts:
    xq: [M, K] e4m3 codes, K contiguous; xs: [M, 1] float32
    wq: [N, K] e4m3 codes, K contiguous; ws: [N] (or [1, N]) float32
    out: [M, N] in the requested dtype
"""
from __future__ import annotations

import importlib.util

import torch
import triton
import triton.language as tl

from .triton_int8 import _k_step, _store_tile, _tile

# Host tensor descriptors (kernel="tma") came with Triton 3.4; older ones tune the pointer-load kernel alone.
HAS_TMA = importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


@triton.jit
def _join_limbs(acc, xs_ptr, pid_m, M, BLOCK_M: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] float32 over limb rows (2t: hi, 2t + 1: lo of token t; M limb rows in all) ->
    (scale_t * (128 hi + lo) [BLOCK_N, BLOCK_M // 2], the tokens' offsets, their mask)."""
    hi, lo = tl.split(tl.reshape(acc, (acc.shape[0], BLOCK_M // 2, 2)))
    offs_t = pid_m * (BLOCK_M // 2) + tl.arange(0, BLOCK_M // 2)
    mask_t = offs_t < M // 2
    xs = tl.load(xs_ptr + offs_t, mask=mask_t, other=0.0)
    return (hi * 128.0 + lo) * xs[None, :], offs_t, mask_t


@triton.jit
def _fp8_dot_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                    stride_xm, stride_wn, stride_os, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    SERIAL: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                    LIMBS: tl.constexpr = False):
    """out[m, n] = xs[m] * ws[n] * sum_k x[m, k] w[n, k], A and B swapped (acc[n, m] = W x^T) so that a
    few rows make a 16-wide MMA N while the weights fill its 64-128-row M; split-K as int4's kernels.
    TMA: x_ptr and w_ptr are tensor descriptors of [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K] boxes (Hopper's
    bulk copies, zero-filled past M, N and K; a slice ends on a whole K tile, so only K's end is ragged).
    LIMBS (triton_int8_limbs): int8 codes, x's M rows the hi / lo limbs of M / 2 tokens (rows 2t, 2t + 1),
    summed in int32; the epilogue joins each pair, 128 * hi + lo, and scales it by its token's xs."""
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    if LIMBS:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        if TMA:
            w = w_ptr.load([pid_n * BLOCK_N, k0])
            xt = tl.trans(x_ptr.load([pid_m * BLOCK_M, k0]))
        else:
            offs_k, mask_k = _k_step(k0, k_end, BLOCK_K, EVEN_K)
            w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            # x^T: K-major, as fp8 MMAs want B
            xt = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None],
                         mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        if LIMBS:  # int32 sums (Triton 3.6 wants an accumulator of the dot's out_dtype and no input precision)
            acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    if LIMBS:
        acc, offs_m, mask_m = _join_limbs(acc.to(tl.float32) * ws[:, None], xs_ptr, pid_m, M, BLOCK_M)
    else:
        xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        acc = acc * ws[:, None] * xs[None, :]
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch, summed by the tile's last slice into
    # res_ptr (SERIAL) or by a torch.sum afterwards (triton_int8.py).
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=True, SERIAL=SERIAL)


def fp8_dot_config(m: int, n: int, k: int, sms: int, block_n: int | None = None, block_k: int = 128,
                   num_warps: int | None = None, num_stages: int = 3, whole_waves: bool = False) -> dict:
    """The Triton W8A8 kernel's config: row tile by m (16..128), column tile 64 (128 above 64 rows),
    split-K up to 2 programs per SM while each slice keeps >= 4 K steps (whole_waves: split_for_waves')."""
    from .triton_int8 import mm_block_m, split_for_waves
    block_m = mm_block_m(m)
    block_n = block_n or (64 if m <= 64 else 128)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = split_for_waves(programs, triton.cdiv(k, block_k), sms, whole_waves=whole_waves, most=8)
    warps = num_warps or (8 if block_n * block_m >= 128 * 64 else 4)
    return dict(kernel="triton", block_m=block_m, block_n=block_n, block_k=block_k, split_k=split,
                num_warps=warps, num_stages=num_stages)


def fp8_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """What tuning.pick times for a W8A8 shape: torch._scaled_mm (cuBLASLt / CUTLASS row-wise; the
    default, used untuned) and, up to 256 rows, a few Triton tiles with their split-K variants
    (split_variants). Above 256 rows (prefill chunks, which all share one tuned config) scaled_mm alone:
    a tile or split-K that wins at the bucket's first row count must not run an 8192-token chunk."""
    if m > 256:
        return [dict(kernel="scaled_mm")]
    return [dict(kernel="scaled_mm")] + dot_candidates(m, n, k, sms)


def dot_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """The Triton kernel's configs for m rows: the heuristic's tile and a few others with their split-K variants
    (also the split that fits whole waves, split_for_waves), each with pointer loads and (Triton >= 3.4, 16-byte
    row strides) tensor-descriptor loads."""
    from .triton_int8 import split_variants

    def tiles(**kw):
        extra = [fp8_dot_config(m, n, k, sms, block_n=bn, block_k=bk, num_warps=w, num_stages=st, **kw)
                 for bn, bk, w, st in FP8_TILES_MANY_ROWS] if m > 16 else []
        return [fp8_dot_config(m, n, k, sms, **kw), fp8_dot_config(m, n, k, sms, block_n=128 if m <= 64 else 64, **kw),
                fp8_dot_config(m, n, k, sms, block_k=256, **kw)] + extra
    # More K slices than the heuristic's (2 programs per SM) lost at 64 rows on the H200: twice as many took qkv from
    # 14.3 to 17.4 us and down_proj from 24.7 to 32.5 (quant_kernels_fp8_split_h200.json).
    ours = split_variants(tiles() + tiles(whole_waves=True))
    tma = [dict(c, kernel="tma") for c in ours] if HAS_TMA and k % 16 == 0 else []  # 16-byte row strides
    return ours + tma


# (block_n, block_k, num_warps, num_stages) also timed above 16 rows, where the tiles above left the decode
# step's small projections at 1.0x (qkv) and 0.89x (o_proj) of bf16 at 64 rows on the H200: deeper pipelines,
# wider K steps, a narrower weight tile (more programs) and wider ones (x re-read from L2 half or a quarter as often;
# the 256-row tile with 4 stages ran the LM head at 256 rows, quant_kernels_fp8_tma_h200.json).
FP8_TILES_MANY_ROWS = ((128, 128, 4, 4), (64, 256, 4, 4), (128, 256, 8, 3), (32, 256, 4, 4), (256, 128, 8, 3),
                       (256, 128, 8, 4))


def fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, out_dtype: torch.dtype,
               **config) -> torch.Tensor:
    """(xq [M, K] * xs [M, 1]) @ (wq [N, K] * ws [1, N])^T -> [M, N] in out_dtype, codes in e4m3 (any
    float dtype for the Triton kernel: tests run it on float16 codes in the interpreter).

    With no config, the one tuning.pick measured fastest for (rows bucket, N, K) on CUDA, else
    torch._scaled_mm; config keys (kernel, block_m, block_n, block_k, split_k, num_warps,
    num_stages) force one."""
    m, k = xq.shape
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"fp8_matmul: x has {k} features but the weight has {wq.shape[1]}")
    if not config:
        from . import tuning
        from .triton_int8 import num_sms, tune_bucket
        key = ("fp8", tune_bucket(m), n, k, out_dtype)
        copies = lambda: [(xq, xs, wq if i == 0 else wq.clone(), ws, out_dtype)  # noqa: E731
                          for i in range(tuning.weight_copies(wq.numel()))]
        config = tuning.pick(key, lambda: fp8_candidates(m, n, k, num_sms(xq.device)),
                             lambda c, *a: _fp8_launch(*a, **c), copies, xq.device)
    return _fp8_launch(xq, xs, wq, ws, out_dtype, **config)


def _fp8_launch(xq, xs, wq, ws, out_dtype, *, kernel="scaled_mm", block_m=None, block_n=None, block_k=128,
                split_k=None, num_warps=None, num_stages=None, serial=False, limbs=False):
    """kernel: "scaled_mm", "triton" (pointer loads) or "tma" (the same Triton kernel with tensor-descriptor loads;
    building the two descriptors costs ~4 us of host time a launch, paid once where a CUDA graph replays it).
    limbs: xq holds int8 limbs, two rows a token (triton_int8_limbs; block_m counts limb rows, even)."""
    if kernel == "scaled_mm":
        # wq.t() is the column-major [K, N] operand _scaled_mm wants, without a copy.
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=out_dtype)
    from .triton_int8 import num_sms, split_outputs
    m, k = xq.shape
    n = wq.shape[0]
    default = fp8_dot_config(m, n, k, num_sms(xq.device), block_n=block_n, block_k=block_k)
    block_m, block_n = block_m or default["block_m"], block_n or default["block_n"]
    split_k = split_k or default["split_k"]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    rows, tile_rows = (m // 2, block_m // 2) if limbs else (m, block_m)  # the output's rows and a tile's
    grid, out, split_stride, locks, res = split_outputs(xq.device, rows, n, tile_rows, block_n, split_k, serial,
                                                        out_dtype)
    x_arg, w_arg = xq, wq
    if kernel == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_arg = TensorDescriptor.from_tensor(xq, [block_m, block_k])
        w_arg = TensorDescriptor.from_tensor(wq, [block_n, block_k])
    _fp8_dot_kernel[grid](
        x_arg, xs, w_arg, ws, out, res, out if locks is None else locks, m, n, k, k_per_split, split_k, xq.stride(0),
        wq.stride(0), split_stride, out.stride(-2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, SERIAL=locks is not None,
        STAGES=(num_stages or 3) if xq.is_cuda else 1,
        PRECISION="ieee" if xq.dtype == torch.float32 else "tf32", TMA=kernel == "tma", LIMBS=limbs,
        num_warps=num_warps or default["num_warps"])
    if locks is not None:
        return res
    return out.sum(0, dtype=out_dtype) if split_k > 1 else out
