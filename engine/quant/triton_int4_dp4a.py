"""Triton kernels: the int4 GEMV (1-2 rows) on integer dot products, x as two int8 limbs (config kernel="dp4a").

Reference: `int4_linear_reference` in int4.py, which it matches to within the limbs' rounding (the bound below);
`dp4a_reference` here reproduces the kernel's integer sums exactly (tests).

Why. triton_int4's GEMV spends ~4.6 sm_90 instructions a code (Nsight Compute on the H200, gate_up at 1 row:
16.7M warp instructions for 117M codes, issue slots 55% busy, 2.17 TB/s; ncu_int4_gemv1_pf_stepmajor_h200.log):
one LOP3 and one FMA a code plus x's per-plane scaling, the zero point and the addressing, so the issue rate,
not DRAM, bounds it. PTX's dp4a multiplies four bytes by four bytes and adds them to an int32 in one
instruction. With each token's x as the int8 limbs of triton_int8_limbs (per step of the GEMV: scale =
max|x| / 16256, v = rint(x / scale), hi = rint(v / 128), lo = v - 128 hi, |x - scale v| <= max|x| / 32512, finer
than bfloat16's own rounding for every value above max|x| / 64), a word of 8 codes costs two LOP3s and a shift
(its even and odd nibbles as four bytes each), four dp4a (both limbs, both halves) and a multiply-add, about
one instruction a code, and the group's scale and zero point come in once a row and step:
    out[n] += scale[n, g] * (sx * sum(q * v) - zero[n, g] * sx * sum(v))
Layout: in the kernel layout (int4.pack_int4_kernel) nibble i of word r of chunk c is feature 32c + 4i + r, so
byte b of `w & 0x0F0F0F0F` holds feature 32c + r + 8b and byte b of `(w >> 4) & 0x0F0F0F0F` feature 32c + r + 8b
+ 4. `_x_limbs_kernel` packs each limb in that order once per call (xq [M, 4, K / 8] int32: hi even, hi odd,
lo even, lo odd, word for word with the weight's words; xs [M, steps, 2] float32: sx and sx * sum(v) per step),
one program a row and step, unless the kernel before the layer stores them itself (the fused producers below); the
GEMV (`_int4_dp4a_kernel`, grid (M, cdiv(N, BLOCK_N), SPLIT_K), split-K as triton_int4's GEMV) reads a [BLOCK_N, 4 *
CHUNKS] tile of words a step and the step's four packed x vectors.
Steps lie inside one group (the launch checks). Off CUDA (the Triton interpreter) dp4a is emulated byte by
byte; on CUDA it is one `dp4a.u32.s32` of inline PTX (sm_61+). Nothing reads device values on the host
(CUDA-graph safe).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..kernels.pdl import launch_options, pdl_enabled, release, wait_for_inputs
from ..kernels.triton_decode import _reduced_head
from ..kernels.triton_fused import _silu_mul
from .int4 import KERNEL_CHUNK, unpack_int4
from .int4_layout import _step_words, layout_args
from .triton_int4 import _gemv_program, _next_group_params, gemv_config
from .triton_int8 import _gemv_store, gemv_result, split_outputs
from .triton_int8_limbs import _LIMBS_MAX, LIMBS_MAX, _rint


@triton.jit
def _limb_features(step0, STEPS: tl.constexpr, WORDS: tl.constexpr):
    """The feature of byte b of word w of steps step0 .. step0 + STEPS in the even planes, [STEPS, WORDS, 4]
    (module docstring); the odd planes' are these + 4."""
    s = step0 + tl.arange(0, STEPS)[:, None, None]
    w = tl.arange(0, WORDS)[None, :, None]
    b = tl.arange(0, 4)[None, None, :]
    return s * (8 * WORDS) + 32 * (w // 4) + w % 4 + 8 * b


@triton.jit
def _pack_bytes(v):
    """int8 values v [STEPS, WORDS, 4] (as floats) packed into int32 words [STEPS, WORDS], v[..., b] in byte b."""
    b = tl.arange(0, 4)[None, None, :]
    return tl.sum((v.to(tl.int32) & 0xFF) << (8 * b), axis=2)


@triton.jit
def _store_limbs(xe, xo, q_row, s_row, stride_qp, step0, STEPS: tl.constexpr, WORDS: tl.constexpr):
    """x's values at _limb_features(step0, ...) (xe) and 4 features on (xo), float32 [STEPS, WORDS, 4], as the
    limbs' packed words at q_row (planes stride_qp apart) and each step's sx and sx * sum(v) at s_row (0 and 0 for
    an all-zero step)."""
    amax = tl.maximum(tl.max(tl.max(tl.abs(xe), axis=2), axis=1), tl.max(tl.max(tl.abs(xo), axis=2), axis=1))
    scale = tl.math.div_rn(amax, _LIMBS_MAX)  # (IEEE divisions: `/` is an approximate one on CUDA)
    inv = tl.where(amax > 0, tl.math.div_rn(_LIMBS_MAX, tl.where(amax > 0, amax, 1.0)), 0.0)[:, None, None]
    ve = tl.minimum(tl.maximum(_rint(xe * inv), -_LIMBS_MAX), _LIMBS_MAX)
    vo = tl.minimum(tl.maximum(_rint(xo * inv), -_LIMBS_MAX), _LIMBS_MAX)
    he = _rint(ve * (1.0 / 128.0))
    ho = _rint(vo * (1.0 / 128.0))
    steps = step0 + tl.arange(0, STEPS)
    words = steps[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
    tl.store(q_row + words, _pack_bytes(he))
    tl.store(q_row + stride_qp + words, _pack_bytes(ho))
    tl.store(q_row + 2 * stride_qp + words, _pack_bytes(ve - 128.0 * he))
    tl.store(q_row + 3 * stride_qp + words, _pack_bytes(vo - 128.0 * ho))
    vsum = tl.sum(tl.sum(ve, axis=2), axis=1) + tl.sum(tl.sum(vo, axis=2), axis=1)  # exact: integers < 2^22
    tl.store(s_row + 2 * steps, scale)
    tl.store(s_row + 2 * steps + 1, scale * vsum)


@triton.jit
def _x_limbs_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, stride_qp, stride_sm, CHUNKS: tl.constexpr,
                    PDL: tl.constexpr):
    """Program (m, step): the step's 32 * CHUNKS features of row m as the limbs' packed words (module docstring)
    and the step's sx and sx * sum(v) (0 and 0 when its x is all zero)."""
    m = tl.program_id(0)
    step = tl.program_id(1)
    wait_for_inputs(PDL)
    release(PDL)
    even = _limb_features(step, 1, 4 * CHUNKS)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    xe = tl.load(x_row + even).to(tl.float32)  # (K is whole steps: the launch checks)
    xo = tl.load(x_row + even + 4).to(tl.float32)
    _store_limbs(xe, xo, q_ptr + m.to(tl.int64) * stride_qm, s_ptr + m.to(tl.int64) * stride_sm, stride_qp, step,
                 1, 4 * CHUNKS)


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + the sum over bytes i of a's byte i (unsigned) times b's byte i (signed), int32 (PTX dp4a.u32.s32)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit
def _int4_dp4a_kernel(q_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, N, K, k_per_split, split_k,
                      stride_qm, stride_qp, stride_xsm, stride_wn, stride_ws, stride_sn, stride_os, stride_om,
                      RUN: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                      SERIAL: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """Program (m, column tile, K slice): out[m, tile] (split_k > 1: the slice's partial) from the step-major words
    and x's limbs (module docstring). K and every slice are whole steps (the launch checks)."""
    WORDS: tl.constexpr = 4 * CHUNKS
    STEP: tl.constexpr = 32 * CHUNKS
    m, pid_n, pid_k, offs_n, mask_n, k_start, k_end = _gemv_program(N, K, k_per_split, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    wait_for_inputs(PDL)  # programmatic dependent launch (engine.kernels.pdl)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = offs_n.to(tl.int64) * stride_sn
    q_row = q_ptr + m.to(tl.int64) * stride_qm
    xs_row = xs_ptr + m.to(tl.int64) * stride_xsm
    zero_words = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k_start, K, GROUP)
    for k0 in tl.range(k_start, k_end, STEP, num_stages=STAGES):
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        w = tl.load(w_rows + _step_words(kw, offs_w, stride_ws, RUN, 4)[None, :], mask=mask_n[:, None], other=0)
        scale, zero = s_next.to(tl.float32), z_next.to(tl.float32)  # this step's, loaded a step ago
        s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k0 + STEP, K, GROUP)
        words = tl.max_contiguous(tl.multiple_of(kw + offs_w, 4), 4)
        he = tl.broadcast_to(tl.load(q_row + words)[None, :], w.shape)
        ho = tl.broadcast_to(tl.load(q_row + stride_qp + words)[None, :], w.shape)
        le = tl.broadcast_to(tl.load(q_row + 2 * stride_qp + words)[None, :], w.shape)
        lo = tl.broadcast_to(tl.load(q_row + 3 * stride_qp + words)[None, :], w.shape)
        sx = tl.load(xs_row + 2 * (k0 // STEP))
        sxv = tl.load(xs_row + 2 * (k0 // STEP) + 1)
        qe = w & 0x0F0F0F0F
        qo = (w >> 4) & 0x0F0F0F0F
        hi = _dp4a(qo, ho, _dp4a(qe, he, zero_words, ASM), ASM)
        lo = _dp4a(qo, lo, _dp4a(qe, le, zero_words, ASM), ASM)
        dot = tl.sum(hi * 128 + lo, axis=1)  # sum of q * v over the step, exact (|.| < 2^31)
        acc += scale * (sx * dot.to(tl.float32) - zero * sxv)
    release(PDL)
    _gemv_store(acc, out_ptr, res_ptr, lock_ptr, m, pid_n, pid_k, offs_n, mask_n, split_k, stride_os, stride_om,
                SERIAL)


# ----- launch ---------------------------------------------------------------------------------------
# (block_n, chunks, warps, stages): the GEMV tiles of triton_int4 that won a layer there, and 4 stages; then the
# fastest tiles of down_proj (64 x 4 warps, 2 stages, at 16 slices) and of the LM head (256 x 8 warps, 4 stages) in
# a scan of tiles x stages x split-K at 1 row (benchmarks/int4_dp4a_scan.py, int4_dp4a_scan_h100.json: 1.16x /
# 1.04x the best of the tiles before)
DP4A_TILES = ((128, 4, 4, 3), (64, 4, 2, 3), (256, 4, 8, 3), (128, 4, 4, 4), (64, 4, 4, 3), (64, 4, 4, 2),
              (256, 4, 8, 4))
DEEP_SPLIT_STEPS = 7  # with K of 64 steps or more (down_proj), each tile also at slices of about this many steps


def dp4a_candidates(m: int, n: int, k: int, group_size: int, sms: int) -> list[dict]:
    """kernel="dp4a" configs for 1-2 rows: DP4A_TILES (chunks capped to the group), split-K as the GEMV's
    heuristic, reduced in the kernel, each tile without split-K, and with K of 64 steps or more each tile at
    slices of DEEP_SPLIT_STEPS steps (down_proj's 112 steps at 1 row: 16 slices ran 1.27x the heuristic's 9, same
    tile, in that scan)."""
    out = []
    for bn, ch, w, st in DP4A_TILES:
        ch = min(ch, group_size // KERNEL_CHUNK)
        cfg = gemv_config(m, n, k, sms, block_n=bn, chunks=ch, num_warps=w, num_stages=st)
        base = dict(kernel="dp4a", block_n=bn, chunks=ch, num_warps=w, num_stages=st)
        steps = k // (KERNEL_CHUNK * ch)
        deep = (min(32, steps // DEEP_SPLIT_STEPS),) if steps >= 64 else ()
        for split in dict.fromkeys((cfg["split_k"], 1, *deep)):
            c = dict(base, split_k=split, serial=split > 1)
            if c not in out:
                out.append(c)
    return out


def dp4a_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, chunks: int) -> torch.Tensor:
    """What the dp4a kernel computes for qweight [N, K // 2] uint8 (int4.quantize_int4's), in float64 on the CPU:
    x's limbs per step of 32 * chunks features, the exact integer sums of q * v (v = 128 hi + lo), then
    scale * (sx * sum(q v) - zero * sx * sum(v)) per row, group and step."""
    x = x.double().cpu()
    q = unpack_int4(qweight.cpu()).to(torch.int64)
    step = KERNEL_CHUNK * chunks
    m, k = x.shape
    out = torch.zeros(m, q.shape[0], dtype=torch.float64)
    for k0 in range(0, k, step):
        xs = x[:, k0:k0 + step].float()  # the kernel's float32 arithmetic for the limbs
        amax = xs.abs().amax(1, keepdim=True)
        inv = torch.where(amax > 0, LIMBS_MAX / torch.where(amax > 0, amax, 1.0), 0.0)
        v = torch.round(xs * inv).clamp(-LIMBS_MAX, LIMBS_MAX).to(torch.int64)
        sx = (amax / LIMBS_MAX).double()
        g = k0 // group_size
        scale, zero = scales[:, g].double().cpu()[None], zeros[:, g].double().cpu()[None]
        out += scale * (sx * (v @ q[:, k0:k0 + step].t()) - zero * sx * v.sum(1, keepdim=True))
    return out


class Limbs(NamedTuple):
    """x [M, K] as the dp4a kernel reads it, per step of 32 * chunks features: q [M, 4, K / 8] int32 (the hi limb's
    even and odd bytes, then the lo limb's, word for word with the weight's words), s [M, steps, 2] float32 (sx and
    sx * sum(v)), and the dtype of x (the product's)."""
    q: torch.Tensor
    s: torch.Tensor
    dtype: torch.dtype


def empty_limbs(m: int, k: int, chunks: int, dtype: torch.dtype, device: torch.device) -> Limbs:
    return Limbs(torch.empty((m, 4, k // 8), dtype=torch.int32, device=device),
                 torch.empty((m, k // (KERNEL_CHUNK * chunks), 2), dtype=torch.float32, device=device), dtype)


def x_limbs(x: torch.Tensor, chunks: int, pdl: bool = False) -> Limbs:
    """x [M, K]'s Limbs (_x_limbs_kernel)."""
    m, k = x.shape
    limbs = empty_limbs(m, k, chunks, x.dtype, x.device)
    xq, xs = limbs.q, limbs.s
    _x_limbs_kernel[(m, xs.shape[1])](x, xq, xs, x.stride(0), xq.stride(0), xq.stride(1), xs.stride(0),
                                      CHUNKS=chunks, PDL=pdl, num_warps=1, **launch_options(pdl))
    return limbs


# ----- fused producers ------------------------------------------------------------------------------
# SwiGLU and the decode attention reduce, whose outputs feed a dp4a layer (a decoder layer's down_proj and o_proj at
# 1-2 rows), store them as its Limbs, so _x_limbs_kernel does not run for those layers (it ran 97 times a step of
# llama-3.1-8b, 0.105 ms of a 2.51 ms step at 1 row on the H200: decode_profile_int4_b1_16_s18_h200.log). Each rounds
# like its 16-bit twin in engine/kernels/triton_fused.py / triton_decode.py, then packs that 16-bit value as
# _x_limbs_kernel does: the limbs are x_limbs' of the unfused kernel's output, bit for bit. (A norm writing the
# limbs was slower than the norm and x_limbs after it, 2.94 against 2.69 us at 1 row on an H100,
# int4_limbs_producers_h100.json, and was removed.) sources (GPTQ's act-order perm, int64 [K]): the feature at each
# of the layer's columns, which is where the kernels load from; None: column j is feature j.

@triton.jit
def _feature(src_ptr, cols, mask, SOURCES: tl.constexpr):
    if SOURCES:
        return tl.load(src_ptr + cols, mask=mask, other=0)
    else:
        return cols


@triton.jit
def _silu_and_mul_int8x2_kernel(h_ptr, src_ptr, q_ptr, s_ptr, inter, stride_hm, stride_qm, stride_qp, stride_sm,
                                CHUNKS: tl.constexpr, SOURCES: tl.constexpr, RELEASE: tl.constexpr):
    """Program (t, step): silu(gate) * up of row t's step of 32 * CHUNKS columns as its Limbs."""
    release(RELEASE)
    row = tl.program_id(0)
    step = tl.program_id(1)
    even = _limb_features(step, 1, 4 * CHUNKS)  # (inter is whole steps: the launch checks)
    h_row = h_ptr + row.to(tl.int64) * stride_hm
    fe = _feature(src_ptr, even, even < inter, SOURCES)
    fo = _feature(src_ptr, even + 4, even < inter, SOURCES)
    dtype = h_ptr.dtype.element_ty
    ye = _silu_mul(h_row + fe, h_row + inter + fe, fe < inter, dtype).to(tl.float32)
    yo = _silu_mul(h_row + fo, h_row + inter + fo, fo < inter, dtype).to(tl.float32)
    _store_limbs(ye, yo, q_ptr + row.to(tl.int64) * stride_qm, s_ptr + row.to(tl.int64) * stride_sm, stride_qp,
                 step, 1, 4 * CHUNKS)


def silu_and_mul_limbs(h: torch.Tensor, chunks: int, sources: torch.Tensor | None = None,
                       release_early: bool | None = None) -> Limbs:
    """silu_and_mul_triton(h) as its Limbs (columns in sources' order) for a dp4a layer of chunks; h [T, 2 I], I
    whole steps of 32 * chunks."""
    t, inter = h.shape[0], h.shape[1] // 2
    step = KERNEL_CHUNK * chunks
    if inter % step:
        raise ValueError(f"silu_and_mul_limbs: I={inter} is not whole steps of {step} features (chunks={chunks})")
    limbs = empty_limbs(t, inter, chunks, h.dtype, h.device)
    _silu_and_mul_int8x2_kernel[(t, inter // step)](
        h, h if sources is None else sources, limbs.q, limbs.s, inter, h.stride(0), limbs.q.stride(0),
        limbs.q.stride(1), limbs.s.stride(0), CHUNKS=chunks, SOURCES=sources is not None,
        RELEASE=pdl_enabled(h.device, release_early), num_warps=1)
    return limbs


@triton.jit
def _decode_reduce_int8x2_kernel(acc_ptr, lse_ptr, out_ptr, q_ptr, s_ptr, num_splits, stride_acc_b, stride_acc_h,
                                 stride_acc_s, stride_lse_b, stride_lse_h, stride_ot, stride_oh, stride_qm, stride_qp,
                                 stride_sm, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, CHUNKS: tl.constexpr,
                                 RELEASE: tl.constexpr):
    """Program (seq, head): the decode reduce's output of the head (_decode_reduce_kernel's, stored as it stores
    it), and as the Limbs of the HEAD_DIM // (32 * CHUNKS) steps it makes of the request's row (a power of 2 a
    head, HEAD_DIM a power of 2)."""
    release(RELEASE)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    out = _reduced_head(acc_ptr, lse_ptr, seq, head, num_splits, stride_acc_b, stride_acc_h, stride_acc_s,
                        stride_lse_b, stride_lse_h, HEAD_DIM, HEAD_DIM, SPLITS_PAD).to(dtype)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + tl.arange(0, HEAD_DIM), out)
    STEPS: tl.constexpr = HEAD_DIM // (32 * CHUNKS)
    # feature 32 CHUNKS s + 32 c + 8 b + 4 o + r of the head -> [step s, word 4 c + r, byte b, o] (_limb_features)
    y = tl.permute(tl.reshape(out.to(tl.float32), (STEPS, CHUNKS, 4, 2, 4)), (0, 1, 4, 2, 3))
    xe, xo = tl.split(tl.reshape(y, (STEPS, 4 * CHUNKS, 4, 2)))
    _store_limbs(xe, xo, q_ptr + seq.to(tl.int64) * stride_qm, s_ptr + seq.to(tl.int64) * stride_sm, stride_qp,
                 head * STEPS, STEPS, 4 * CHUNKS)


def decode_reduce_limbs(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, num_splits: int, limbs: Limbs) -> None:
    """triton_decode.decode_attention's reduce (its `reduce` argument, with limbs bound) that also stores the output
    rows [B, num_heads * head_dim] as their Limbs (empty_limbs of B rows), the input of the int4 layer after
    attention (o_proj) for the dp4a GEMV; head_dim a power of 2 and whole steps of the limbs' chunks."""
    num_seqs, num_heads, _, head_dim = acc.shape
    chunks = head_dim * num_heads // (KERNEL_CHUNK * limbs.s.shape[1])
    if head_dim & (head_dim - 1) or head_dim % (KERNEL_CHUNK * chunks):
        raise ValueError(f"decode_reduce_limbs: head_dim={head_dim} must be a power of 2 and whole steps of "
                         f"{KERNEL_CHUNK * chunks} features (chunks={chunks})")
    _decode_reduce_int8x2_kernel[(num_seqs, num_heads)](
        acc, lse, out, limbs.q, limbs.s, num_splits, *acc.stride()[:3], *lse.stride()[:2], out.stride(0),
        out.stride(1), limbs.q.stride(0), limbs.q.stride(1), limbs.s.stride(0), HEAD_DIM=head_dim,
        SPLITS_PAD=triton.next_power_of_2(num_splits), CHUNKS=chunks, RELEASE=pdl_enabled(out.device), num_warps=4)


def _launch_dp4a(x, packed, scales, zeros, group_size, *, block_n=128, chunks=4, split_k=1, num_warps=4,
                 num_stages=3, serial=False, pdl=None):
    """x: [M, K] floats, or their Limbs (a fused producer's, of these chunks)."""
    xq = x.q if isinstance(x, Limbs) else x
    m, k = xq.shape[0], (xq.shape[2] * 8 if isinstance(x, Limbs) else xq.shape[1])
    n = packed.shape[0]
    step = KERNEL_CHUNK * chunks
    if group_size % step or k % group_size:  # then K and every K slice are whole steps
        raise ValueError(f"kernel='dp4a' needs steps inside one group and K whole groups: chunks={chunks} ({step} "
                         f"features), group_size={group_size}, K={k}")
    if isinstance(x, Limbs) and x.s.shape[1] != k // step:
        raise ValueError(f"kernel='dp4a' with chunks={chunks} reads limbs of {step}-feature steps, but these have "
                         f"{x.s.shape[1]} steps for K={k}")
    pdl = pdl_enabled(xq.device, pdl)
    xq, xs, dtype = x if isinstance(x, Limbs) else x_limbs(x, chunks, pdl)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), step) * step
    grid, out, split_stride, locks, res = split_outputs(xq.device, m, n, 1, block_n, split_k, serial, dtype)
    stride_wn, stride_ws, run = layout_args(packed)
    _int4_dp4a_kernel[grid](xq, xs, packed, scales, zeros, out, res, out if locks is None else locks, n, k,
                            k_per_split, split_k, xq.stride(0), xq.stride(1), xs.stride(0), stride_wn, stride_ws,
                            scales.stride(0), split_stride, out.stride(-2), RUN=run, GROUP=group_size,
                            BLOCK_N=block_n, CHUNKS=chunks, SERIAL=locks is not None,
                            STAGES=num_stages if xq.is_cuda else 1, ASM=xq.is_cuda, PDL=pdl, num_warps=num_warps,
                            **launch_options(pdl))
    return res if locks is not None else gemv_result(out, dtype)
