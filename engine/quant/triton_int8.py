"""Triton kernels: out = x @ (q * scale)^T for int8 per-channel weights, dequantized in registers.

Reference: `int8_linear_reference` in int8.py.

Layouts:
    x:     [M, K] float16 / bfloat16 / float32, K contiguous
    q:     [N, K] int8, K contiguous (one row per output channel)
    scale: [N] float32
    out:   [M, N] in x's dtype
Two kernels, picked by the number of rows M:
- `_int8_gemv_kernel` (M <= GEMV_MAX_ROWS, decode): grid (M, cdiv(N, BLOCK_N), SPLIT_K). A program
  owns BLOCK_N output channels of one row and a 1/SPLIT_K slice of K; it accumulates w * x
  elementwise in a [BLOCK_N, BLOCK_K] float32 tile and reduces once at the end. The row index is the
  fastest grid axis, so the programs of all rows that read one weight tile run together and the
  tile comes from DRAM once. With SPLIT_K > 1 each slice stores float32 partial sums into a
  [SPLIT_K, M, N] scratch that one torch.sum reduces and casts, or (serial) the tile's last slice
  sums them in the kernel (_serial_split_reduce, split_locks): that is what lets a 4096-wide layer
  fill 132 SMs. The K loop is software-pipelined (STAGES); when K is a multiple of BLOCK_K (EVEN_K)
  the loads carry no K mask, so they stay 16-byte vectors.
- `_int8_mm_kernel` (more rows, prefill and large batches): a tiled tl.dot with A and B swapped
  (acc[n, m] = W x^T: the converted weight tile is the MMA's register operand, the rows of x its N,
  16 at the least), or (SWAP off, GEMM_TILES: 64-128 rows) a plain GEMM, x the A operand and the
  converted tile the B; the weight tile converted to x's dtype (int8 values are exact in bf16/fp16);
  grid (row tiles, column tiles, SPLIT_K) with split-K partials reduced like the GEMV's, its config
  measured per shape and row tile on the device (mm_candidates).
int8 -> float uses the exponent trick (bits 0x4B000000 + 128 + q are the float 2^23 + 128 + q), an
integer add and a float subtract, instead of the slow int-to-float conversion unit.
triton_int8_words.py holds a third, decode-only kernel (config kernel="words"): the GEMV reading the
weight as 32-bit words, each code a float32 denormal by one AND. triton_int8_mma.py (config
kernel="mma", any rows, K % 128 == 0) multiplies in float16 with the codes as 1152 + q, two per byte
permute, unpacked in the MMA operand's registers (bfloat16 x scaled into float16 by 2^-4;
mma8_candidates). Which kernel, tile, split and pipelining a shape gets is measured on the device
(tuning.py). triton_int8_limbs.py (config kernel="limbs", from 17 rows, CUDA) multiplies on int8 tensor
cores, the activations as two int8 limbs per token (a 15-bit fixed point of each token's range).
Nothing reads device values on the host, so the launches can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..kernels.pdl import launch_options, pdl_enabled
from . import tuning
from .dequant_mm import int8_dequant_matmul, with_dequant

GEMV_MAX_ROWS = 2


@triton.jit
def _int8_to_float(q):
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


# Four int8 codes of one 32-bit register ($4) to the floats 2^23 + (code ^ 0x80) = 2^23 + 128 + q ($0..$3):
# XOR the sign bits once, then one byte permute per code puts it under the exponent bits of 2^23
# (bytes 4-7 of the permute's source are the constant 0x4B000000; selector 0x765i: byte i, 0x00, 0x00, 0x4B).
_INT8_BYTES_PTX = tl.constexpr("{\n.reg .b32 t, m;\nxor.b32 t, $4, 0x80808080;\nmov.b32 m, 0x4B000000;\n"
                               "prmt.b32 $0, t, m, 0x7650;\nprmt.b32 $1, t, m, 0x7651;\n"
                               "prmt.b32 $2, t, m, 0x7652;\nprmt.b32 $3, t, m, 0x7653;\n}")


@triton.jit
def _int8_to_float_asm(q):
    """_int8_to_float by inline PTX, four codes a register: one PRMT and one subtract per code (CUDA)."""
    return tl.inline_asm_elementwise(_INT8_BYTES_PTX, "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=True,
                                     pack=4) - 8388736.0


@triton.jit
def _tile(M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dequantizing GEMMs' program coordinates on a (row tiles, column tiles, K slices) grid: (pid_m,
    pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end), the slice covering [k_start, k_end)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    return pid_m, pid_n, pid_k, offs_m, offs_n, offs_m < M, offs_n < N, k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr, tile,
                split_k, SWAPPED: tl.constexpr, SERIAL: tl.constexpr):
    """The dequantizing GEMMs' epilogue: store the tile (acc [BLOCK_N, BLOCK_M] when SWAPPED, the swap-AB
    kernels' out^T, else [BLOCK_M, BLOCK_N]) at out_ptr + pid_k * stride_os (split_k > 1: a float32
    [split_k, M, N] scratch, each slice writing its partial), then, SERIAL, sum the tile's partials into
    res_ptr (_serial_split_reduce; `tile` numbers the output tile for its counter)."""
    if SWAPPED:
        offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        mask = mask_n[:, None] & mask_m[None, :]
    else:
        offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if SERIAL:
        _serial_split_reduce(out_ptr, stride_os, offs, mask, res_ptr, offs, lock_ptr, tile, split_k)


@triton.jit
def _serial_split_reduce(part_ptr, stride_ps, offs, mask, res_ptr, res_offs, lock_ptr, tile, split_k):
    """After this program stored its K slice's partial at part_ptr + pid_k * stride_ps + offs: count the
    tile's arrivals; the last slice to arrive sums all partials (in slice order: deterministic) into
    res_ptr + res_offs in res's dtype and resets the counter for the next launch."""
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
    if count == split_k - 1:
        total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        for s in range(1, split_k):
            total += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(res_ptr + res_offs, total.to(res_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def _gemv_store(out, out_ptr, res_ptr, lock_ptr, m, pid_n, pid_k, offs_n, mask_n, split_k, stride_os, stride_om,
                SERIAL: tl.constexpr):
    """A GEMV program's result `out` [BLOCK_N]: with split_k > 1 out_ptr is a float32 [split_k, M, N] scratch (every
    slice writes, empty ones zeros), reduced by the tile's last slice into res_ptr [M, N] (SERIAL) or by a
    torch.sum afterwards."""
    offs = m.to(tl.int64) * stride_om + offs_n
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs, out.to(out_ptr.dtype.element_ty), mask=mask_n)
    if SERIAL:
        _serial_split_reduce(out_ptr, stride_os, offs, mask_n, res_ptr, offs, lock_ptr,
                             m * tl.num_programs(1) + pid_n, split_k)


@triton.jit
def _k_step(k0, k_end, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The features of the K step starting at k0 (steps start on whole tiles) and their mask: constant with EVEN_K,
    so that the loads stay 16-byte vectors."""
    offs_k = tl.multiple_of(k0, BLOCK_K) + tl.arange(0, BLOCK_K)
    if EVEN_K:
        mask_k = tl.full([BLOCK_K], 1, tl.int1)
    else:
        mask_k = offs_k < k_end
    return offs_k, mask_k


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, res_ptr, lock_ptr, N, K, split_k, stride_xm, stride_wn, stride_os,
                      stride_om, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      SERIAL: tl.constexpr, STAGES: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        offs_k, mask_k = _k_step(k0, k_end, BLOCK_K, EVEN_K)
        x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc += _int8_to_float(w) * x[None, :]
    out = tl.sum(acc, 1) * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    _gemv_store(out, out_ptr, res_ptr, lock_ptr, m, pid_n, pid_k, offs_n, mask_n, split_k, stride_os, stride_om, SERIAL)


@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, res_ptr, lock_ptr, M, N, K, split_k, stride_xm, stride_wn,
                    stride_os, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, SERIAL: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr,
                    SWAP: tl.constexpr, ASM: tl.constexpr):
    """SWAP: A and B swapped (acc[n, m] = W x^T): the converted weight tile is the MMA's register operand
    and a few rows of x its 16-wide N, as in triton_int4's tl.dot kernel. Not SWAP (many rows): a plain
    GEMM, acc[m, n] = x W^T with the converted tile transposed into the B operand. Either way the
    per-channel scale is applied once, in the epilogue (int8 values are exact in 16-bit floats)."""
    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    pid_m, pid_n, pid_k, offs_m, offs_n, mask_m, mask_n, k_start, k_end = \
        _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        offs_k = tl.multiple_of(k0, BLOCK_K) + tl.arange(0, BLOCK_K)  # steps start on whole tiles
        if EVEN_K:
            mask_k = tl.full([BLOCK_K], 1, tl.int1)
        else:
            mask_k = offs_k < k_end
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        if ASM:  # ASM: the packed byte permute (CUDA); the converted tile in x's dtype, exact
            wf = _int8_to_float_asm(w).to(x_ptr.dtype.element_ty)
        else:
            wf = _int8_to_float(w).to(x_ptr.dtype.element_ty)
        if SWAP:
            xt = tl.load(x_cols + offs_k[:, None], mask=mask_k[:, None] & mask_m[None, :], other=0.0)
            acc = tl.dot(wf, xt, acc, input_precision=PRECISION)
        else:
            xs = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(xs, tl.trans(wf), acc, input_precision=PRECISION)
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
    # split_k > 1: out_ptr is a float32 [split_k, M, N] scratch, summed as the GEMV's.
    if SWAP:
        acc = acc * scale[:, None]
    else:
        acc = acc * scale[None, :]
    _store_tile(out_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_om, stride_os, pid_k, res_ptr, lock_ptr,
                pid_m * tl.num_programs(1) + pid_n, split_k, SWAPPED=SWAP, SERIAL=SERIAL)


def mm_block_m(m: int) -> int:
    """The row tile of a tl.dot kernel for m rows (also the bucket its tuned config is kept under)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


def mm_bucket(m: int) -> int:
    """The row-count bucket a tuned tl.dot config is kept under: m rounded up to a power of two, all
    m > 256 (prefill chunks) in one bucket apart from the decode batch sizes."""
    return min(triton.next_power_of_2(m), 512)


def tune_bucket(m: int) -> int:
    """The rows a tuned config is kept under: m itself up to 2 (GEMV), then the row tile (16, 32, 64, 128:
    every m of a tile launches the same grid), then 256 and 512 (all prefill chunks)."""
    return m if m <= 2 else mm_block_m(m) if m <= 128 else mm_bucket(m)


def mm_candidates(m: int, n: int, k_tiles: int, sms: int, tile_k: str | None = None,
                  tile_k_values: tuple = ()) -> list[dict]:
    """Launch configs of a tl.dot kernel to time for m rows: the shape heuristic first, then column tiles
    x split-K (enough programs to fill the GPU when m rows give few row tiles; split_variants) x warps.
    k_tiles: the K loop's trip count at the smallest K tile (split-K keeps >= 4 per slice); tile_k /
    tile_k_values: an extra K-tile key to vary (int8's block_k). Each tile also at the split that fits whole
    waves (split_for_waves), where that differs."""
    block_m = mm_block_m(m)
    cands, whole = [], []
    for block_n, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3)):
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        for tk in tile_k_values or (None,):
            cfg = dict(gemv=False, block_n=block_n, split_k=split_for_waves(programs, k_tiles, sms, most=8),
                       num_warps=warps, num_stages=stages)
            if tk is not None:
                cfg[tile_k] = tk
            cands.append(cfg)
            whole.append(dict(cfg, split_k=split_for_waves(programs, k_tiles, sms, whole_waves=True, most=8)))
    return [dict(gemv=False)] + split_variants(cands + whole)


# Plain-GEMM tiles for many rows (not swapped: x is the MMA's A, the converted weight tile its B), as
# (block_m, block_n, block_k, warps, stages): what cuBLAS-class bf16 GEMMs use at 64-4096 rows.
GEMM_TILES = ((64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
              (128, 128, 64, 8, 5))


def gemm_candidates(m: int, n: int, k: int, sms: int, asm: bool = False) -> list[dict]:
    """int8 tl.dot configs without swap-AB: each GEMM_TILES tile with split-K up to 2 programs per SM
    (>= 4 K steps a slice, reduced in the kernel), also at the split that fits whole waves where that differs, and
    the first three also unsplit. asm: convert the
    codes by the packed byte permute (CUDA; in this orientation a thread's codes are whole 32-bit
    words, ~10% fewer instructions in sm_90 SASS; swapped, re-packing them costs more than it saves)."""
    out, whole = [], []
    for block_m, block_n, block_k, warps, stages in GEMM_TILES:
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        steps = triton.cdiv(k, block_k)
        split = split_for_waves(programs, steps, sms, most=8)
        cfg = dict(gemv=False, swap=False, asm=asm, block_m=block_m, block_n=block_n, block_k=block_k,
                   split_k=split, num_warps=warps, num_stages=stages)
        out.append(dict(cfg, serial=True) if split > 1 else cfg)
        if split > 1 and len(out) <= 3:
            out.append(dict(cfg, split_k=1))
        fits = split_for_waves(programs, steps, sms, whole_waves=True, most=8)
        if fits != split:
            whole.append(dict(cfg, split_k=fits, serial=True) if fits > 1 else dict(cfg, split_k=1))
    return out + [c for c in whole if c not in out]


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 8 under the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_outputs(device: torch.device, m: int, n: int, block_m: int, block_n: int, split_k: int, serial: bool,
                  dtype: torch.dtype) -> tuple[tuple, torch.Tensor, int, torch.Tensor | None, torch.Tensor]:
    """What a (row tiles, column tiles, K slices) launch writes: (grid, out, split_stride, locks, res). out is
    the [M, N] result in dtype, or with split_k > 1 a float32 [split_k, M, N] scratch of partial sums (the
    kernel's last slice sums them into res when serial, gemv_result does afterwards otherwise); locks are the
    serial kernels' arrival counters (None unless serial and split); res is the result (out unless serial)."""
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    if split_k == 1:
        out, split_stride = torch.empty((m, n), dtype=dtype, device=device), 0
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
        split_stride = out.stride(0)
    locks = split_locks(device, grid[0] * grid[1]) if serial and split_k > 1 else None
    res = torch.empty((m, n), dtype=dtype, device=device) if locks is not None else out
    return grid, out, split_stride, locks, res


_split_locks: dict[str, torch.Tensor] = {}
_retired_locks: list[torch.Tensor] = []  # replaced lock buffers stay alive: captured graphs point at them


def split_locks(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 tile counters for a serial split-K reduction (the last K slice of a tile to finish
    sums the partials; every launch leaves its counters zero again), one buffer per device, made on the
    first use (an eager call: the engine warms every graph size up before capturing it). Invariant:
    launches that use it never overlap (the engine runs its GEMMs on one stream at a time; tuning's
    side stream is joined before and after). None while a CUDA graph is being captured and the buffer
    would have to grow (the caller then reduces with torch.sum)."""
    key = str(device)
    buf = _split_locks.get(key)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _retired_locks.append(buf)
        buf = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
        _split_locks[key] = buf
    return buf


def split_variants(cands: list[dict], ok=lambda c: True) -> list[dict]:
    """Tuning candidates with their split-K variants: the first (the heuristic) with split-K summed by
    torch.sum, in the kernel (serial) and without split-K; the others serial when they split (each
    serial on/off is another compile)."""
    out = []
    for i, c in enumerate(cands):
        split = c.get("split_k", 1) > 1
        variants = (c, dict(c, serial=True), dict(c, split_k=1)) if i == 0 else \
            ((dict(c, serial=True),) if split else (c,))
        for cfg in variants:
            if (cfg.get("split_k", 1) > 1 or "serial" not in cfg) and ok(cfg) and cfg not in out:
                out.append(cfg)
    return out


def gemv_result(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out.sum(0, dtype=dtype) if out.dim() == 3 else out


def split_for_waves(programs: int, steps: int, sms: int, waves: int = 2, whole_waves: bool = False,
                    most: int = 16) -> int:
    """Slices of K for a tensor-core kernel's `programs` output tiles: about `waves` programs per SM (the
    fewest slices that reach it), while each slice keeps >= 4 steps (2 with more waves), at most `most`.
    whole_waves: the most slices that stay within `waves` programs per SM instead. These kernels hold 1-2
    programs an SM, so a grid just past a whole wave runs a second, nearly empty one: at 16 rows on an H100
    int4's down_proj's 32 tiles ran 22.4 us at 8 slices (256 programs) against 27.1 at 9 (288), at 64 rows its 64
    tiles 42.5 us at 4 slices against 59.3 at 5 (int4_pairs_scan16_h100.json, int4_pairs_scan64_h100.json)."""
    want = (waves * sms) // programs if whole_waves else triton.cdiv(waves * sms, programs)
    return max(1, min(want, steps // (4 if waves <= 2 else 2) or 1, most))


def gemv_split_k(num_rows: int, num_col_blocks: int, k_blocks: int, sms: int, waves: int = 4) -> int:
    """Slices of K so that rows x column blocks x slices covers `waves` programs per SM, keeping at
    least two K tiles per slice. Shapes only (capturable)."""
    programs = max(num_rows * num_col_blocks, 1)
    want = triton.cdiv(waves * sms, programs)
    return max(1, min(want, k_blocks // 2 if k_blocks >= 2 else 1, 16))


def gemv_candidates(heuristic: dict, num_sms_: int, rows: int, n: int, k: int, tile_k: str) -> list[dict]:
    """Launch configs to time for a GEMV shape: the heuristic first, then tiles x split-K (reduced by
    torch.sum or, serial, in the kernel, split_variants) and the tl.dot kernel. tile_k names the K-tile
    key (block_k for int8)."""
    small, large = (256, 512) if tile_k == "block_k" else (2, 4)
    cands = []
    tiles = [(32, small, 4), (16, large, 4), (64, small, 4)]
    if tile_k == "block_k":  # int8: longer runs of a row per step, and more or fewer rows a program
        tiles += [(8, 1024, 4), (128, 256, 8), (16, 256, 2)]
    for block_n, tk, warps in tiles:
        k_tiles = max(1, k * small // tk)  # k counts K tiles of the small size
        cfg = dict(block_n=block_n, split_k=gemv_split_k(rows, triton.cdiv(n, block_n), k_tiles, num_sms_),
                   num_warps=warps, num_stages=3, gemv=True)
        cfg[tile_k] = tk
        cands.append(cfg)
    return [heuristic] + split_variants(cands) + [dict(gemv=False)]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, *, block_n: int | None = None,
                block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, gemv: bool | None = None) -> torch.Tensor:
    """x [M, K] @ (q [N, K] int8 * scales [N])^T -> [M, N] in x's dtype.

    With no keyword argument, a decode-sized call (M <= GEMV_MAX_ROWS) on CUDA uses the config
    tuning.pick measured fastest for its shape; the keywords force a config (tests, benchmarks).
    """
    m, k = x.shape
    n = q.shape[0]
    if q.shape[1] != k:
        raise ValueError(f"int8_matmul: x has {k} features but the weight has {q.shape[1]}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    forced = dict(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                  gemv=gemv)
    forced = {key: v for key, v in forced.items() if v is not None}
    if not forced:
        sms = num_sms(x.device)
        copies = lambda: [(x, q if i == 0 else q.clone(), scales)  # noqa: E731
                          for i in range(tuning.weight_copies(q.numel()))]
        # one tuned config per bucket of m above the GEMV's rows, not per m (the engine's graphs alone use ~35 sizes)
        key = ("int8", m, n, k, x.dtype) if m <= GEMV_MAX_ROWS else ("int8_mm", tune_bucket(m), n, k, x.dtype)
        forced = tuning.pick(key, lambda: _candidates(m, n, k, sms, x, q), lambda c, *a: _launch(*a, **c), copies,
                             x.device)
    return _launch(x, q, scales, **forced)


def _candidates(m: int, n: int, k: int, sms: int, x: torch.Tensor, q: torch.Tensor) -> list[dict]:
    """What tuning.pick times for int8_matmul's shape (the heuristic first)."""
    if m <= GEMV_MAX_ROWS:
        cands = gemv_candidates(dict(gemv=True), sms, m, n, triton.cdiv(k, 256), "block_k")
        if words_ok(q):
            cands += words_candidates(m, n, k, sms)
        return cands + _mma8_candidates(m, n, k, sms, x, q)
    cands = mm_candidates(m, n, triton.cdiv(k, 128), sms, "block_k", (128,) if m <= 64 else (64,))
    if m > 128:  # all rows in one tile: each weight converted once (the MMA's N goes up to 256)
        cands.append(dict(gemv=False, block_m=256, block_n=64, block_k=64, split_k=1, num_warps=8, num_stages=3))
    if m > 16:
        cands += gemm_candidates(m, n, k, sms, asm=x.is_cuda)
        if x.is_cuda:
            from .triton_int8_limbs import limbs_candidates
            cands += limbs_candidates(m, n, k, sms)
    return with_dequant(m, cands + _mma8_candidates(m, n, k, sms, x, q), "int8")


def _mma8_candidates(m: int, n: int, k: int, sms: int, x: torch.Tensor, q: torch.Tensor) -> list[dict]:
    """triton_int8_mma's configs when q can be read in 128-feature steps (its inline PTX on CUDA, 16-bit x)."""
    from .triton_int8_mma import mma8_candidates, mma8_ok  # (imported here: triton_int8_mma imports this module)
    if not mma8_ok(q, 128):
        return []
    return mma8_candidates(m, n, k, sms, asm=x.is_cuda and x.dtype in (torch.float16, torch.bfloat16))


# Tiles of the word GEMV (triton_int8_words), (block_n, block_k, warps).
WORDS_TILES = ((32, 512, 4), (64, 256, 4), (16, 1024, 4), (128, 256, 8), (64, 512, 8), (64, 512, 4))


def words_ok(q: torch.Tensor) -> bool:
    """Whether q's rows can be read as 32-bit words (K % 4 == 0, 4-byte aligned rows)."""
    return q.shape[1] % 4 == 0 and q.stride(0) % 4 == 0 and q.stride(1) == 1 and q.data_ptr() % 4 == 0


def words_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """The word GEMV's configs (split-K for ~4 waves, reduced in the kernel)."""
    out = []
    for block_n, block_k, warps in WORDS_TILES:
        split = gemv_split_k(m, triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
        cfg = dict(gemv=True, kernel="words", block_n=block_n, block_k=block_k, split_k=split, num_warps=warps,
                   num_stages=3)
        out.append(dict(cfg, serial=True) if split > 1 else cfg)
    return out


def _launch(x, q, scales, *, block_m=None, block_n=None, block_k=None, split_k=None, num_warps=None,
            num_stages=None, gemv=None, serial=False, swap=True, kernel=None, asm=False, pdl=None, tma=False):
    """kernel="words": the GEMV of triton_int8_words; kernel="mma": triton_int8_mma's float16 kernel;
    kernel="limbs": triton_int8_limbs (tma: its tensor-descriptor loads); asm: the byte permute in inline PTX
    (CUDA only), in the tl.dot kernel or the mma kernel. pdl: the word GEMV's programmatic dependent launch
    (engine.kernels.pdl; None: its default)."""
    m, k = x.shape
    n = q.shape[0]
    if kernel == "limbs":
        from .triton_int8_limbs import limbs_matmul
        return limbs_matmul(x, q, scales, tma=tma, block_m=block_m, block_n=block_n, block_k=block_k or 128,
                            split_k=split_k, num_warps=num_warps, num_stages=num_stages, serial=serial)
    if kernel == "dequant":
        return int8_dequant_matmul(x, q, scales, block_n or 8, block_k or 1024)
    if kernel == "mma":
        from .triton_int8_mma import _launch_mma
        return _launch_mma(x, q, scales, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                           num_warps=num_warps, num_stages=num_stages, serial=serial, asm=asm)
    if kernel not in (None, "words"):
        raise ValueError(f"kernel={kernel!r}: expected None, 'words', 'mma', 'limbs' or 'dequant'")
    if asm and kernel == "words":
        raise ValueError("kernel='words' has no inline PTX (asm=False)")
    if asm and not x.is_cuda:
        raise ValueError("asm=True (inline PTX) runs on CUDA only")
    if kernel == "words":
        if not words_ok(q):
            raise ValueError("kernel='words' needs K % 4 == 0 and 4-byte aligned weight rows")
        if gemv is False:
            raise ValueError("kernel='words' is a GEMV")
        if block_k is not None and block_k % 4:
            raise ValueError(f"kernel='words' needs block_k % 4 == 0, got {block_k}")
        gemv = True
    if gemv is None:
        gemv = m <= GEMV_MAX_ROWS
    if gemv:
        block_m, block_n, block_k = 1, block_n or 32, block_k or 256
        if split_k is None:
            split_k = gemv_split_k(m, triton.cdiv(n, block_n), triton.cdiv(k, block_k), num_sms(x.device))
    else:
        block_m = block_m or mm_block_m(m)
        block_n = block_n or (64 if m <= 64 else 128)
        block_k = block_k or (128 if m <= 64 else 64)
        split_k = split_k or 1
    grid, out, split_stride, locks, res = split_outputs(x.device, m, n, block_m, block_n, split_k, serial, x.dtype)
    args = (x, q, scales, out, res, out if locks is None else locks)
    flags = dict(BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, SERIAL=locks is not None,
                 STAGES=(num_stages or 3) if x.is_cuda else 1)
    if kernel == "words":
        from .triton_int8_words import _int8_gemv_words_kernel
        pdl = pdl_enabled(x.device, pdl)
        _int8_gemv_words_kernel[grid](*args, n, k, split_k, x.stride(0), q.stride(0), split_stride, out.stride(-2),
                                      **flags, PDL=pdl, num_warps=num_warps or 4,
                                      **launch_options(pdl))
    elif gemv:
        _int8_gemv_kernel[grid](*args, n, k, split_k, x.stride(0), q.stride(0), split_stride, out.stride(-2),
                                **flags, num_warps=num_warps or 4)
    else:
        _int8_mm_kernel[grid](*args, m, n, k, split_k, x.stride(0), q.stride(0), split_stride, out.stride(-2),
                              BLOCK_M=block_m, **flags, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                              SWAP=swap, ASM=asm, num_warps=num_warps or 4)
    return res if locks is not None else gemv_result(out, x.dtype)
