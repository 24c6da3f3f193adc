"""Triton kernel: per-token fp8 (e4m3) quantization of activations in one launch.

Reference: `quantize_fp8_per_token` in fp8.py (absmax per row, scale = max(absmax * (1 / 448), 1e-12),
codes = e4m3(clamp(x / scale, -448, 448)), round to nearest even). In torch that is five or six
kernels (abs, amax, divide, clamp, cast, ...) per Linear call, which at decode sizes cost more than
the fp8 GEMM saves; here it is one.

Layouts:
    x:      [M, K] float16 / bfloat16 / float32, K contiguous
    codes:  [M, K] float8_e4m3fn
    scales: [M, 1] float32
One program per row: a row of up to MAX_ROW_BLOCK features is read once and kept in registers;
a longer one in two passes (absmax, then the codes, the row re-read from L2). Compiled for a GPU
the cast is the conversion instruction (round to nearest even); under Triton's CPU interpreter, whose
float -> fp8 conversion mis-rounds values just below a power of two, the values are first rounded to
the e4m3 grid in float32 (exponent from the bits, round-half-even by the 1.5 * 2^23 trick), so the
cast is exact there: the same codes on every backend. The rounding costs a third of the SwiGLU
kernel's instructions on sm_90, hence compiled out on GPUs (HW_CAST).

Fused producers (vLLM's fused RMSNorm+quant and SiLU-and-mul+quant): the kernels whose outputs feed
an fp8 Linear quantize them as they store, so the per-token kernel above is not launched (a decoder
layer's qkv_proj, gate_up_proj and down_proj inputs; o_proj's comes from attention and still goes
through fp8_quantize_per_token).
    add_rms_norm_fp8:  x [T, N] (+ residual [T, N]), weight [N] ->
                       (codes [T, N] e4m3, scales [T, 1] float32, residual_out [T, N] in x's dtype)
    silu_and_mul_fp8:  h [T, 2 I] (gate | up) -> (codes [T, I] e4m3, scales [T, 1] float32)
Each rounds like its 16-bit twin in engine/kernels/triton_fused.py (the sum x + residual, the
normalized value, weight * it, silu and silu * up each rounded to x's dtype), then quantizes that
16-bit value with the rule above: the codes and scales are quantize_fp8_per_token's of the unfused
kernel's output, byte for byte, as long as the norm's sum of squares adds in the same order (it does
in the interpreter for a row in one block; compiled with other warps, or a row in passes, a normed
value may move by an ulp: rarely, a code one e4m3 step off).
The norm runs one program per token (its scale needs the whole normalized row); a row of up to
MAX_ROW_BLOCK features stays in registers, a longer one is recomputed from its inputs in passes (sum of
squares, absmax, codes). SwiGLU runs in two launches over chunks of SWIGLU_CHUNK features (grid
tokens x chunks): the activation and each chunk's absmax, then each chunk's codes under the row's
scale, the max of its chunks'. One program per token there left a decode step's 64 rows on 64 SMs,
bound by instruction issue: 6.2 us at 64 rows against 2.0 for the bf16 SwiGLU on the H200
(fp8_fused_quant_hwcast_h200.json). No host reads of device values: all are CUDA-graph capturable.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


FP8_MAX = 448.0
MAX_ROW_BLOCK = 16384  # rows up to this many features are read once (16 values a thread at 32 warps)


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
def _token_scale(amax, FP8_MAX: tl.constexpr):
    """A row's scale from its absmax: absmax * (1 / 448), floored at 1e-12 (an all-zero row)."""
    return tl.maximum(amax * (1.0 / FP8_MAX), 1e-12)  # a product, as quantize_fp8_per_token: the same bits anywhere


@triton.jit
def _store_codes(q_row, offs, y, scale, mask, FP8_MAX: tl.constexpr, HW_CAST: tl.constexpr):
    """Store e4m3(clamp(y / scale)) at q_row + offs, y float32 (already rounded like the 16-bit tensor).
    HW_CAST (compiled for a GPU): the cast alone, one correctly rounded conversion instruction
    (cvt.rn.satfinite.e4m3x2.f32) a pair; else rounded to the e4m3 grid first (the interpreter's cast)."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -FP8_MAX), FP8_MAX)  # `/` on CUDA is not correctly rounded
    if not HW_CAST:
        v = _round_to_e4m3_grid(v)
    tl.store(q_row + offs, v.to(q_row.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu(h_row, offs, mask, inter):
    """silu(gate) * up of h_row = [gate | up] at offs, rounded as _silu_and_mul_kernel rounds, as float32."""
    g = tl.load(h_row + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(h_row.dtype.element_ty).to(tl.float32)
    return (act * u).to(h_row.dtype.element_ty).to(tl.float32)


@triton.jit
def _quantize_row(src_row, q_row, s_ptr, m, n, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, SINGLE: tl.constexpr,
                  HW_CAST: tl.constexpr):
    """One row's scale and codes: read once when it fits a block (decode: one short launch), else absmax over
    the row, then the codes, the row re-read (from L2)."""
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        mask = offs < n
        y = tl.load(src_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = _token_scale(tl.max(tl.abs(y), 0), FP8_MAX)
        tl.store(s_ptr + m, scale)
        _store_codes(q_row, offs, y, scale, mask, FP8_MAX, HW_CAST)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, n, BLOCK):
            amax = tl.maximum(amax, tl.abs(tl.load(src_row + k0 + offs, mask=k0 + offs < n, other=0.0).to(tl.float32)))
        scale = _token_scale(tl.max(amax, 0), FP8_MAX)
        tl.store(s_ptr + m, scale)
        for k0 in range(0, n, BLOCK):
            mask = k0 + offs < n
            y = tl.load(src_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            _store_codes(q_row + k0, offs, y, scale, mask, FP8_MAX, HW_CAST)


@triton.jit
def _fp8_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                          FP8_MAX: tl.constexpr, SINGLE: tl.constexpr, HW_CAST: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    _quantize_row(x_ptr + m * stride_xm, q_ptr + m * stride_qm, s_ptr, m, K, BLOCK_K, FP8_MAX, SINGLE, HW_CAST)


def hw_cast(device: torch.device) -> bool:
    """Whether the kernels cast to e4m3 with the GPU's conversion instruction (compiled for CUDA) rather than
    rounding to the e4m3 grid first (Triton's CPU interpreter, whose cast mis-rounds)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _row_launch(k: int) -> tuple[int, int]:
    """(block, num_warps) for one program per row of k features: the whole row if it fits MAX_ROW_BLOCK.
    A decode step's few rows leave most SMs idle and each program bound by its own instruction issue, so
    wide rows take many warps: 16 at 4096 features, 32 from 8192, measured fastest for the norm and
    per-token kernels at 1-256 rows on the H200 (fp8_fused_quant_warps_h200.json; 8 at 4096 was 10-17%
    slower for the norm)."""
    block = min(triton.next_power_of_2(k), MAX_ROW_BLOCK)
    return block, 32 if block >= 8192 else 16 if block >= 4096 else 8 if block >= 2048 else 4


def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], float32 scales [M, 1]), as quantize_fp8_per_token, one launch."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    block, warps = _row_launch(k)
    _fp8_per_token_kernel[(m,)](x, codes, scales, k, x.stride(0), codes.stride(0), BLOCK_K=block, FP8_MAX=FP8_MAX,
                                SINGLE=block >= k, HW_CAST=hw_cast(x.device), num_warps=warps)
    return codes, scales


# ----- quantization fused into the kernels that produce the activations ---------------------------
@triton.jit
def _residual_sum(x_row, r_row, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual) rounded to x's dtype, as float32: the residual stream's next value."""
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
    return x.to(x_row.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_normed(x, inv, w_ptr, offs, mask, x_row):
    """weight * (x * inv), each product rounded to x's dtype as _add_rms_norm_kernel's output is, as float32."""
    y = (x * inv).to(x_row.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (w * y).to(x_row.dtype.element_ty).to(tl.float32)


@triton.jit
def _add_rms_norm_fp8_kernel(x_ptr, r_ptr, w_ptr, ro_ptr, q_ptr, s_ptr, N, eps,
                             stride_xm, stride_rm, stride_om, stride_qm, HAS_RESIDUAL: tl.constexpr,
                             BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, SINGLE: tl.constexpr,
                             HW_CAST: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, r_row = x_ptr + m * stride_xm, r_ptr + m * stride_rm
    ro_row, q_row = ro_ptr + m * stride_om, q_ptr + m * stride_qm
    if SINGLE:  # the row in registers: read x and residual once, write residual_out and the codes
        mask = offs < N
        x = _residual_sum(x_row, r_row, offs, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(ro_row + offs, x.to(ro_row.dtype.element_ty), mask=mask)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)  # _add_rms_norm_kernel's expression
        y = _rms_normed(x, inv, w_ptr, offs, mask, x_row)
        scale = _token_scale(tl.max(tl.abs(y), 0), FP8_MAX)
        tl.store(s_ptr + m, scale)
        _store_codes(q_row, offs, y, scale, mask, FP8_MAX, HW_CAST)
    else:  # three passes over the inputs (sum of squares, absmax, codes), the row recomputed each time
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, N, BLOCK):
            mask = k0 + offs < N
            x = _residual_sum(x_row + k0, r_row + k0, offs, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(ro_row + k0 + offs, x.to(ro_row.dtype.element_ty), mask=mask)
            acc += x * x
        inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, N, BLOCK):
            mask = k0 + offs < N
            x = _residual_sum(x_row + k0, r_row + k0, offs, mask, HAS_RESIDUAL)
            amax = tl.maximum(amax, tl.abs(_rms_normed(x, inv, w_ptr + k0, offs, mask, x_row)))
        scale = _token_scale(tl.max(amax, 0), FP8_MAX)
        tl.store(s_ptr + m, scale)
        for k0 in range(0, N, BLOCK):
            mask = k0 + offs < N
            x = _residual_sum(x_row + k0, r_row + k0, offs, mask, HAS_RESIDUAL)
            _store_codes(q_row + k0, offs, _rms_normed(x, inv, w_ptr + k0, offs, mask, x_row), scale, mask,
                         FP8_MAX, HW_CAST)


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x [T, N] (+ residual [T, N]) -> (codes [T, N] e4m3, scales [T, 1] float32, residual_out [T, N]):
    quantize_fp8_per_token(add_rms_norm_triton(x, residual, weight, eps)[0]) and its residual_out, in
    one launch. residual_out = x + residual in x's dtype, or x itself when residual is None (as
    add_rms_norm_reference; nothing is copied)."""
    t, n = x.shape
    if weight.shape != (n,):
        raise ValueError(f"add_rms_norm_fp8: weight has shape {tuple(weight.shape)}, expected ({n},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm_fp8: residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    residual = residual if residual is None or residual.stride(1) == 1 else residual.contiguous()
    weight = weight.contiguous()
    codes = torch.empty((t, n), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    res_out = x if residual is None else torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return codes, scales, res_out
    block, warps = _row_launch(n)
    r = x if residual is None else residual
    _add_rms_norm_fp8_kernel[(t,)](x, r, weight, res_out, codes, scales, n, eps, x.stride(0), r.stride(0),
                                   res_out.stride(0), codes.stride(0), HAS_RESIDUAL=residual is not None,
                                   BLOCK=block, FP8_MAX=FP8_MAX, SINGLE=block >= n,
                                   HW_CAST=hw_cast(x.device), num_warps=warps)
    return codes, scales, res_out


SWIGLU_CHUNK = 1024  # features of one row a SwiGLU program handles (the bf16 silu_and_mul_triton's block)


@triton.jit
def _silu_and_mul_amax_kernel(h_ptr, a_ptr, amax_ptr, inter, num_chunks, stride_hm, stride_am, BLOCK: tl.constexpr):
    """grid (T, chunks): a chunk of silu(gate) * up into a [T, I] (h's dtype) and its absmax into amax [T, chunks]."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    y = _swiglu(h_ptr + m * stride_hm, offs, mask, inter)
    tl.store(a_ptr + m * stride_am + offs, y.to(a_ptr.dtype.element_ty), mask=mask)
    tl.store(amax_ptr + m * num_chunks + c, tl.max(tl.abs(y), 0))


@triton.jit
def _quantize_chunk_kernel(a_ptr, amax_ptr, q_ptr, s_ptr, n, num_chunks, stride_am, stride_qm, BLOCK: tl.constexpr,
                           CHUNKS: tl.constexpr, FP8_MAX: tl.constexpr, HW_CAST: tl.constexpr):
    """grid (T, chunks): the row's scale from its chunks' absmaxes (max is exact in any order), a chunk's codes."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    chunk = tl.arange(0, CHUNKS)
    amax = tl.max(tl.load(amax_ptr + m * num_chunks + chunk, mask=chunk < num_chunks, other=0.0), 0)
    scale = _token_scale(amax, FP8_MAX)
    if c == 0:
        tl.store(s_ptr + m, scale)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(a_ptr + m * stride_am + offs, mask=mask, other=0.0).to(tl.float32)
    _store_codes(q_ptr + m * stride_qm, offs, y, scale, mask, FP8_MAX, HW_CAST)


def silu_and_mul_fp8(h: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, 2 I] = [gate | up] -> (codes [T, I] e4m3, scales [T, 1] float32):
    quantize_fp8_per_token(silu_and_mul_triton(h)), each row spread over I / SWIGLU_CHUNK programs in two
    launches: SwiGLU with each chunk's absmax, then the codes of each chunk under the row's scale.
    The activation waits between the two in a [T, I] tensor of h's dtype, or (inplace, for a caller whose h
    is dead after this: the backend's silu_linear) in h's gate half, each chunk over the gate values only
    its own program read: no scratch, so a prefill's MLP peak stays h and the codes."""
    t, two_i = h.shape
    if two_i % 2:
        raise ValueError(f"silu_and_mul_fp8: h has {two_i} features, expected an even number (gate | up)")
    inter = two_i // 2
    if h.stride(1) != 1:
        h, inplace = h.contiguous(), True  # a copy of our own
    codes = torch.empty((t, inter), dtype=torch.float8_e4m3fn, device=h.device)
    scales = torch.empty((t, 1), dtype=torch.float32, device=h.device)
    if t == 0:
        return codes, scales
    block = min(SWIGLU_CHUNK, triton.next_power_of_2(inter))
    chunks = triton.cdiv(inter, block)
    act = h[:, :inter] if inplace else torch.empty((t, inter), dtype=h.dtype, device=h.device)
    amax = torch.empty((t, chunks), dtype=torch.float32, device=h.device)
    _silu_and_mul_amax_kernel[(t, chunks)](h, act, amax, inter, chunks, h.stride(0), act.stride(0), BLOCK=block)
    _quantize_chunk_kernel[(t, chunks)](act, amax, codes, scales, inter, chunks, act.stride(0), codes.stride(0),
                                        BLOCK=block, CHUNKS=triton.next_power_of_2(chunks), FP8_MAX=FP8_MAX,
                                        HW_CAST=hw_cast(h.device))
    return codes, scales
