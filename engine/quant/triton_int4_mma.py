"""Triton kernels: out = x @ dequant(W)^T for group-wise int4 weights with the zero point and the scale
folded out of the per-code work (kernel="mma" of triton_int4._launch).

Reference: `int4_linear_reference` in int4.py. Same layouts as triton_int4.py (the weight in the kernel
layout of int4.pack_int4_kernel: per row, each chunk of 32 input features is 4 int32 words, nibble i
of word r holding feature 32c + 4i + r; scales [N, K // G]; zeros [N, K // G] uint8). No repack: int4,
AWQ and GPTQ layers (act-order through the layer's input permutation) all run on this layout.

The fold. Bits 0x4300 | q are the bfloat16 128 + q and 0x6400 | q the float16 1024 + q, exactly, so
the MMA operand MAGIC + q costs integer ops only, and for a K step inside one group
    out += s * (x . (MAGIC + q) - (MAGIC + zero) * sum(x over the step))
two FMAs per output and step instead of float ops per code (the fold's own error is that of the
float32 sums of step size, MAGIC * |x| * 2^-24 a term, far below 16-bit rounding). float32 x (tests):
MAGIC 0, the operand q itself.

Two kernels, both grid (row tiles, column tiles, SPLIT_K) with rows fastest, every step whole and inside
one group (the step divides the group, the group K), split-K partials as triton_int4 (a float32
[SPLIT_K, M, N] scratch summed by torch.sum or, SERIAL, by the tile's last slice), nothing read on the
host (CUDA-graph safe):
- `_int4_mma_pairs_kernel` (layout="pairs", the one tuned for 1-256 rows): swap-AB (out^T = W x^T, the
  weight tile the wgmma A operand in registers, rows of x its N). The words are read as int16 half-words
  (one contiguous [BLOCK_N, 8 * CHUNKS] tile a step); dot I (of 4) takes nibble I of every half-word,
  so its operand is elementwise on the loaded tile with constant operands only, which lets Triton load
  the half-words straight into the A operand's register layout and unpack there (no shared-memory round
  trip of the unpacked tile, checked in sm_90 TTGIR by test_quant_sm90_compile). A word's two halves are
  adjacent columns, i.e. one 32-bit register of the operand, so with ASM one shift and one LOP3 of
  inline PTX unpack two codes. x^T is gathered in the matching order (column 2j + h of dot I is feature
  32 * (j // 4) + 16h + 4I + j % 4). Counted in sm_90 SASS (Triton 3.9): ~2.8 instructions a code at
  16 rows x 256 weight rows, ~4.5 at 64 x 256, against ~6.4-8 for triton_int4's per-plane kernel.
- `_int4_mma_kernel` (layout="tile"): the [BLOCK_N, BLOCK_K] tile in natural K order, every value from
  its own load (feature k reads word 4 * (k // 32) + k % 4, nibble (k % 32) // 4: 16-byte loads, each
  word loaded once per code it holds), x contiguous; folded (FOLD) or (q - zero) * scale per code in
  float32, both orientations (SWAP). Its per-column shift keeps Triton from unpacking in the operand's
  layout, so it goes through shared memory; offered for many rows in the plain GEMM orientation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4 import KERNEL_CHUNK
from .int4_layout import _step_words, layout_args
from .triton_int4 import _next_group_params, _serial_when_split, asm_supported
from .triton_int8 import _store_tile, _tile, gemv_result, mm_block_m, split_for_waves, split_outputs


@triton.jit
def _folded_operand(w, shift, DT: tl.constexpr):
    """Codes of the words w (nibble at `shift`) as DT MAGIC + q (bfloat16: 128 + q; float16: 1024 + q),
    exact, from integer ops only; float32: q (MAGIC 0)."""
    q = (w >> shift) & 0xF
    if DT == tl.bfloat16:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif DT == tl.float16:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:  # float32 x (MAGIC 0): the code itself, exact, so the fold adds no cancellation
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True).to(DT) - 1024.0


@triton.jit
def _scaled_operand(w, shift, scale, zero, DT: tl.constexpr):
    """(q - zero) * scale in DT, through the float32 2^23 + q (exact) and one subtract, one multiply."""
    q = ((w >> shift) & 0xF) | 0x4B000000
    return ((q.to(tl.float32, bitcast=True) - (zero + 8388608.0)) * scale).to(DT)


@triton.jit(do_not_specialize=["M", "split_k"])  # one compile for every row count and split
def _int4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                     stride_xm, stride_wn, stride_ws, stride_sn, stride_os, stride_om, RUN: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SERIAL: tl.constexpr, STAGES: tl.constexpr, SWAP: tl.constexpr, FOLD: tl.constexpr,
                     MAGIC: tl.constexpr, PRECISION: tl.constexpr):
    """MAGIC: the float _folded_operand adds to each code (128.0 for bfloat16 x, 1024.0 float16, 0 float32)."""
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # feature k of a step (steps start on whole chunks of 32): word 4 * (k // 32) + k % 4, nibble (k % 32) // 4
    word_k = (offs_k // 32) * 4 + offs_k % 4
    shift_k = ((offs_k % 32) // 4) * 4
    n64 = offs_n.to(tl.int64)
    s_rows = n64 * stride_sn
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP:
        w_rows = w_ptr + n64[:, None] * stride_wn  # [BLOCK_N, BLOCK_K] tiles
        x_tile = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]  # x^T [BLOCK_K, BLOCK_M]
        w_mask = mask_n[:, None]
        x_mask = mask_m[None, :]
        shift = shift_k[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        w_rows = w_ptr + n64[None, :] * stride_wn  # W^T [BLOCK_K, BLOCK_N] tiles
        x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_mask = mask_n[None, :]
        x_mask = mask_m[:, None]
        shift = shift_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_step in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        k0 = tl.multiple_of(k_step, BLOCK_K)  # (a new name: the loop variable is left alone)
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        words = _step_words(kw, word_k, stride_ws, RUN, 4)
        if SWAP:
            w = tl.load(w_rows + words[None, :], mask=w_mask, other=0)
        else:
            w = tl.load(w_rows + words[:, None], mask=w_mask, other=0)
        xs = tl.load(x_tile + k0, mask=x_mask, other=0.0)
        g = k0 // GROUP
        scale = tl.load(s_ptr + s_rows + g, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + s_rows + g, mask=mask_n, other=0).to(tl.float32)
        if FOLD:
            wd = _folded_operand(w, shift, DT)
            if SWAP:
                part = tl.dot(wd, xs, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
                xsum = tl.sum(xs.to(tl.float32), axis=0)
                acc += (part - (zero + MAGIC)[:, None] * xsum[None, :]) * scale[:, None]
            else:
                part = tl.dot(xs, wd, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
                xsum = tl.sum(xs.to(tl.float32), axis=1)
                acc += (part - xsum[:, None] * (zero + MAGIC)[None, :]) * scale[None, :]
        else:
            if SWAP:
                wd = _scaled_operand(w, shift, scale[:, None], zero[:, None], DT)
                acc = tl.dot(wd, xs, acc, input_precision=PRECISION)
            else:
                wd = _scaled_operand(w, shift, scale[None, :], zero[None, :], DT)
                acc = tl.dot(xs, wd, acc, input_precision=PRECISION)
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch (every slice writes, empty ones zeros).
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=SWAP, SERIAL=SERIAL)


def _pair_ptx(shift: int, magic: str) -> str:
    """PTX of _pair_operand's ASM path on a 32-bit register holding two half-words ($1): shift, then one
    LOP3 `(t & 0x000F000F) | magic` gives both codes as 16-bit floats MAGIC + q ($0)."""
    shr = f"shr.b32 t, $1, {shift};\n" if shift else "mov.b32 t, $1;\n"
    return "{\n.reg .b32 t;\n" + shr + f"lop3.b32 $0, t, 0x000F000F, {magic}, 0xEA;\n}}"


def _pair_scaled_ptx(shift: int, magic: str, one: str, fma: str) -> str:
    """_pair_ptx, then ((MAGIC + q) + $2) * $3 on both halves by two packed FMAs ($2: -(MAGIC + zero), so the
    first is exact; the second rounds once)."""
    shr = f"shr.b32 t, $1, {shift};\n" if shift else "mov.b32 t, $1;\n"
    return ("{\n.reg .b32 t, one, nzero;\n" + shr + f"lop3.b32 t, t, 0x000F000F, {magic}, 0xEA;\n"
            f"mov.b32 one, {one};\nmov.b32 nzero, 0x80008000;\n"
            f"fma.rn.{fma} t, t, one, $2;\nfma.rn.{fma} $0, t, $3, nzero;\n}}")


# indexed by a constexpr inside the kernels (one string per nibble)
_PAIR_PTX_BF16 = tl.constexpr(tuple(_pair_ptx(4 * i, "0x43004300") for i in range(4)))
_PAIR_PTX_FP16 = tl.constexpr(tuple(_pair_ptx(4 * i, "0x64006400") for i in range(4)))
_PAIR_SCALED_BF16 = tl.constexpr(tuple(_pair_scaled_ptx(4 * i, "0x43004300", "0x3F803F80", "bf16x2")
                                       for i in range(4)))
_PAIR_SCALED_FP16 = tl.constexpr(tuple(_pair_scaled_ptx(4 * i, "0x64006400", "0x3C003C00", "f16x2")
                                       for i in range(4)))


@triton.jit
def _pair_asm(h, I: tl.constexpr, DT: tl.constexpr):
    """_pair_operand by inline PTX, two half-words a 32-bit register (pack=2): one shift and one LOP3 per
    two codes. A pure one-operand asm, so Triton can still unpack in the MMA operand's layout."""
    if DT == tl.bfloat16:
        return tl.inline_asm_elementwise(_PAIR_PTX_BF16[I], "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(_PAIR_PTX_FP16[I], "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _pair_scaled_asm(h, nz, sc, I: tl.constexpr, DT: tl.constexpr):
    """(q - zero) * scale of nibble I of each half-word h in DT by inline PTX (_pair_scaled_ptx); nz, sc:
    -(MAGIC + zero) and the scale, DT, broadcast to h's shape."""
    if DT == tl.bfloat16:
        return tl.inline_asm_elementwise(_PAIR_SCALED_BF16[I], "=r,r,r,r", [h, nz, sc], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(_PAIR_SCALED_FP16[I], "=r,r,r,r", [h, nz, sc], dtype=tl.float16,
                                         is_pure=True, pack=2)


@triton.jit
def _magic_pair(h, I: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """MAGIC + q of nibble I of each half-word h in DT (ASM, CUDA and 16-bit x: two codes per shift and LOP3)."""
    if ASM:
        return _pair_asm(h, I, DT)
    else:
        return _pair_operand(h, I, DT)


@triton.jit
def _scaled_pair(h, nz, sc, I: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """(q - zero) * scale of nibble I of each half-word h in DT (nz: -(MAGIC + zero), sc: the scale, both DT
    and h's shape): the sum (MAGIC + q) + nz is exact, the product rounds once."""
    if ASM:
        return _pair_scaled_asm(h, nz, sc, I, DT)
    else:
        return (_pair_operand(h, I, DT) + nz) * sc


@triton.jit
def _pair_operand(h, I: tl.constexpr, DT: tl.constexpr):
    """Nibble I (0-3) of each 16-bit half-word h as DT MAGIC + q: a constant shift, an AND, an OR on the
    16-bit values, and a bitcast (no truncation). A word's two halves (nibbles I and I + 4) are adjacent
    columns of the tile, so in the MMA operand's registers they share one 32-bit register and one
    32-bit shift / LOP3 does both."""
    q = (h >> (4 * I)) & 0xF
    if DT == tl.bfloat16:
        return (q | 0x4300).to(tl.bfloat16, bitcast=True)
    elif DT == tl.float16:
        return (q | 0x6400).to(tl.float16, bitcast=True)
    else:
        return (q | 0x6400).to(tl.float16, bitcast=True).to(DT) - 1024.0


@triton.jit(do_not_specialize=["M", "split_k"])
def _int4_mma_pairs_kernel(x_ptr, h_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                           stride_xm, stride_hn, stride_hs, stride_sn, stride_os, stride_om, HRUN: tl.constexpr,
                           GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                           SERIAL: tl.constexpr, STAGES: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr,
                           FOLD: tl.constexpr, XPERM: tl.constexpr, PRECISION: tl.constexpr,
                           PREFETCH: tl.constexpr):
    """Swap-AB (out^T = W x^T), the weight read as 16-bit half-words (h_ptr: the packed words viewed as
    int16, [N, K // 4]): per step of 32 * CHUNKS features (inside one group) one [BLOCK_N, 8 * CHUNKS]
    half-word tile, loaded once, and 4 dots of K = 8 * CHUNKS: dot I takes nibble I of every half-word,
    i.e. column 2j + h is nibble 4h + I of word j, feature 32 * (j // 4) + 16h + 4I + j % 4, and x^T's
    rows are gathered in that order. Folded dequantization as _int4_mma_kernel's FOLD. PREFETCH: each step
    loads the next step's group scale and zero (plain loads, outside the pipelined copies), so their latency
    overlaps a step's work instead of starting it."""
    HW: tl.constexpr = 8 * CHUNKS
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    offs_h = tl.arange(0, HW)
    j = offs_h // 2
    feat = 32 * (j // 4) + 16 * (offs_h % 2) + j % 4  # nibble-0 feature of column c of dot 0
    n64 = offs_n.to(tl.int64)
    s_rows = n64 * stride_sn
    DT: tl.constexpr = x_ptr.dtype.element_ty
    h_rows = h_ptr + n64[:, None] * stride_hn  # [BLOCK_N, HW] tiles
    if XPERM:  # x in permute_pairs_x's order: dot I's x^T is columns HW * I ... of the step, contiguous
        x_tile = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_h[:, None]  # x^T [HW, BLOCK_M]
        X_STEP: tl.constexpr = HW
    else:
        x_tile = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + feat[:, None]  # x^T [HW, BLOCK_M]
        X_STEP: tl.constexpr = 4
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PREFETCH:  # the first step's scale and zero
        s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k_start, K, GROUP)
    # Unfolded, at least one trip (an empty slice runs the last step at scale 0): with no path around the loop,
    # no copies of the accumulators sit between the wgmmas and their wait after it, which ptxas answers by
    # serializing every wgmma (C7515: sm_90 SASS waits after each one, and the unfolded tiles lose their async
    # MMA). Folded tiles wait for each step's dots anyway.
    STEP: tl.constexpr = 32 * CHUNKS
    trips = tl.cdiv(k_end - k_start, STEP)
    if not FOLD:
        trips = tl.maximum(trips, 1)
    for i in tl.range(0, trips, num_stages=STAGES):
        k0 = k_start + i * STEP
        if not FOLD:
            k0 = tl.minimum(k0, K - STEP)  # K: whole groups, so whole steps
        k0 = tl.multiple_of(k0, STEP)
        kh = tl.multiple_of(k0 // 4, 8)  # steps start on whole chunks: 16-byte aligned half-words
        h = tl.load(h_rows + _step_words(kh, offs_h, stride_hs, HRUN, 8)[None, :], mask=mask_n[:, None], other=0)
        if PREFETCH:  # this step's, loaded a step ago; then the next step's
            scale, zero = s_next.to(tl.float32), z_next.to(tl.float32)
            s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k0 + STEP, K, GROUP)
        else:
            g = k0 // GROUP
            scale = tl.load(s_ptr + s_rows + g, mask=mask_n, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + s_rows + g, mask=mask_n, other=0).to(tl.float32)
        if not FOLD:
            scale = tl.where(k_start + i * STEP < k_end, scale, 0.0)
        x0 = tl.load(x_tile + k0, mask=mask_m[None, :], other=0.0)
        x1 = tl.load(x_tile + (k0 + X_STEP), mask=mask_m[None, :], other=0.0)
        x2 = tl.load(x_tile + (k0 + 2 * X_STEP), mask=mask_m[None, :], other=0.0)
        x3 = tl.load(x_tile + (k0 + 3 * X_STEP), mask=mask_m[None, :], other=0.0)
        if FOLD:  # the zero point and scale on the step's sums (two FMAs an output a step)
            xsum = tl.sum(x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32), axis=0)
            part = tl.dot(_magic_pair(h, 0, DT, ASM), x0, input_precision=PRECISION)
            part = tl.dot(_magic_pair(h, 1, DT, ASM), x1, part, input_precision=PRECISION)
            part = tl.dot(_magic_pair(h, 2, DT, ASM), x2, part, input_precision=PRECISION)
            part = tl.dot(_magic_pair(h, 3, DT, ASM), x3, part, input_precision=PRECISION)
            acc += (part - (zero + MAGIC)[:, None] * xsum[None, :]) * scale[:, None]
        else:  # (MAGIC + q) - (MAGIC + zero) is exact in DT, times the scale rounds once. One accumulator a
            # dot, so that every wgmma stays in flight while the next operand is unpacked (chained into one
            # accumulator, each dot but the last waits for the one before it: sm_90 PTX wait_group 0)
            nz = tl.broadcast_to(-(zero + MAGIC).to(DT)[:, None], h.shape)
            sc = tl.broadcast_to(scale.to(DT)[:, None], h.shape)
            acc = tl.dot(_scaled_pair(h, nz, sc, 0, DT, ASM), x0, acc, input_precision=PRECISION)
            acc1 = tl.dot(_scaled_pair(h, nz, sc, 1, DT, ASM), x1, acc1, input_precision=PRECISION)
            acc2 = tl.dot(_scaled_pair(h, nz, sc, 2, DT, ASM), x2, acc2, input_precision=PRECISION)
            acc3 = tl.dot(_scaled_pair(h, nz, sc, 3, DT, ASM), x3, acc3, input_precision=PRECISION)
    if not FOLD:
        acc += (acc1 + acc2) + acc3
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=True, SERIAL=SERIAL)


# ----- launch configs -----------------------------------------------------------------------------
def mma_block_k(block_k: int, group_size: int) -> int:
    """The largest K step <= block_k (32, 64, 128 or 256) that divides the group (triton_int4_mma)."""
    return next(bk for bk in (256, 128, 64, 32) if bk <= block_k and group_size % bk == 0)


def mma_config(m: int, n: int, k: int, group_size: int, sms: int, block_m: int, block_n: int, block_k: int,
               num_warps: int, num_stages: int, swap: bool, fold: bool, waves: int = 2,
               whole_waves: bool = False) -> dict:
    """A config of triton_int4_mma's kernel: the K step clamped to divide the group, split-K by
    triton_int8.split_for_waves."""
    block_k = mma_block_k(block_k, group_size)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = split_for_waves(programs, steps, sms, waves, whole_waves)
    return dict(gemv=False, kernel="mma", swap=swap, fold=fold, block_m=block_m, block_n=block_n, block_k=block_k,
                split_k=split, num_warps=num_warps, num_stages=num_stages)


# triton_int4_mma "pairs" tiles (swap-AB, the weight unpacked in the MMA operand's registers, two codes per
# LOP3 with asm), (block_m, block_n, warps, stages) per bucket of rows; block_m 0: the row tile of m
# (mm_block_m). Counted in sm_90 SASS (Triton 3.9): ~2.8 instructions a code at 16 rows x 256 weight rows,
# ~4.5 at 64 x 256 (the gathered x and the fold's per-step correction grow with the rows), against ~6.4-8
# for triton_int4's per-plane kernel. Registers bound the occupancy (95-255 a thread): 16-warp tiles trade
# a few more instructions per code for twice the warps per SM. Shared memory: 9-68 KB a program.
PAIRS_TILES = {
    2: ((16, 256, 8, 3), (16, 128, 4, 3), (16, 512, 16, 3)),
    16: ((16, 256, 8, 3), (16, 128, 4, 3), (16, 256, 8, 4), (16, 512, 16, 3), (16, 64, 4, 3)),
    32: ((32, 256, 8, 3), (32, 128, 4, 3), (32, 256, 16, 3), (16, 256, 8, 3)),
    64: ((64, 256, 8, 3), (64, 128, 8, 3), (64, 256, 16, 3), (32, 256, 8, 3)),
    128: ((64, 256, 8, 3), (128, 128, 8, 3), (64, 256, 16, 3), (64, 128, 8, 3)),
    256: ((64, 256, 8, 3), (128, 128, 8, 3), (64, 256, 16, 3), (64, 128, 8, 3)),
}  # (no tile with more than 64 float32 accumulators a thread: the fold keeps two, 256 x 64 spills)
# "pairs" tiles unfolded (fold=False: (q - zero) * scale as the operand, one accumulator a dot, so the wgmmas
# stay in flight: sm_90 PTX wait_group 7 against the folded tiles' wait_group 0 after every dot, and in SASS
# since the loop has no path around it) with x_perm (x's tiles pipelined copies) and the next step's scale and
# zero prefetched (gate_up at 16 rows on the H200, 16 x 128, 4 warps: 35.2 against 40.7 us without,
# int4_m16_prefetch_times_h200.log; 32.9 with the wgmmas in flight, at one slice: int4_pairs_async_times_h200.log),
# per bucket of rows, each also at one slice (the in-flight operands' registers, 124-255 a thread in sm_90
# ptxas, halve the programs an SM holds, so fewer slices can fill it better); four accumulators a thread bound
# the tiles (64 x 256 and 128 x 128 spill). At 16 rows 16 x 128 also at 4 stages: the LM head 115.4 against 117.9
# us at 3 on an H100 (int4_pairs_scan16_h100.json), each tile also at whole waves (split_for_waves).
PAIRS_ASYNC_TILES = {
    16: ((16, 256, 8, 3), (16, 128, 4, 3), (16, 128, 4, 4)),
    32: ((32, 128, 4, 3), (16, 256, 8, 3)),
    64: ((64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3)),
    256: ((64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
}
# triton_int4_mma "tile" configs (the natural-K-order tile, replicated word loads), plain GEMM orientation
# for many rows: (block_m, block_n, block_k, warps, stages, fold).
TILE_LARGE = ((128, 128, 64, 8, 3, False), (64, 128, 128, 8, 2, True))
# and, from 129 rows, all rows of a batch in one tile (each code unpacked once; sm_90 SASS: the loop's
# instruction issue about equals the tile's wgmma time, against ~1.6x at 128 rows)
TILE_ALL_ROWS = ((256, 128, 64, 8, 2, False), (256, 64, 64, 8, 3, False))


def mma_candidates(m: int, n: int, k: int, group_size: int, sms: int, asm: bool = False) -> list[dict]:
    """triton_int4_mma configs for m rows: "pairs" tiles for every bucket (asm: its inline-PTX unpack;
    only when the group holds whole 128-feature steps; above 2 rows also unfolded with x_perm and prefetch),
    split-K up to 2 programs per SM (and 4 at up to 16 rows), reduced in the kernel; plain-GEMM "tile" configs
    above 64 rows."""
    bucket = next(b for b in sorted(PAIRS_TILES) if m <= b or b == 256)
    out = []
    if group_size % 128 == 0:
        for bm, bn, warps, stages in PAIRS_TILES[bucket]:
            bm = bm or mm_block_m(m)
            cfg = mma_config(m, n, k, group_size, sms, bm, bn, 128, warps, stages, True, True)
            out.append(dict(cfg, layout="pairs", asm=asm))
        if m <= 16:  # longer split-K for the smallest batches
            for bm, bn, warps, stages in PAIRS_TILES[bucket][:2]:
                cfg = mma_config(m, n, k, group_size, sms, bm, bn, 128, warps, stages, True, True, waves=4)
                out.append(dict(cfg, layout="pairs", asm=asm))
        if m > 2:
            for bm, bn, warps, stages in PAIRS_ASYNC_TILES[next(b for b in sorted(PAIRS_ASYNC_TILES)
                                                                if m <= b or b == 256)]:
                for whole in (False, True):
                    cfg = dict(mma_config(m, n, k, group_size, sms, bm, bn, 128, warps, stages, True, False,
                                          whole_waves=whole), layout="pairs", asm=asm, x_perm=True, prefetch=True)
                    out += [cfg] + ([dict(cfg, split_k=1)] if cfg["split_k"] > 1 else [])
    if m > 64:
        for bm, bn, bk, warps, stages, fold in TILE_LARGE + (TILE_ALL_ROWS if 128 < m <= 256 else ()):
            out.append(mma_config(m, n, k, group_size, sms, bm, bn, bk, warps, stages, False, fold))
        out += [dict(c, split_k=1) for c in out if c["split_k"] > 1 and c["block_m"] >= 128 and not c["swap"]]
    return _serial_when_split(out, lambda c: True)


def permute_pairs_x(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """x [M, K] (K a multiple of 32 * chunks) in the pairs kernel's XPERM order: in each step of 32 * chunks
    features, feature 32a + 16h + 4I + r goes to column 8 * chunks * I + 8a + 2r + h, so dot I's x^T is one
    contiguous tile that the pipeline copies straight into the MMA's shared-memory operand. Views and one copy
    (CUDA-graph safe)."""
    m, k = x.shape
    return x.reshape(m, k // (32 * chunks), chunks, 2, 4, 4).permute(0, 1, 4, 2, 5, 3).reshape(m, k)


def _launch_mma(x, packed, scales, zeros, group_size, *, block_m=None, block_n=None, block_k=None, split_k=None,
                num_warps=None, num_stages=None, serial=False, swap=True, fold=True, layout="tile", asm=False,
                x_perm=False, prefetch=False, x_ordered=False):
    """triton_int4_mma's kernels. layout "tile": the natural-K-order tile (swap: out^T = W x^T, else x W^T;
    fold: MAGIC + q as the MMA operand, the zero point and scale on the step's output, else (q - zero) *
    scale per code); "pairs": swap-AB, the words read as half-words, 4 dots a step (asm: two codes per
    LOP3 by inline PTX, CUDA and 16-bit x only), folded or (fold=False) with (q - zero) * scale as the operand
    and one accumulator a dot, every wgmma in flight while the next operand is unpacked; x_perm (pairs): x
    permuted by permute_pairs_x before the launch, its tiles then pipelined copies; prefetch (pairs): each step
    loads the next step's scale and zero. block_k: the K step, a multiple of 32 that divides the group (pairs: at
    least 128). x_ordered: x is already in permute_pairs_x's order (written so by its producer)."""
    if layout not in ("tile", "pairs"):
        raise ValueError(f"layout={layout!r}: expected 'tile' or 'pairs'")
    if asm and not asm_supported(x):
        raise ValueError("asm=True (inline PTX) runs on CUDA (sm_80+) with float16 / bfloat16 x only")
    if layout == "pairs" and not swap:
        raise ValueError("layout='pairs' is swap-AB only")
    if (x_perm or prefetch) and layout != "pairs":
        raise ValueError("x_perm=True and prefetch=True are for layout='pairs'")
    m, k = x.shape
    n = packed.shape[0]
    block_m = block_m or mm_block_m(m)
    block_n = block_n or 128
    block_k = block_k or mma_block_k(128, group_size)
    if block_k % KERNEL_CHUNK or group_size % block_k or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k}: the mma kernel needs a power of two, a multiple of {KERNEL_CHUNK} "
                         f"that divides the group size {group_size}")
    if layout == "pairs" and block_k < 4 * KERNEL_CHUNK:
        raise ValueError(f"block_k={block_k}: layout='pairs' needs steps of >= {4 * KERNEL_CHUNK} features "
                         "(each of its 4 dots has K = block_k / 4 >= 16), in groups of at least that")
    split_k = split_k or 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    grid, out, split_stride, locks, res = split_outputs(x.device, m, n, block_m, block_n, split_k, serial, x.dtype)
    stages = (num_stages or 3) if x.is_cuda else 1
    magic = {torch.bfloat16: 128.0, torch.float16: 1024.0}.get(x.dtype, 0.0)
    warps = num_warps or (8 if block_m * block_n >= 128 * 128 else 4)
    if layout == "pairs":
        half = packed.view(torch.int16)  # [N, S, 2 * RUN]: half-word 2w + h is bits 16h..16h+15 of word w
        stride_hn, stride_hs, hrun = layout_args(half)
        xk = permute_pairs_x(x, block_k // KERNEL_CHUNK) if x_perm and not x_ordered else x
        _int4_mma_pairs_kernel[grid](xk, half, scales, zeros, out, res, out if locks is None else locks, m, n, k,
                                     k_per_split, split_k, xk.stride(0), stride_hn, stride_hs, scales.stride(0),
                                     split_stride, out.stride(-2), HRUN=hrun, GROUP=group_size, BLOCK_M=block_m,
                                     BLOCK_N=block_n, CHUNKS=block_k // KERNEL_CHUNK, SERIAL=locks is not None,
                                     STAGES=stages, MAGIC=magic, ASM=asm, FOLD=fold, XPERM=x_perm, PREFETCH=prefetch,
                                     PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps)
        return res if locks is not None else gemv_result(out, x.dtype)
    stride_wn, stride_ws, run = layout_args(packed)
    _int4_mma_kernel[grid](x, packed, scales, zeros, out, res, out if locks is None else locks, m, n, k, k_per_split,
                           split_k, x.stride(0), stride_wn, stride_ws, scales.stride(0), split_stride,
                           out.stride(-2), RUN=run, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
                           BLOCK_K=block_k, SERIAL=locks is not None, STAGES=stages, SWAP=swap, FOLD=fold,
                           MAGIC=magic, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps)
    return res if locks is not None else gemv_result(out, x.dtype)
