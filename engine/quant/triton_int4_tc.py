"""Triton kernel: out = x @ dequant(W)^T for group-wise int4 weights, one tensor-core dot per K step.

Reference: `int4_linear_reference` in int4.py. Same layouts as triton_int4.py (the weight in the kernel
layout of int4.pack_int4_kernel: per row, each chunk of 32 input features is 4 int32 words, nibble i
of word r holding feature 32c + 4i + r; scales [N, K // G]; zeros [N, K // G] uint8).

Why a second tensor-core kernel: triton_int4's `_int4_dot_kernel` multiplies each nibble plane by its
own tl.dot (8 dots of K = 4 * CHUNKS per step, each with its own operand staging), which starves the
tensor cores once many rows share the weight tile (prefill chunks, batches of 64-256). Here the 8
dequantized planes [BLOCK_N, WORDS] are interleaved in registers with tl.join into one
[BLOCK_N, 8 * WORDS] tile whose column j is nibble p(j) of word w = j // 8, i.e. input feature
    32 * (w // 4) + 4 * p(j) + w % 4,   p(j) = j % 8 // 4 + 2 * (j // 2 % 2) + 4 * (j % 2)
(from the step's start; planes i and i + 4 side by side, as _asm_planes makes them),
and x is read in that same column order (a gather from a contiguous range, cached), so one dot of
K = 32 * CHUNKS (128-512) does the step. The joins only regroup values a thread already holds, so
the unpacked tile costs no data movement; dequantization is the magic-number trick of triton_int4
(`_plane`: one LOP3 and a float subtract per code, the scale multiply, a conversion to x's dtype).

Two orientations, a constexpr:
- SWAP (out^T = W x^T, as Marlin/Machete do for small batches): acc [BLOCK_N, BLOCK_M], the
  dequantized tile is the MMA's A operand (from registers), rows of x its N (16 at the least).
- not SWAP (large batches, prefill): acc [BLOCK_M, BLOCK_N] = x W^T, big row tiles (64-128), the
  dequantized tile transposed into the B operand, as a plain GEMM would be.
x is either gathered in the tile's column order (8-byte runs, cached), or with XNAT loaded in feature
order (16-byte loads) and permuted in registers (reshape / permute: feature 32c + 16z + 8y + 4x + r
goes to column 8 * (4c + r) + 4x + 2y + z), which saves the gathers' address arithmetic at many rows.
grid (row tiles, column tiles, SPLIT_K), rows fastest (the programs sharing a weight tile run
together). Split-K partials as in triton_int4 (a float32 [SPLIT_K, M, N] scratch summed by torch.sum
or, serial, by the tile's last slice). Nothing reads device values on the host (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4_layout import _step_words
from .triton_int4 import _group_params, _halves, _next_group_params, _plane
from .triton_int8 import _store_tile, _tile

# The DEQUANT constexpr of a launch config's `dequant`.
DEQUANT_MODES = {"scale": 0, "exact": 1, "asm": 2, "asm_scaled": 3}


@triton.jit
def _dequant(w_lo, w_hi, scale, zero, I: tl.constexpr, DT: tl.constexpr, EXACT: tl.constexpr):
    """Nibble plane I of the words (w_lo, w_hi = _halves(w)) in DT: (q - zero) * scale, or with EXACT
    the integers q - zero (exact in 16 bits; the scale is applied after the dot), one FFMA per code:
    (2^23 + q * 16^i) / 16^i - (2^23 / 16^i + zero) is exact in float32."""
    step = 1 << (4 * (I % 4))  # the place value of plane I's nibble in its half-word
    if EXACT:
        return (_plane(w_lo, w_hi, I) * (1.0 / step) - (zero + 8388608.0 / step)).to(DT)
    return ((_plane(w_lo, w_hi, I) - (zero * step + 8388608.0)) * (scale * (1.0 / step))).to(DT)


def _planes_ptx(magic: str, fma: str, one: str, scaled: bool) -> str:
    """PTX of _asm_planes: $8 the word, $9 the packed -(magic + zero), $10 (scaled) the packed scale;
    $0..$7 planes 0..7. Scaled: one more packed FMA, x * scale + (-0), rounding once as a float32
    (q - zero) * scale rounded to 16 bits would."""
    body = "".join(f"shr.u32 u, $8, {4 * i};\nlop3.b32 t{i}, u, 0x000F000F, {magic}, 0xEA;\n" for i in range(1, 4))
    scale = "".join(f"{fma} t{i}, t{i}, $10, nz;\n" for i in range(4)) if scaled else ""
    return ("{\n.reg .b32 t0, t1, t2, t3, u, one, nz;\n"
            f"mov.b32 one, {one};\nmov.b32 nz, 0x80008000;\nlop3.b32 t0, $8, 0x000F000F, {magic}, 0xEA;\n{body}"
            + "".join(f"{fma} t{i}, t{i}, one, $9;\n" for i in range(4)) + scale
            + "".join(f"mov.b32 {{${i}, ${i + 4}}}, t{i};\n" for i in range(4)) + "}")


_PTX_BF16 = tl.constexpr(_planes_ptx("0x43004300", "fma.rn.bf16x2", "0x3F803F80", False))  # magic 128
_PTX_FP16 = tl.constexpr(_planes_ptx("0x64006400", "fma.rn.f16x2", "0x3C003C00", False))  # magic 1024
_PTX_BF16_SCALED = tl.constexpr(_planes_ptx("0x43004300", "fma.rn.bf16x2", "0x3F803F80", True))
_PTX_FP16_SCALED = tl.constexpr(_planes_ptx("0x64006400", "fma.rn.f16x2", "0x3C003C00", True))
_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r")  # 8 16-bit planes; the word, -(magic + zero)
_CONSTRAINTS_SCALED = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r,r")  # and the scale


@triton.jit
def _asm_planes(w, zero, scale, DT: tl.constexpr, SCALED: tl.constexpr):
    """The 8 nibble planes of the words w as q - zero (SCALED: (q - zero) * scale) in DT (bfloat16 /
    float16), two codes per instruction (Marlin's trick): per word, 3 shifts, 4 LOP3
    `(w >> 4i & 0x000F000F) | magic` giving the 16-bit pairs (magic + q_i, magic + q_{i+4}) with
    magic = 128 (bf16) or 1024 (fp16), whose mantissa holds q exactly, 4 packed FMAs x * 1 - (magic +
    zero) (exact), and SCALED 4 more by the scale. CUDA only (inline PTX)."""
    if DT == tl.bfloat16:
        mz = tl.broadcast_to((0xC300 | zero.to(tl.int32)) * 0x10001, w.shape)  # packed -(128 + zero)
    else:
        mz = tl.broadcast_to((0xE400 | zero.to(tl.int32)) * 0x10001, w.shape)  # packed -(1024 + zero)
    s2 = tl.broadcast_to((scale.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001, w.shape)
    if DT == tl.bfloat16:
        t = tl.bfloat16
        if SCALED:
            planes = tl.inline_asm_elementwise(_PTX_BF16_SCALED, _CONSTRAINTS_SCALED, [w, mz, s2],
                                               dtype=(t, t, t, t, t, t, t, t), is_pure=True, pack=1)
        else:
            planes = tl.inline_asm_elementwise(_PTX_BF16, _CONSTRAINTS, [w, mz],
                                               dtype=(t, t, t, t, t, t, t, t), is_pure=True, pack=1)
    else:
        t = tl.float16
        if SCALED:
            planes = tl.inline_asm_elementwise(_PTX_FP16_SCALED, _CONSTRAINTS_SCALED, [w, mz, s2],
                                               dtype=(t, t, t, t, t, t, t, t), is_pure=True, pack=1)
        else:
            planes = tl.inline_asm_elementwise(_PTX_FP16, _CONSTRAINTS, [w, mz],
                                               dtype=(t, t, t, t, t, t, t, t), is_pure=True, pack=1)
    return planes


@triton.jit
def _unpacked_tile(w, scale, zero, DT: tl.constexpr, DEQUANT: tl.constexpr):
    """[BLOCK_N, WORDS] int32 words -> [BLOCK_N, 8 * WORDS] codes in DT, column j = nibble
    p(j) = j % 8 // 4 + 2 * (j // 2 % 2) + 4 * (j % 2) of word j // 8. DEQUANT 0: (q - zero) * scale;
    1: q - zero (EXACT); 2: q - zero by inline PTX (_asm_planes); 3: (q - zero) * scale by inline PTX."""
    if DEQUANT >= 2:
        p0, p1, p2, p3, p4, p5, p6, p7 = _asm_planes(w, zero, scale, DT, DEQUANT == 3)
    else:
        w_lo, w_hi = _halves(w)
        p0 = _dequant(w_lo, w_hi, scale, zero, 0, DT, DEQUANT == 1)
        p1 = _dequant(w_lo, w_hi, scale, zero, 1, DT, DEQUANT == 1)
        p2 = _dequant(w_lo, w_hi, scale, zero, 2, DT, DEQUANT == 1)
        p3 = _dequant(w_lo, w_hi, scale, zero, 3, DT, DEQUANT == 1)
        p4 = _dequant(w_lo, w_hi, scale, zero, 4, DT, DEQUANT == 1)
        p5 = _dequant(w_lo, w_hi, scale, zero, 5, DT, DEQUANT == 1)
        p6 = _dequant(w_lo, w_hi, scale, zero, 6, DT, DEQUANT == 1)
        p7 = _dequant(w_lo, w_hi, scale, zero, 7, DT, DEQUANT == 1)
    # tl.join adds the new axis last: t[..., x, y, z] = plane x + 2y + 4z, so adjacent columns hold
    # planes i and i + 4, the two halves of one _asm_planes register (no re-packing of 16-bit pairs)
    t = tl.join(tl.join(tl.join(p0, p1), tl.join(p2, p3)), tl.join(tl.join(p4, p5), tl.join(p6, p7)))
    return tl.reshape(t, (w.shape[0], 8 * w.shape[1]))


@triton.jit
def _step_group_params(s_ptr, z_ptr, s_rows, mask_n, k0, k_end, WORDS: tl.constexpr, GROUP: tl.constexpr):
    """Scale and zero (float32) [BLOCK_N, WORDS] of a step of whole groups (GROUP divides the step, so steps start
    on groups): one load of the step's groups a row, each repeated over its GROUP / 8 words. The same values as
    _group_params' gather of a group a word, from which Triton 3.6 cannot build the non-swapped kernel for sm_90
    (its TritonGPUOptimizeDotOperands pass fails)."""
    GROUPS: tl.constexpr = 8 * WORDS // GROUP
    offs_g = tl.arange(0, GROUPS)
    mask = mask_n[:, None] & (k0 + GROUP * offs_g < k_end)[None, :]
    at = s_rows[:, None] + (k0 // GROUP + offs_g)[None, :]
    scale = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + at, mask=mask, other=0).to(tl.float32)
    BLOCK_N: tl.constexpr = mask_n.shape[0]
    scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, GROUPS, WORDS // GROUPS))
    zero = tl.broadcast_to(zero[:, :, None], (BLOCK_N, GROUPS, WORDS // GROUPS))
    return tl.reshape(scale, (BLOCK_N, WORDS)), tl.reshape(zero, (BLOCK_N, WORDS))


def permute_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 32) with each 32-feature chunk in the tc kernel's column order (XPERM): feature
    32c + 16z + 8y + 4x + r to column 8 (4c + r) + 4x + 2y + z, the permutation XNAT makes in registers. Views and
    one copy: no index tensor to upload, so it can run inside a CUDA-graph capture."""
    m, k = x.shape
    return x.reshape(m, k // 32, 2, 2, 2, 4).permute(0, 1, 5, 4, 3, 2).reshape(m, k)


@triton.jit(do_not_specialize=["M", "split_k"])  # one compile for every row count and split
def _int4_tc_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                    stride_xm, stride_wn, stride_ws, stride_sn, stride_os, stride_om, RUN: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                    ONE_GROUP: tl.constexpr, EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr,
                    SWAP: tl.constexpr, DEQUANT: tl.constexpr, XNAT: tl.constexpr, PRECISION: tl.constexpr,
                    PREFETCH: tl.constexpr = False, XPERM: tl.constexpr = False):
    """PREFETCH (steps inside one group): each step loads the next step's group scale and zero, so their latency
    overlaps a step's work: as plain loads (not the pipelined copies of the weights) it is otherwise paid every
    step, before the dequantization can start (sm_90 PTX: ld.global.b16 / .b8 at the loop's top).
    XPERM: x_ptr holds x already in the tile's column order (`permute_x`), so a step's x is one contiguous tile
    that the pipeline copies straight into the MMA's shared-memory operand (16-byte cp.async), where XNAT
    permutes it through registers and shared memory every step (4 barriers a step in sm_90 PTX)."""
    WORDS: tl.constexpr = 4 * CHUNKS
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    col_k = 32 * (offs_w // 4) + offs_w % 4  # plane 0's feature of each word, from the step's start
    offs_j = tl.arange(0, 8 * WORDS)
    plane_j = (offs_j % 8) // 4 + 2 * ((offs_j // 2) % 2) + 4 * (offs_j % 2)  # nibble of column j (_unpacked_tile)
    feat_j = 32 * ((offs_j // 8) // 4) + 4 * plane_j + (offs_j // 8) % 4  # feature of tile column j
    offs_f = tl.arange(0, 32 * CHUNKS)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = offs_n.to(tl.int64) * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PREFETCH:  # the first step's scale and zero
        s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k_start, K, GROUP)
    for k0 in tl.range(k_start, k_end, 32 * CHUNKS, num_stages=STAGES):
        kc = k0 + col_k
        kj = k0 + feat_j
        if EVEN_K:  # every step whole: masks constant along K
            mask_k = tl.full([WORDS], 1, tl.int1)
            mask_j = tl.full([8 * WORDS], 1, tl.int1)
        else:  # whole chunks: K and every split bound are multiples of 32
            mask_k = kc < k_end
            mask_j = kj < k_end
        mask = mask_n[:, None] & mask_k[None, :]
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        w = tl.load(w_rows + _step_words(kw, offs_w, stride_ws, RUN, 4)[None, :], mask=mask, other=0)
        if PREFETCH:  # this step's, loaded a step ago; then the next step's
            scale, zero = s_next.to(tl.float32)[:, None], z_next.to(tl.float32)[:, None]
            s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k0 + 32 * CHUNKS, K, GROUP)
        elif ONE_GROUP or (32 * CHUNKS) % GROUP:
            scale, zero = _group_params(s_ptr, z_ptr, s_rows, mask_n, kc, mask, k0, GROUP, ONE_GROUP)
        else:  # whole groups a step
            scale, zero = _step_group_params(s_ptr, z_ptr, s_rows, mask_n, k0, k_end, WORDS, GROUP)
        wd = _unpacked_tile(w, scale, zero, DT, DEQUANT)  # masked words dequantize to garbage; their x is 0
        if XNAT or XPERM:  # a contiguous tile: x in feature order (XNAT) or in the tile's column order (XPERM)
            mask_f = mask_m[:, None] & (k0 + offs_f < k_end)[None, :]
            xs = tl.load(x_rows[:, None] + (k0 + offs_f)[None, :], mask=mask_f, other=0.0)
        if XNAT:  # put into the tile's column order in registers
            xs = tl.reshape(tl.permute(tl.reshape(xs, (BLOCK_M, CHUNKS, 2, 2, 2, 4)), (0, 1, 5, 4, 3, 2)),
                            (BLOCK_M, 8 * WORDS))
        if not (SWAP or XNAT or XPERM):  # gathered in the tile's column order
            xs = tl.load(x_rows[:, None] + kj[None, :], mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        if SWAP:
            if XNAT or XPERM:
                xt = tl.trans(xs)
            else:
                xt = tl.load(x_rows[None, :] + kj[:, None], mask=mask_j[:, None] & mask_m[None, :], other=0.0)
            if DEQUANT == 0 or DEQUANT == 3:
                acc = tl.dot(wd, xt, acc, input_precision=PRECISION)
            else:  # the step lies in one group (ONE_GROUP): its scale multiplies the step's dot
                acc += tl.dot(wd, xt, input_precision=PRECISION) * scale
        else:
            if DEQUANT == 0 or DEQUANT == 3:
                acc = tl.dot(xs, tl.trans(wd), acc, input_precision=PRECISION)
            else:
                acc += tl.dot(xs, tl.trans(wd), input_precision=PRECISION) * tl.trans(scale)
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch (every slice writes, empty ones zeros).
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=SWAP, SERIAL=SERIAL)
