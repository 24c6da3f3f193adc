"""Triton kernels: out = x @ dequant(W)^T for group-wise int4 weights, unpacked and dequantized in registers.

Reference: `int4_linear_reference` in int4.py (int4, AWQ and GPTQ layers all run these kernels).

Layouts (G = group size, a multiple of 32; K % 32 == 0):
    x:       [M, K] float16 / bfloat16 / float32, K contiguous
    packed:  [N, K // (8 * RUN), RUN] int32, the kernel layout of int4.pack_int4_kernel: per row, each chunk of
             32 input features is 4 words (16 bytes), nibble i of word r holding feature 32c + 4i + r; stored
             step-major (runs of RUN words of consecutive rows contiguous), word w of row n at
             n * stride_wn + (w // RUN) * stride_ws + w % RUN (_word_offsets)
    scales:  [N, K // G] float; zeros: [N, K // G] uint8; a code q stands for (q - zero) * scale
    out:     [M, N] in x's dtype
Both kernels walk K in steps of CHUNKS chunks: one [BLOCK_N, 4 * CHUNKS] tile of words per step, one
16-byte load per row and chunk. Nibble plane i of that tile meets the features 32c + 4i + (0..3), so
x is read as 8 small gathers of 4 contiguous values per chunk, and no unpacked tile is reshaped.
The tl.dot kernels dequantize in registers with one LOP3 and one float subtract per code: plane i
(i < 4 from the word, i >= 4 from the word >> 16, each OR-ed with 0x4B000000 once per word) is masked
in place, `src & (0x4B000000 | 15 << 4i')` being the float 2^23 + q * 16^i' exactly; subtracting
2^23 + zero * 16^i' (a per-row constant of the group) leaves (q - zero) * 16^i', and the 16^-i' goes
into the scale, once per group, not per code. The scale and zero of a group are loaded once per row
and step when a step lies inside one group (ONE_GROUP: G % (32 * CHUNKS) == 0), else per chunk.
- `_int4_gemv_kernel` (M <= GEMV_MAX_ROWS, decode): CUDA cores, grid (M, cdiv(N, BLOCK_N), SPLIT_K),
  row fastest (the programs that share a weight tile run together). A code costs one LOP3 and one FMA:
  masked under no exponent bits, a nibble is the float32 denormal q * 2^(4i') * 2^-149 exactly (no
  offset to subtract; planes 0-5 from the word, 6-7 from the word >> 8), and x, read once per plane,
  is scaled by 2^(DENORMAL_E - 4i') so that each product is q * x * 2^(DENORMAL_E - 149). The zero
  point comes off once per row, word column and step, as zero * (the sum of the x that column met),
  then the scale; the [BLOCK_N, 4 * CHUNKS] float32 accumulator is reduced over K once at the end.
  x's per-plane work is shared by the rows a thread holds (BLOCK_N * CHUNKS / (32 * warps)): 4.3 sm_90
  SASS instructions per code at 4 rows a thread, 3.5 at 8, against 5.5 for the 2^23-offset floats
  before (benchmarks/sass_loop_counts.py). On an H200 that made it 1.05-1.13x faster per layer, the
  4-row tiles still the fastest (benchmarks/int4_gemv_ab.py): not bound by instruction issue alone.
  Steps over several groups (a scale and zero gathered per word) ran ~4x slower there, so the
  tuner's GEMV tiles keep a step inside one group. With PREFETCH each step loads the next step's scale
  and zero (2 and 1 bytes a row: too narrow for the pipelined cp.async copies of the words), so their
  latency is not paid at every step's start. Denormal operands run at full rate in FMA (no
  flush to zero: Triton emits fma.rn.f32).
- `_int4_dot_kernel` (more rows): tensor cores with A and B swapped (out^T = W x^T, as Marlin/Machete
  do for small batches), so the row tile BLOCK_M can be as small as 16 while BLOCK_N (the MMA's M)
  stays 64-128: per step and plane, a [BLOCK_N, 4 * CHUNKS] dequantized tile (x's dtype) times a
  [4 * CHUNKS, BLOCK_M] gather of x^T, accumulated in float32. grid (row tiles, column tiles, SPLIT_K).
Split-K (both): each of SPLIT_K programs along K covers a multiple of the step; with SPLIT_K > 1 they
store float32 partials into a [SPLIT_K, M, N] scratch, which is what fills 132 SMs with a 4096-wide
layer at a few rows. The partials are summed either by one torch.sum afterwards (triton_int8.py), or,
with `serial`, in the kernel: each tile counts its finished slices in an int32 counter (triton_int8.
split_locks) and the last one sums all partials in slice order (deterministic) and writes the output,
which saves a launch per layer (about 2 us in a CUDA graph, ~128 per decode step of an 8B model).
A third kernel, triton_int4_tc.py (config kernel="tc"), joins the 8 planes into one tile and does a
step in one dot; with dequant="asm" it unpacks two codes per instruction (inline PTX), about half the
instructions per code of the GEMV, so it is the candidate meant for decode at 1-16 rows as well as, not
swapped and with big tiles, for 64 rows and more. A fourth, triton_int4_mma.py (config kernel="mma"),
folds the zero point and scale out of the per-code work (the MMA operand is the 16-bit float 128 + q
built by integer ops) and, with layout="pairs", unpacks in the wgmma operand's registers, two codes per
LOP3 (mma_candidates, every row bucket). A fifth, triton_int4_dp4a.py (config kernel="dp4a", 1-2 rows, CUDA and
16-bit x), is the GEMV on integer dot products: x as two int8 limbs a step, four dp4a a word of 8 codes, about
half the GEMV's instructions a code. Which kernel and config a shape gets is measured on
the device (tuning.pick, over candidates(); the shape heuristic is the first candidate, and the one
used off CUDA or during graph capture). Nothing reads device values
on the host, so the launches can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.pdl import launch_options, pdl_enabled, release, wait_for_inputs
from . import tuning
from .dequant_mm import int4_dequant_matmul, with_dequant
from .int4 import KERNEL_CHUNK, pack_int4_kernel
from .int4_layout import _step_words, layout_args
from .triton_int8 import (_gemv_store, _store_tile, _tile, gemv_result, gemv_split_k, mm_block_m, num_sms,
                          split_for_waves, split_outputs, split_variants, tune_bucket)

GEMV_MAX_ROWS = 2  # above this, the CUDA-core FMAs per weight (one per row) outrun the memory


@triton.jit
def _halves(w):
    """The words w with the float 2^23's exponent bits OR-ed in, for planes 0-3 (w) and 4-7 (w >> 16):
    once per word, so that each plane is then one AND with a single immediate (`_plane`)."""
    return w | 0x4B000000, (w >> 16) | 0x4B000000


@triton.jit
def _plane(w_lo, w_hi, I: tl.constexpr):
    """Nibble plane I of the words (w_lo, w_hi = _halves(w)) as float32 2^23 + q * 16^(I % 4), exact.
    (An AND keeping the exponent bits and the nibble: one LOP3 with one immediate. A mask-then-OR
    with two immediates makes ptxas rematerialize one constant per code.)"""
    if I < 4:
        src = w_lo
    else:
        src = w_hi
    return (src & (0x4B000000 | (15 << (4 * (I % 4))))).to(tl.float32, bitcast=True)


@triton.jit
def _group_params(s_ptr, z_ptr, s_rows, mask_n, kc, mask, k0, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Scale and zero (float32) of the step's codes: [BLOCK_N, 1] when the step lies in one group, else
    [BLOCK_N, WORDS] (the group of each word's chunk)."""
    if ONE_GROUP:
        g = k0 // GROUP
        scale = tl.load(s_ptr + s_rows + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(z_ptr + s_rows + g, mask=mask_n, other=0).to(tl.float32)[:, None]
    else:
        g = (kc // GROUP)[None, :]
        scale = tl.load(s_ptr + s_rows[:, None] + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + s_rows[:, None] + g, mask=mask, other=0).to(tl.float32)
    return scale, zero


@triton.jit
def _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k_next, K, GROUP: tl.constexpr):
    """The raw scale and zero [BLOCK_N] of the group holding feature k_next (clamped to the last group: a slice's
    last step, or an empty slice, asks past K), loaded a step before their use (PREFETCH, in the GEMV and the tc
    kernel)."""
    g = tl.minimum(k_next // GROUP, K // GROUP - 1)
    return tl.load(s_ptr + s_rows + g, mask=mask_n, other=0.0), tl.load(z_ptr + s_rows + g, mask=mask_n, other=0)


# The GEMV's planes are float32 denormals: a nibble under no exponent bits is q * 2^SHIFT * 2^-149 exactly,
# so one AND makes a code a float with no offset to subtract. x is scaled by 2^(DENORMAL_E - SHIFT) per
# plane (exact), so every product is q * x * 2^(DENORMAL_E - 149), a normal float for |x| >= 2^-67, and x
# overflows only from |x| >= 2^38.
DENORMAL_E = tl.constexpr(90)


@triton.jit
def _denormal_term(w, w8, x, I: tl.constexpr, E: tl.constexpr):
    """Plane I's codes q times x, as q * x * 2^(E - 149): the nibbles of the words w (w8 = w >> 8) as the
    float32 denormals q * 2^SHIFT * 2^-149 (exact: one AND), times x * 2^(E - SHIFT) (exact).
    Planes 0-5 lie in the mantissa bits of w (SHIFT 4I), planes 6-7 in those of w8 (4I - 8)."""
    if I < 6:
        term = (w & (15 << (4 * I))).to(tl.float32, bitcast=True) * (x * (2.0 ** (E - 4 * I)))[None, :]
    else:
        term = (w8 & (15 << (4 * I - 8))).to(tl.float32, bitcast=True) * (x * (2.0 ** (E - 4 * I + 8)))[None, :]
    return term


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, N, K, k_per_split, split_k,
                      stride_xm, stride_wn, stride_ws, stride_sn, stride_os, stride_om, RUN: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, ONE_GROUP: tl.constexpr,
                      EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    WORDS: tl.constexpr = 4 * CHUNKS
    E: tl.constexpr = DENORMAL_E
    m, pid_n, pid_k, offs_n, mask_n, k_start, k_end = _gemv_program(N, K, k_per_split, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    col_k = 32 * (offs_w // 4) + offs_w % 4  # plane 0's feature of each word column, from the step start
    wait_for_inputs(PDL)  # programmatic dependent launch (engine.kernels.pdl)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = offs_n.to(tl.int64) * stride_sn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    if PREFETCH:  # the first step's scale and zero
        s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k_start, K, GROUP)
    for k0 in tl.range(k_start, k_end, 32 * CHUNKS, num_stages=STAGES):
        kc = k0 + col_k
        if EVEN_K:  # every step whole: masks constant along K, so loads stay 16-byte vectors
            mask_k = tl.full([WORDS], 1, tl.int1)
        else:  # whole chunks: K and every split bound are multiples of 32
            mask_k = kc < k_end
        mask = mask_n[:, None] & mask_k[None, :]
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        w = tl.load(w_rows + _step_words(kw, offs_w, stride_ws, RUN, 4)[None, :], mask=mask, other=0)
        if PREFETCH:  # this step's, loaded a step ago; then the next step's
            scale, zero = s_next.to(tl.float32)[:, None], z_next.to(tl.float32)[:, None]
            s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k0 + 32 * CHUNKS, K, GROUP)
        else:
            scale, zero = _group_params(s_ptr, z_ptr, s_rows, mask_n, kc, mask, k0, GROUP, ONE_GROUP)
        w8 = w >> 8
        part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)  # sum of q * x, in units of 2^(149 - E)
        x_sum = tl.zeros([WORDS], dtype=tl.float32)  # sum of the x a word column meets, for the zero point
        for i in tl.static_range(8):
            xk = tl.max_contiguous(tl.multiple_of(kc + 4 * i, 4), 4)  # runs of 4 features
            x = tl.load(x_row + xk, mask=mask_k, other=0.0).to(tl.float32)
            x_sum += x
            part += _denormal_term(w, w8, x, i, E)
        # sum (q - zero) * x = sum q * x - zero * sum x
        acc += (part - zero * (x_sum * (2.0 ** (E - 149)))[None, :]) * scale
    release(PDL)
    _gemv_store(tl.sum(acc, 1) * (2.0 ** (149 - E)), out_ptr, res_ptr, lock_ptr, m, pid_n, pid_k, offs_n, mask_n,
                split_k, stride_os, stride_om, SERIAL)


@triton.jit
def _gemv_program(N, K, k_per_split, BLOCK_N: tl.constexpr):
    """A GEMV program's place in its grid (M, cdiv(N, BLOCK_N), SPLIT_K): (row m, pid_n, pid_k, its columns and
    their mask, its K slice [k_start, k_end))."""
    pid_k = tl.program_id(2)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    return (tl.program_id(0), tl.program_id(1), pid_k, offs_n, offs_n < N, k_start,
            tl.minimum(k_start + k_per_split, K))


@triton.jit
def _int4_dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                     stride_xm, stride_wn, stride_ws, stride_sn, stride_os, stride_om, RUN: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                     ONE_GROUP: tl.constexpr, EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr,
                     PRECISION: tl.constexpr):
    WORDS: tl.constexpr = 4 * CHUNKS
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    col_k = 32 * (offs_w // 4) + offs_w % 4
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = offs_n.to(tl.int64) * stride_sn
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm  # x^T: features down, rows across
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, 32 * CHUNKS, num_stages=STAGES):
        kc = k0 + col_k
        if EVEN_K:
            mask_k = tl.full([WORDS], 1, tl.int1)
        else:
            mask_k = kc < k_end
        mask = mask_n[:, None] & mask_k[None, :]
        kw = tl.multiple_of(k0 // 8, 4)  # steps start on whole chunks: 16-byte aligned words
        w = tl.load(w_rows + _step_words(kw, offs_w, stride_ws, RUN, 4)[None, :], mask=mask, other=0)
        scale, zero = _group_params(s_ptr, z_ptr, s_rows, mask_n, kc, mask, k0, GROUP, ONE_GROUP)
        w_lo, w_hi = _halves(w)
        mask_x = mask_k[:, None] & mask_m[None, :]
        for i in tl.static_range(8):
            xk = tl.max_contiguous(tl.multiple_of(kc + 4 * i, 4), 4)
            xt = tl.load(x_cols + xk[:, None], mask=mask_x, other=0.0)
            step = 1 << (4 * (i % 4))
            wd = (_plane(w_lo, w_hi, i) - (zero * step + 8388608.0)) * (scale * (1.0 / step))
            acc = tl.dot(wd.to(xt.dtype), xt, acc, input_precision=PRECISION)
    # acc[n, m] is out[m, n]; split_k > 1: out_ptr is a float32 [split_k, M, N] scratch (as the GEMV's).
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=True, SERIAL=SERIAL)


# ----- launch configs -----------------------------------------------------------------------------
def _chunks_ok(chunks: int, group_size: int) -> bool:
    """A step of `chunks` chunks lies in one group, or holds whole groups (both powers of two here)."""
    step = KERNEL_CHUNK * chunks
    return group_size % step == 0 or step % group_size == 0


def gemv_config(m: int, n: int, k: int, sms: int, block_n: int = 128, chunks: int = 4, num_warps: int = 4,
                num_stages: int = 3) -> dict:
    """The GEMV's config for a shape: split-K so that rows x column blocks x slices make ~4 waves.
    128 rows x 16 words over 128 threads puts 4 rows in a thread, so each x value it scales serves 4."""
    split = gemv_split_k(m, triton.cdiv(n, block_n), triton.cdiv(k, KERNEL_CHUNK * chunks), sms)
    return dict(gemv=True, block_n=block_n, chunks=chunks, split_k=split, num_warps=num_warps, num_stages=num_stages)


def dot_config(m: int, n: int, k: int, sms: int, block_n: int | None = None, chunks: int = 4,
               num_warps: int | None = None, num_stages: int = 3) -> dict:
    """The tl.dot kernel's config: row tile by m (16..128), column tile 64 (128 above 64 rows), split-K
    up to 2 programs per SM while each slice keeps >= 4 steps."""
    block_m = mm_block_m(m)
    block_n = block_n or (64 if m <= 64 else 128)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = split_for_waves(programs, triton.cdiv(k, KERNEL_CHUNK * chunks), sms, 2, most=8)
    warps = num_warps or (8 if block_n * block_m >= 128 * 64 else 4)
    return dict(gemv=False, block_m=block_m, block_n=block_n, chunks=chunks, split_k=split, num_warps=warps,
                num_stages=num_stages)


def tc_config(m: int, n: int, k: int, sms: int, block_m: int, block_n: int, chunks: int, num_warps: int,
              num_stages: int = 3, swap: bool = True, dequant: str = "scale", waves: int = 2,
              whole_waves: bool = False) -> dict:
    """A config of triton_int4_tc's kernel: split-K by split_for_waves."""
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = split_for_waves(programs, triton.cdiv(k, KERNEL_CHUNK * chunks), sms, waves, whole_waves)
    return dict(gemv=False, kernel="tc", swap=swap, dequant=dequant, block_m=block_m, block_n=block_n, chunks=chunks,
                split_k=split, num_warps=num_warps, num_stages=num_stages)


# GEMV tiles to time at 1-2 rows, (block_n, chunks, warps, stages), the first the heuristic (gemv_config's),
# chunks capped so that a step stays in one group: the ones that won a layer of llama-3.1-8b on an H200
# (int4_gemv_ab_tiles_h200.json; with the step-major layout the 128-row tile with 2 stages won qkv, gate_up
# and down, int4_gemv_ab_stepmajor_tiles_h200.json); what keeps the loads in flight and the FMAs fed on a
# given GPU is found by measuring, not guessed. (Each distinct tile is a Triton compile on a cold cache,
# ~1 s: the lists stay short.)
GEMV_TILES = ((128, 4, 4, 3), (64, 4, 2, 3), (32, 4, 2, 3), (64, 4, 4, 3), (256, 4, 8, 3), (128, 4, 4, 2))
# The one-dot-per-step kernel: (block_m, block_n, chunks, warps, stages, swap). Few rows: swap-AB (rows of
# x are the MMA's N, block_m 16 grows to the row tile), 64-256 weight rows a program (the more rows a
# thread dequantizes per step, the fewer instructions per code: ~2.6 at 256 x 128 with dequant="asm",
# x_natural, counted in sm_90 SASS, against ~6-7 for the GEMV); many rows: plain GEMM tiles of 64-128
# rows x 128-256 columns, K steps of 64-128.
TC_SMALL = ((16, 256, 4, 4, 3, True), (16, 256, 4, 8, 3, True), (16, 128, 4, 4, 3, True), (16, 128, 2, 4, 4, True))
TC_LARGE = ((64, 128, 4, 4, 3, False), (128, 128, 4, 8, 3, False), (128, 128, 2, 8, 4, False),
            (128, 256, 2, 8, 3, False), (128, 128, 4, 8, 4, True))
# Offered only with prefetch: at 64 rows the 64 x 128 tile of 4 warps waits on its own dequantize -> shared
# memory -> wgmma -> wait chain (ncu on the H200: 1.85 active warps a scheduler, an issue every 4.6 cycles,
# 17% of DRAM bandwidth); twice the warps, or half the columns (more programs a multiprocessor), hide more of it.
TC_PREFETCH = ((64, 128, 4, 8, 3, False), (64, 64, 4, 4, 3, False))
# Above 128 rows: swap-AB tiles of all 256 rows (each weight dequantized once a tile; the MMA's N is 256). Swapped,
# the dequantized weights are the MMA's A operand, kept in registers, so the wgmma runs asynchronously
# (wgmma.wait_group 3 inside the loop in Triton 3.6's sm_90 PTX) while the next step dequantizes; the plain tiles
# store them to shared memory, fence and wait for every wgmma (wait_group 0). Both build under Triton 3.6 without
# spills (255 registers, ptxas -v). In an H100's tuning at 256 rows 256 x 64 beat the best plain tile on gate_up and
# the LM head by ~5%, one timing each (quant_kernels_int4_rows256_swap_h100.json): the GEMMs still 0.58x bf16.
TC_ROWS256 = ((256, 128, 2, 8, 3, True), (256, 64, 2, 4, 3, True))


def candidates(m: int, n: int, k: int, group_size: int, sms: int, asm: bool = False) -> list[dict]:
    """Configs tuning.pick times for a shape; the heuristic first. Each distinct tile (and serial on/off)
    is one compile on a cold cache, shared by every shape that times it. asm: the inline-PTX
    dequantization can run (CUDA, 16-bit x); tc tiles whose step lies in one group use it (else the
    exact float32 one), the others dequantize with their scale per code."""
    ok = lambda c: _chunks_ok(c["chunks"], group_size)  # noqa: E731

    def tc(tiles, **kw):
        """Few rows: the scale after each step's dot (one FMA per output, not per code); many rows: the
        scale in the dequantization, so that the dot accumulates in place (no second accumulator)."""
        out = []
        for bm, bn, ch, w, st, sw in tiles:
            one_group = group_size % (KERNEL_CHUNK * ch) == 0
            if asm:
                dequant = "asm" if one_group and m <= 32 else "asm_scaled"
            else:
                dequant = "exact" if one_group and m <= 32 else "scale"
            bm = mm_block_m(m) if sw and bm == 16 else bm
            out.append(dict(tc_config(m, n, k, sms, bm, bn, ch, w, st, sw, dequant, **kw), x_natural=True))
        return out

    if m <= GEMV_MAX_ROWS:
        one_group = lambda ch: min(ch, group_size // KERNEL_CHUNK)  # noqa: E731
        cands = split_variants([gemv_config(m, n, k, sms, block_n=bn, chunks=one_group(ch), num_warps=w,
                                            num_stages=st) for bn, ch, w, st in GEMV_TILES], ok)
        # Each GEMV tile also prefetching the next step's scale and zero: without it, ncu on the H200 puts a quarter
        # of the gate_up tile's stall samples at 1 row on their plain loads and the layout copy waiting on them
        # (ncu_int4_gemv1_h200.log); 1.05-1.10x on four of llama-3.1-8b's five layers at 1 row, the LM head even
        # (int4_gemv_prefetch_ab_h200.json; 4 stages won qkv and gate_up by another ~2% there, not offered: each
        # tile is a compile and a timing per shape). Then the tensor-core kernel, also with 4 programs per SM.
        # With asm (CUDA, 16-bit x) also the integer-dot GEMV (triton_int4_dp4a: x as two int8 limbs).
        return (cands + [dict(c, prefetch=True) for c in cands]
                + _serial_when_split(tc(TC_SMALL) + tc(TC_SMALL[:2], waves=4), ok)
                + _mma_candidates(m, n, k, group_size, sms, asm) + (_dp4a_candidates(m, n, k, group_size, sms)
                                                                    if asm else []))
    # chunks=8 with 128-row tiles holds 3 stages in 232 KB of shared memory under Triton 3.9 and not under 3.6
    # (237,568 bytes on the H200): 2 stages there
    cands = [dot_config(m, n, k, sms), dot_config(m, n, k, sms, block_n=128 if m <= 64 else 64),
             dot_config(m, n, k, sms, chunks=8, num_stages=2 if mm_block_m(m) >= 128 else 3)]
    if m > 128:  # all rows in one tile: each weight dequantized once (the MMA's N goes up to 256)
        cands.append(dict(dot_config(m, n, k, sms, block_n=64, num_warps=8), block_m=256))
    if m <= 32:
        extra = tc(TC_SMALL) + tc(TC_SMALL[:1], waves=4)
    else:
        extra = tc(TC_SMALL[:2] if m <= 64 else ()) + tc(TC_LARGE)
        if m > 64:  # prefill-sized: the big tiles without split-K too (no scratch round trip)
            extra += [dict(c, split_k=1) for c in tc(TC_LARGE[:2])]
        # The tiles that won at 64 rows on the H200 also prefetching the next step's scale and zero (steps inside
        # one group), which won 4 of the 5 layers there by 1-4% in two runs' tuning
        # (quant_kernels_int4_prefetch_h200.json, _run2), and TC_PREFETCH's tiles with it. Every tile also with x
        # permuted before the launch (x_perm: its tile copied straight into the MMA operand, no permutation through
        # shared memory a step): the first two won 4 of 5 layers at 64 rows and the LM head at 256, up to 27%
        # (LM head at 64 rows 225.4 against 307.8 us; quant_kernels_int4_xperm_h200.json); offered on every tile,
        # x_perm won every layer at 64 rows and gate_up / LM head at 256 (quant_kernels_int4_xperm_all_h200.json).
        one_group = lambda c: group_size % (KERNEL_CHUNK * c["chunks"]) == 0  # noqa: E731
        extra += [dict(c, prefetch=True) for c in tc(TC_LARGE[:2] + TC_PREFETCH) if one_group(c)]
        # At up to 64 rows each x_perm tile also at the split that fits whole waves (split_for_waves).
        # Above 128 rows also the swapped tiles of all rows (TC_ROWS256).
        whole = tc(TC_LARGE + TC_PREFETCH, whole_waves=True) if m <= 64 else []
        rows256 = tc(TC_ROWS256) if m > 128 else []
        permuted = [dict(c, prefetch=one_group(c), x_natural=False, x_perm=True)
                    for c in tc(TC_LARGE + TC_PREFETCH) + whole + rows256]
        extra += permuted + ([dict(c, split_k=1) for c in permuted[:2]] if m > 64 else [])
    return with_dequant(m, split_variants(cands, ok) + _serial_when_split(extra, ok)
                        + _mma_candidates(m, n, k, group_size, sms, asm), "int4")


def _mma_candidates(m: int, n: int, k: int, group_size: int, sms: int, asm: bool) -> list[dict]:
    from .triton_int4_mma import mma_candidates  # (imported here: triton_int4_mma imports this module)
    return mma_candidates(m, n, k, group_size, sms, asm)


def _dp4a_candidates(m: int, n: int, k: int, group_size: int, sms: int) -> list[dict]:
    from .triton_int4_dp4a import dp4a_candidates  # (imported here: triton_int4_dp4a imports this module)
    return dp4a_candidates(m, n, k, group_size, sms)


def _serial_when_split(cands: list[dict], ok) -> list[dict]:
    """Each candidate once, reducing its split-K partials in the kernel when it splits."""
    out = [dict(c, serial=True) if c["split_k"] > 1 else c for c in cands if ok(c)]
    return [c for i, c in enumerate(out) if c not in out[:i]]


def asm_supported(x: torch.Tensor) -> bool:
    """Whether dequant="asm" (packed bf16x2 / f16x2 PTX, sm_80+) can run on x's device and dtype."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int = 128, x_ordered: bool = False, **config) -> torch.Tensor:
    """x [M, K] @ dequant(packed [N, K/8] int32, scales, zeros)^T -> [M, N] in x's dtype.

    `packed` is the kernel layout (Int4Linear.packed); a uint8 [N, K/2] qweight in the format's order
    is packed first (tests, one-off calls). With no config, tuned_config's (tuning.pick measured it fastest
    for (rows bucket, N, K) on CUDA, else the heuristic); config keys (gemv, block_m, block_n, chunks,
    split_k, num_warps, num_stages) force one (tests, benchmarks). x_ordered: x is already in the column
    order the config's kernel reads (x[:, x_order(config, K)], written so by the kernel that produced it),
    so the launch does not permute it.
    """
    if packed.dtype == torch.uint8:
        packed = pack_int4_kernel(packed)
    layout_args(packed)  # raises, naming the layout it needs, on any other
    m, k = x.shape
    n = packed.shape[0]
    if packed[0].numel() * 8 != k or k % group_size != 0 or group_size % KERNEL_CHUNK != 0:
        raise ValueError(f"int4_matmul: x has {k} features but the weight holds {packed[0].numel() * 8}, in groups "
                         f"of {group_size} (the kernels need group_size % {KERNEL_CHUNK} == 0 and K % group_size == 0)")
    if scales.stride() != zeros.stride():
        raise ValueError("int4_matmul needs scales and zeros with the same strides")
    if x.stride(1) != 1:
        x = x.contiguous()
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    config = config or tuned_config(m, x.dtype, x.device, packed, scales, zeros, group_size, lambda: x, x_ordered)
    return _launch(x, packed, scales, zeros, group_size, **config, x_ordered=x_ordered)


def tuned_config(m: int, dtype: torch.dtype, device: torch.device, packed: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, make_x, x_ordered: bool = False) -> dict:
    """The config int4_matmul runs m rows of x (dtype, on device) with: tuning.pick's for the shape, which on
    CUDA times the candidates the first time (on make_x()'s rows), else the shape heuristic. x_ordered: for x
    that its producer stores in the chosen kernel's order, a key of its own, whose candidates are timed without
    the permuting copy (_ordered_launch)."""
    k, n = packed[0].numel() * 8, packed.shape[0]
    key = tuning_key(m, n, k, group_size, dtype, x_ordered)
    if key in tuning.chosen:  # every call after the first: no candidate list, no closures
        return tuning.chosen[key]

    def copies():
        x = make_x()
        return [(x, packed if i == 0 else packed.clone(), scales, zeros, group_size)
                for i in range(tuning.weight_copies(packed.numel() * 4))]
    cands = lambda: candidates(m, n, k, group_size, num_sms(device),  # noqa: E731 (built if untuned)
                               asm=asm_supported(torch.empty(0, dtype=dtype, device=device)))
    launch = _ordered_launch() if x_ordered else lambda c, *a: _launch(*a, **c)
    return tuning.pick(key, cands, launch, copies, device)


def _ordered_launch():
    """launch(config, x, ...) for tuning.pick under an x_ordered key: each candidate reads x[:, x_order(config)],
    permuted once before its timing, or the dp4a GEMV x's Limbs, made once (in the engine its producer stores x
    so), so that what is timed is the kernel alone, and every candidate multiplies the same x."""
    permuted = {}

    def launch(config, x, *args):
        if config.get("kernel") == "dp4a":
            from .triton_int4_dp4a import x_limbs
            key = (id(x), "limbs", config.get("chunks", 4))
            if key not in permuted:
                permuted[key] = x, x_limbs(x, key[2])
            return _launch(permuted[key][1], *args, **config)
        kind = x_order_kind(config)
        if kind is not None:
            if (id(x), kind) not in permuted:  # (the candidate's first launch, outside any capture)
                permuted[id(x), kind] = x, x[:, x_order(config, x.shape[1]).to(x.device)]
            x = permuted[id(x), kind][1]
        return _launch(x, *args, **config, x_ordered=True)
    return launch


def tuning_key(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, x_ordered: bool = False) -> tuple:
    """The key tuning.pick keeps the config for m rows of x (dtype) times an [n, k] int4 weight under (x_ordered:
    tuned_config's)."""
    key = ("int4", tune_bucket(m), n, k, group_size, dtype)
    return key + ("x_ordered",) if x_ordered else key


def x_order_kind(config: dict) -> tuple | None:
    """What x_order(config, K) depends on besides K; None for the kernels that read x as it is."""
    if not config.get("x_perm"):
        return None
    return ("pairs", config["block_k"]) if config.get("kernel") == "mma" else ("tc",)


def x_order(config: dict, k: int) -> torch.Tensor | None:
    """The input feature at each column of x as config's kernel reads it (int64 [K], on the CPU): the x_perm
    kernels read x[:, x_order] (permute_x, permute_pairs_x), the others x as it is (None)."""
    kind = x_order_kind(config)
    if kind is None:
        return None
    features = torch.arange(k).view(1, k)
    if kind[0] == "pairs":
        from .triton_int4_mma import permute_pairs_x
        return permute_pairs_x(features, kind[1] // KERNEL_CHUNK)[0]
    from .triton_int4_tc import permute_x
    return permute_x(features)[0]


def _launch(x, packed, scales, zeros, group_size, *, gemv=None, block_m=None, block_n=None, chunks=4, split_k=None,
            num_warps=None, num_stages=None, serial=False, kernel=None, swap=True, dequant="scale", x_natural=False,
            block_k=None, fold=True, layout="tile", asm=False, pdl=None, prefetch=False, x_perm=False,
            x_ordered=False):
    """kernel="tc": triton_int4_tc's one-dot-per-step kernel (swap: its orientation; dequant: "scale",
    the codes dequantized with their scale, "exact": q - zero with the scale after the dot, "asm": the
    same by inline PTX, "asm_scaled": the scale applied by the PTX too (the dot accumulates in place;
    any group), both CUDA and 16-bit x only; x_natural: x loaded in feature order and permuted in
    registers, not gathered; x_perm: x permuted into the tile's column order by triton_int4_tc.permute_x before
    the launch, then copied straight into the MMA operand; with kernel="mma", _launch_mma's x_perm); else the
    GEMV (gemv, the default for m <= GEMV_MAX_ROWS) or the per-plane tl.dot kernel. prefetch (tc kernel, GEMV and
    the mma "pairs" tiles, steps inside one group): each step loads the next step's group scale and zero. pdl: the
    GEMV's programmatic dependent launch (engine.kernels.pdl; None: its default). x_ordered: x is already in the
    order the kernel reads (x_order), so x_perm permutes nothing."""
    if kernel == "dp4a":  # (x may be its Limbs)
        from .triton_int4_dp4a import _launch_dp4a
        return _launch_dp4a(x, packed, scales, zeros, group_size, block_n=block_n or 128, chunks=chunks,
                            split_k=split_k or 1, num_warps=num_warps or 4, num_stages=num_stages or 3, serial=serial,
                            pdl=pdl)
    m, k = x.shape
    n = packed.shape[0]
    if kernel == "dequant":
        return int4_dequant_matmul(x, packed, scales, zeros, group_size, block_n or 32, chunks)
    if kernel == "mma":
        from .triton_int4_mma import _launch_mma
        return _launch_mma(x, packed, scales, zeros, group_size, block_m=block_m, block_n=block_n, block_k=block_k,
                           split_k=split_k, num_warps=num_warps, num_stages=num_stages, serial=serial, swap=swap,
                           fold=fold, layout=layout, asm=asm, x_perm=x_perm, prefetch=prefetch,
                           x_ordered=x_ordered)
    if kernel not in (None, "tc"):
        raise ValueError(f"kernel={kernel!r}: expected None, 'tc', 'mma', 'dp4a' or 'dequant'")
    if gemv is None:
        gemv = m <= GEMV_MAX_ROWS and kernel is None
    if gemv and kernel is not None:
        raise ValueError("gemv=True and kernel='tc' exclude each other")
    step = KERNEL_CHUNK * chunks
    if not _chunks_ok(chunks, group_size) or (not gemv and chunks < 4 and kernel is None) or chunks < 1:
        raise ValueError(f"chunks={chunks} ({step} features a step) does not tile groups of {group_size} "
                         "(or is below the tl.dot kernel's 4)")
    if kernel == "tc":
        from .triton_int4_tc import DEQUANT_MODES
        if dequant not in DEQUANT_MODES:
            raise ValueError(f"dequant={dequant!r}: expected one of {sorted(DEQUANT_MODES)}")
        if dequant in ("exact", "asm") and group_size % step:
            raise ValueError(f"dequant={dequant!r} needs steps inside one group ({step} features, group {group_size})")
        if dequant.startswith("asm") and not asm_supported(x):
            raise ValueError("dequant='asm' runs on CUDA (sm_80+) with float16 / bfloat16 x only")
    if x_perm and (kernel != "tc" or x_natural):
        raise ValueError("x_perm=True is for the tc kernel, without x_natural (x is loaded either way, not both)")
    if prefetch and (not (kernel == "tc" or gemv) or group_size % step):
        raise ValueError(f"prefetch=True is for the tc kernel and the GEMV with steps inside one group ({step} "
                         f"features, group {group_size})")
    sms = num_sms(x.device)
    default = gemv_config(m, n, k, sms) if gemv else dot_config(m, n, k, sms, block_n=block_n, chunks=chunks)
    block_n = block_n or default["block_n"]
    block_m = 1 if gemv else block_m or default["block_m"]
    split_k = split_k or default["split_k"]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), step) * step
    grid, out, split_stride, locks, res = split_outputs(x.device, m, n, block_m, block_n, split_k, serial, x.dtype)
    stages = (num_stages or 3) if x.is_cuda else 1
    args = (x, packed, scales, zeros, out, res, out if locks is None else locks)
    stride_wn, stride_ws, run = layout_args(packed)
    common = (stride_wn, stride_ws, scales.stride(0), split_stride, out.stride(-2))
    flags = dict(RUN=run, GROUP=group_size, BLOCK_N=block_n, CHUNKS=chunks, ONE_GROUP=group_size % step == 0,
                 EVEN_K=k % step == 0,  # then every slice is whole steps too (k_per_split is a multiple of step)
                 SERIAL=locks is not None, STAGES=stages)
    if kernel == "tc":
        from .triton_int4_tc import DEQUANT_MODES, _int4_tc_kernel, permute_x
        xk = permute_x(x) if x_perm and not x_ordered else x
        _int4_tc_kernel[grid](xk, *args[1:], m, n, k, k_per_split, split_k, xk.stride(0), *common,
                              BLOCK_M=block_m, **flags, SWAP=swap, DEQUANT=DEQUANT_MODES[dequant],
                              XNAT=x_natural, PREFETCH=prefetch, XPERM=x_perm,
                              PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                              num_warps=num_warps or default["num_warps"])
    elif gemv:
        pdl = pdl_enabled(x.device, pdl)
        _int4_gemv_kernel[grid](*args, n, k, k_per_split, split_k, x.stride(0), *common,
                                **flags, PDL=pdl, PREFETCH=prefetch, num_warps=num_warps or 4,
                                **launch_options(pdl))
    else:
        _int4_dot_kernel[grid](*args, m, n, k, k_per_split, split_k, x.stride(0), *common,
                               BLOCK_M=block_m, **flags, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               num_warps=num_warps or default["num_warps"])
    return res if locks is not None else gemv_result(out, x.dtype)
