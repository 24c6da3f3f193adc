"""Triton kernels that fuse the small element-wise work around the matmuls of a decoder layer.

Without them a decode step of an 8B model runs ~40 kernels per layer, most of them tiny (norm,
rotary, split, cast, add), and at batch 1 their launch latencies add up to milliseconds. Each
kernel here replaces a chain of them; the pure-torch twins are in reference.py and the tests
compare the two.

    add_rms_norm:     x [T, N] (+ residual [T, N]) -> (weight * rmsnorm(x + residual), x + residual)
    rotary_write_kv:  qkv [T, (H + 2 Hkv) D] -> q rotated [T, H, D]; rotated K and V written into the
                      paged caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]
    silu_and_mul:     x [T, 2 I] -> silu(x[:, :I]) * x[:, I:]  [T, I]
Rounding follows the torch path step by step (sums rounded to the model dtype before the norm,
silu rounded before the product), so the two agree to the last bit in most elements.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .metadata import AttentionMetadata
from .pdl import pdl_enabled, release
from .triton_backend import TritonBackend
from .triton_gemv import fusable, fused_linear

FP8_MAX = 448.0


@triton.jit
def _columns(col_ptr, offs, mask, COLUMNS: tl.constexpr):
    """Where features offs are stored in an output row: col_ptr's columns (a consumer's input order,
    Int4Linear.input_columns) with COLUMNS, else offs themselves."""
    if COLUMNS:
        cols = tl.load(col_ptr + offs, mask=mask, other=0)
    else:
        cols = offs
    return cols


@triton.jit
def _residual_sum(x_ptr, res_ptr, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual) at offs, float32, not rounded."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, col_ptr, n, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, RELEASE: tl.constexpr,
                         COLUMNS: tl.constexpr = False):
    release(RELEASE)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x_rounded = _residual_sum(x_ptr, res_ptr, row * n + offs, mask, HAS_RESIDUAL).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * n + offs, x_rounded, mask=mask)
    x = x_rounded.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    y = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + _columns(col_ptr, offs, mask, COLUMNS), (w * y).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        release_early: bool | None = None, columns: torch.Tensor | None = None):
    """release_early: let a GEMV launched with PDL after this kernel launch at once (engine.kernels.pdl; None:
    its default). columns: int32 [N], the column each normed feature is stored at (the residual stays in order)."""
    t, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    _add_rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out,
                               out if columns is None else columns, n, eps,
                               HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                               RELEASE=pdl_enabled(x.device, release_early), COLUMNS=columns is not None)
    return out, res_out


@triton.jit
def _rotary_write_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                            k_scale, v_scale, stride_qkv, stride_cos,
                            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                            H_PAD: tl.constexpr, HKV_PAD: tl.constexpr, IS_FP8: tl.constexpr):
    t = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_cos + d)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d)[None, :]
    row = qkv_ptr + t * stride_qkv

    hq = tl.arange(0, H_PAD)[:, None]
    mq = hq < H
    q1 = tl.load(row + hq * D + d[None, :], mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(row + hq * D + HALF + d[None, :], mask=mq, other=0.0).to(tl.float32)
    q_out = q_out_ptr + t * H * D + hq * D + d[None, :]
    tl.store(q_out, (q1 * c - q2 * s).to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(q_out + HALF, (q2 * c + q1 * s).to(q_out_ptr.dtype.element_ty), mask=mq)

    slot = tl.load(slot_ptr + t)
    hk = tl.arange(0, HKV_PAD)[:, None]
    mk = hk < HKV
    k_row = row + H * D
    k1 = tl.load(k_row + hk * D + d[None, :], mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(k_row + hk * D + HALF + d[None, :], mask=mk, other=0.0).to(tl.float32)
    r1 = (k1 * c - k2 * s) / k_scale
    r2 = (k2 * c + k1 * s) / k_scale
    dd = tl.arange(0, D)[None, :]
    v = tl.load(k_row + HKV * D + hk * D + dd, mask=mk, other=0.0).to(tl.float32) / v_scale
    if IS_FP8:
        r1 = tl.minimum(tl.maximum(r1, -448.0), 448.0)
        r2 = tl.minimum(tl.maximum(r2, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    k_dst = k_cache_ptr + slot * (HKV * D) + hk * D + d[None, :]
    tl.store(k_dst, r1.to(k_cache_ptr.dtype.element_ty), mask=mk)
    tl.store(k_dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=mk)
    tl.store(v_cache_ptr + slot * (HKV * D) + hk * D + dd, v.to(v_cache_ptr.dtype.element_ty), mask=mk)


def rotary_write_kv_triton(qkv, positions, cos, sin, k_cache, v_cache, meta: AttentionMetadata,
                           num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rotary_write_kv_kernel[(t,)](
        qkv, positions, cos, sin, meta.slot_mapping, q, k_cache, v_cache, float(meta.k_scale), float(meta.v_scale),
        qkv.stride(0), cos.stride(0), H=num_heads, HKV=num_kv_heads, D=head_dim,
        H_PAD=triton.next_power_of_2(num_heads), HKV_PAD=triton.next_power_of_2(num_kv_heads),
        IS_FP8=k_cache.dtype == torch.float8_e4m3fn)
    return q


@triton.jit
def _silu_mul(g_ptrs, u_ptrs, mask, dtype: tl.constexpr):
    """silu(gate) * up in dtype, silu rounded to dtype first (as the torch path)."""
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (act * u).to(dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, col_ptr, inter, BLOCK: tl.constexpr, RELEASE: tl.constexpr,
                         COLUMNS: tl.constexpr = False):
    release(RELEASE)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    act = _silu_mul(x_ptr + row * 2 * inter + offs, x_ptr + row * 2 * inter + inter + offs, mask,
                    out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * inter + _columns(col_ptr, offs, mask, COLUMNS), act, mask=mask)


def silu_and_mul_triton(x: torch.Tensor, release_early: bool | None = None,
                        columns: torch.Tensor | None = None) -> torch.Tensor:
    """columns: int32 [I], the column each output feature is stored at (as add_rms_norm_triton's)."""
    t, two_i = x.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x, out, out if columns is None else columns, inter,
                                                         BLOCK=block, RELEASE=pdl_enabled(x.device, release_early),
                                                         COLUMNS=columns is not None)
    return out


class TritonFusedBackend(TritonBackend):
    """The Triton attention backend plus the fused element-wise kernels above; at decode size a block's
    input norm and the SwiGLU activation run inside the GEMV that consumes them (triton_gemv.py), before
    fp8 W8A8 layers they write the layer's quantized input (triton_fp8.py), and before int4 layers its input
    in the kernel's column order or, for the dp4a GEMV, its int8 limbs (triton_int4_dp4a.py)."""

    def add_rms_norm(self, x, residual, weight, eps):
        return add_rms_norm_triton(x, residual, weight, eps)

    def rotary_write_kv(self, qkv, positions, rotary, k_cache, v_cache, meta, num_heads, num_kv_heads, head_dim):
        return rotary_write_kv_triton(qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache, meta,
                                      num_heads, num_kv_heads, head_dim)

    def silu_and_mul(self, x):
        return silu_and_mul_triton(x)

    def linear(self, x, linear):
        return fused_linear(x, linear, "none") if fusable(x, linear, "none") else linear(x)

    def attend_linear(self, q, k_cache, v_cache, meta, scale, linear, **opts):
        chunks, reduce = _attention_limbs(linear, q, meta), None
        if chunks is not None:  # the decode reduce stores the layer's limbs
            from ..quant.triton_int4_dp4a import decode_reduce_limbs, empty_limbs
            limbs = empty_limbs(q.shape[0], q.shape[1] * q.shape[2], chunks, q.dtype, q.device)
            reduce = functools.partial(decode_reduce_limbs, limbs=limbs)
        out, splits = self._attend(q, k_cache, v_cache, meta, scale, opts, reduce)
        if reduce is not None and splits > 1:
            return linear.forward_limbs(limbs)
        return self.linear(out.reshape(q.shape[0], -1), linear)

    def norm_linear(self, x, residual, norm, linear):
        if fusable(x, linear, "norm"):
            return fused_linear(x, linear, "norm", residual, norm)
        if _is_fp8(linear):  # the norm writes the fp8 W8A8 input (codes, per-token scales) directly
            from ..quant.triton_fp8 import add_rms_norm_fp8
            codes, scales, residual = add_rms_norm_fp8(x, residual, norm.weight, norm.eps)
            return linear.forward_quantized(codes, scales, x.dtype), residual
        # The norm stores x as the int4 kernel reads it (no copy of its own), but not as the dp4a GEMV's limbs: a
        # norm writing them took 2.94 us at 1 row against 2.69 for the norm and then x_limbs in CUDA graphs on an
        # H100 (int4_limbs_producers_h100.json), where SwiGLU writing them took 1.56 against 2.25.
        _, columns = _int4_input(linear, x, limbs=False)
        x, residual = add_rms_norm_triton(x, residual, norm.weight, norm.eps, columns=_nonempty(columns))
        return (linear(x) if columns is None else linear(x, x_ordered=True)), residual

    def silu_linear(self, h, linear):
        if fusable(h, linear, "silu"):
            return fused_linear(h, linear, "silu")
        if _is_fp8(linear):
            from ..quant.triton_fp8 import silu_and_mul_fp8
            return linear.forward_quantized(*silu_and_mul_fp8(h, inplace=True), h.dtype)
        chunks, columns = _int4_input(linear, h)
        if chunks is not None:
            from ..quant.triton_int4_dp4a import silu_and_mul_limbs
            return linear.forward_limbs(silu_and_mul_limbs(h, chunks, linear.perm))
        x = silu_and_mul_triton(h, columns=_nonempty(columns))
        return linear(x) if columns is None else linear(x, x_ordered=True)


def _is_fp8(linear) -> bool:
    from ..quant.fp8 import Fp8Linear  # lazily: engine.quant imports the model, which imports the kernels
    return type(linear) is Fp8Linear


def _int4_input(linear, x: torch.Tensor, limbs: bool = True) -> tuple[int | None, torch.Tensor | None]:
    """How to store x's rows for linear when it is an int4 / AWQ / GPTQ layer: (Int4Linear.input_limbs, None) when
    limbs and that gives chunks, else (None, Int4Linear.input_columns); (None, None) for other layers."""
    from ..quant.int4 import Int4Linear  # lazily, as above
    if type(linear) is not Int4Linear:
        return None, None
    chunks = linear.input_limbs(x.shape[0], x.dtype, x.device) if limbs else None
    return chunks, None if chunks is not None else linear.input_columns(x.shape[0], x.dtype, x.device)


def _attention_limbs(linear, q: torch.Tensor, meta) -> int | None:
    """The chunks of linear's dp4a GEMV when the decode reduce can store its input (the attention output) as Limbs:
    an int4 / AWQ / GPTQ layer without act-order (a head's program holds its own features only) whose kernel for
    these rows of producer-stored input is the dp4a GEMV (1-2 rows), every row a decode, steps within a head of a
    power-of-2 size; else None."""
    if getattr(linear, "input_limbs", None) is None:  # (every attention block calls this: no import for the rest)
        return None
    from ..quant.int4 import KERNEL_CHUNK
    from ..quant.triton_int4 import GEMV_MAX_ROWS
    t, _, head_dim = q.shape
    if (linear.perm is not None or not 0 < t <= GEMV_MAX_ROWS or meta.num_decodes != t
            or meta.seq_lens.shape[0] != t or head_dim & (head_dim - 1)):
        return None
    chunks = linear.input_limbs(t, q.dtype, q.device)
    return chunks if chunks is not None and head_dim % (KERNEL_CHUNK * chunks) == 0 else None


def _nonempty(columns: torch.Tensor | None) -> torch.Tensor | None:
    """columns for the kernels' store, None for the features' own order (empty from Int4Linear.input_columns)."""
    return None if columns is None or columns.numel() == 0 else columns
