"""Programmatic dependent launch (PDL) for the decode GEMVs, with an L2 prefetch of their weights.

Why: at batch 1 a decode step is ~200 small kernels, and a 4096-wide layer's GEMV reads its weights in
a few microseconds, about what a kernel boundary costs (the next grid's launch, then the first DRAM
round trips of its loads). On sm_90 a kernel launched with PDL starts while the kernel before it in
the stream is still running; it must wait (griddepcontrol.wait, `gdc_wait`) before it reads anything
an earlier kernel writes or writes anything an earlier kernel reads. A layer's weights are neither,
so a GEMV can ask for them before the wait: each program prefetches its weight rows into L2 (one
`cp.async.bulk.prefetch.L2` per row), lets the next kernel launch (`gdc_launch_dependents`), then waits.
CUTLASS's example 63 (Hopper GEMM with weight prefetch) does the same.

Invariant: a kernel launched with `launch_pdl=True` calls `wait` before its first access to data that
another kernel reads or writes (its input, output, scratch and split-K counters). Off CUDA (the Triton
interpreter) and below sm_90 the flags are off and these functions compile to nothing.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# "$0" is a dummy output: inline assembly in Triton returns a value; is_pure=False keeps the instruction.
_BULK_PREFETCH = tl.constexpr("cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;")


@triton.jit
def prefetch_rows(row_ptrs, nbytes):
    """Prefetch `nbytes` bytes (rounded down to a multiple of 16) from each of row_ptrs (16-byte aligned)
    into L2: one bulk prefetch per row. A hint only: nothing waits for it."""
    if nbytes >= 16:
        size = (nbytes // 16 * 16).to(tl.int32) + tl.zeros(row_ptrs.shape, tl.int32)
        tl.inline_asm_elementwise(_BULK_PREFETCH, "=r,l,r", [row_ptrs.to(tl.int64), size], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def release(PDL: tl.constexpr):
    """With PDL: let the next kernel in the stream launch now (a kernel launched without PDL itself, whose
    successor is a PDL GEMV: its prefetch then overlaps this kernel). Without: nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """PDL 1: let the next kernel launch now, then wait until the kernels before this one have finished and
    their writes are visible; PDL 2: only wait (`release_late` lets the next one launch after the main loop);
    0: nothing."""
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL >= 1:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_late(PDL: tl.constexpr):
    """PDL 2: let the next kernel launch (after the main loop, so that its programs do not take the SM slots
    this kernel's later programs need)."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


# Off until measured on the device (benchmarks/pdl_ab.py); ENGINE_PDL=1 / 0 overrides.
DEFAULT = "0"
DEFAULT_MODE, DEFAULT_PREFETCH = 2, 1


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on `device` use PDL by default: CUDA sm_90 or newer and ENGINE_PDL (read at each
    launch; CUDA graphs keep what they were captured with)."""
    if device.type != "cuda" or os.environ.get("ENGINE_PDL", DEFAULT) == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def pdl_flags(device: torch.device, weight: torch.Tensor, row_bytes: int, pdl: int | bool | None,
              prefetch: int | bool | None) -> tuple[int, int]:
    """(PDL, PREFETCH) of a GEMV launch over `weight` rows of `row_bytes` bytes. PDL: 0 off, 1 let the next
    kernel launch at the start, 2 after the main loop; PREFETCH: 0 none, 1 the first tiles of a program's
    rows, 2 all of them. pdl None (or True) takes the device's default mode, prefetch None its default with
    PDL; off CUDA both are 0, and the prefetch is 0 unless every row starts 16-byte aligned."""
    if device.type != "cuda":
        return 0, 0
    on = pdl_enabled(device) if pdl is None else bool(pdl)
    pdl = (DEFAULT_MODE if pdl is None or pdl is True else int(pdl)) if on else 0
    prefetch = (DEFAULT_PREFETCH if pdl else 0) if prefetch is None or prefetch is True else int(prefetch)
    aligned = weight.data_ptr() % 16 == 0 and (weight.stride(0) * weight.element_size()) % 16 == 0
    return pdl, prefetch if aligned and row_bytes >= 16 else 0


def release_flag(device: torch.device, release_early: bool | None) -> bool:
    """RELEASE of a kernel that lets the next one launch early: release_early, or (None) the device's PDL default."""
    return pdl_enabled(device) if release_early is None else bool(release_early and device.type == "cuda")


def launch_options(pdl: bool) -> dict:
    """The launch keyword that asks for PDL (none without it: the interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}
