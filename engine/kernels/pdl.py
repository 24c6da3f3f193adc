"""Programmatic dependent launch (PDL) for the decode GEMVs.

Why: at batch 1 a decode step is ~200 small kernels, and a 4096-wide layer's GEMV reads its weights in
a few microseconds, about what a kernel boundary costs. On sm_90 a kernel launched with PDL may start
while the kernel before it in the stream is still running, once every program of that kernel has let it
(griddepcontrol.launch_dependents, `release`) or exited; it must wait (griddepcontrol.wait,
`wait_for_inputs`) before it reads anything an earlier kernel writes or writes anything an earlier kernel
reads. So the next GEMV's launch overlaps the end of the kernel before it.

Where (measured on an H200, benchmarks/pdl_ab.py, a batch-1 chain of 32 llama-3.1-8b layers in a CUDA
graph): a GEMV launched with PDL waits at its start and releases after its main loop (releasing at its
start let the next GEMV's programs take the SM slots its own later programs needed: 0.97-0.98x for int8 /
int4, pdl_ab_h200_run2.json), and the norm, SwiGLU and attention kernels before a GEMV release at their
start: 1.022x / 1.021x / 1.015x for bf16 / int8 / int4 (pdl_ab_h200_run3.json); the engine's batch-1 TPOT
1.015-1.022x / 1.007x / 1.006x (benchmarks/pdl_engine_ab.py, pdl_engine_ab_h200.json, _run2.log).
`pdl_enabled` reads ENGINE_PDL at each launch (sub-microsecond host work; none inside a CUDA graph). An L2 prefetch of each program's weight rows before its
wait (one cp.async.bulk.prefetch.L2 a row) lost everywhere, 0.60-0.98x (pdl_ab_h200.json, _run2), and was
removed.

Invariant: a kernel launched with `launch_pdl=True` calls `wait_for_inputs` before its first access to data
that another kernel reads or writes (its input, output, scratch and split-K counters); only its weights,
which no kernel writes, may be read before. Off CUDA (the Triton interpreter) and below sm_90 the flags
are off and these functions compile to nothing.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# ENGINE_PDL=0 turns it off (A/B measurements), read at each launch: CUDA graphs keep what they were captured with.
DEFAULT = "1"


@triton.jit
def release(PDL: tl.constexpr):
    """With PDL: let the next kernel in the stream launch (if it was launched with PDL). Without: nothing."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With PDL: wait until the kernels before this one have finished and their writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def pdl_enabled(device: torch.device, pdl: bool | None = None) -> bool:
    """Whether a launch on `device` uses PDL: `pdl` if given, else ENGINE_PDL (default on); never off CUDA
    or below sm_90."""
    if device.type != "cuda":
        return False
    if pdl is None:
        pdl = os.environ.get("ENGINE_PDL", DEFAULT) != "0"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return bool(pdl) and _capability(index) >= (9, 0)


def launch_options(pdl: bool) -> dict:
    """The launch keyword that asks for PDL (none without it: the interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}
