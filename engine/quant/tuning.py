"""Launch-configuration choice for the dequantizing matmuls, measured once per shape on the device.

Why measured: which tile, split-K and pipelining depth is fastest for a decode GEMV depends on the
shape (a 4096-wide layer must be split over K to fill 132 SMs, a 128k-wide LM head must not) and on
the GPU, and timings taken with ordinary launches are dominated by host launch overhead at these
sizes. So the first call for a (kernel, rows, N, K, dtype) key on CUDA times every candidate by
replaying a CUDA graph of its launches (device time, including the extra kernel a split-K candidate
launches), over enough copies of the weights to overflow L2, and keeps the fastest for the life of
the process.

Invariants: `chosen` maps a key to the config every later call with that key uses; `timings` keeps
the measured milliseconds per candidate and `seconds` the tuning's wall time, for benchmarks to
record; a candidate whose output differs from the first candidate's (tuning.agrees), on the activations given
and on them scaled past float16's range (bfloat16 / float32 ones), or that fails to build is timed as inf and
never chosen.
No tuning happens off CUDA,
while a CUDA graph is being captured (the first candidate is used then, without caching), or when
ENGINE_QUANT_AUTOTUNE=0; the first candidate is the shape heuristic.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

chosen: dict[tuple, dict] = {}
timings: dict[tuple, list[tuple[dict, float]]] = {}
seconds: dict[tuple, float] = {}  # wall time the tuning of a key took (compiles included)


def pick(key: tuple, candidates: list[dict], launch: Callable[..., object], arg_sets: Callable[[], list[tuple]],
         device: torch.device) -> dict:
    """The config of `candidates` to use for `key`. launch(cfg, *args) runs the kernel(s) once;
    arg_sets() gives argument tuples whose weights together overflow the L2 cache, so the timing
    streams weights from DRAM as a decode step does (a lone 17 MB layer would stay in a 50 MB L2)."""
    cfg = chosen.get(key)
    if cfg is not None:
        return cfg
    if (device.type != "cuda" or os.environ.get("ENGINE_QUANT_AUTOTUNE", "1") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    t0 = time.perf_counter()
    sets = arg_sets()
    large = _large_x(sets[0])
    results = []
    reference = reference_large = None
    for cand in candidates:
        try:
            out = launch(cand, *sets[0])
            out_large = launch(cand, *large) if large is not None else None
            if reference is None:
                reference = out.float()
                if out_large is not None and bool(torch.isfinite(out_large).all()):
                    reference_large = out_large.float()
            elif not agrees(out, reference):  # a wrong candidate never wins (a miscompile, a bad tile)
                raise ValueError("output differs from the first candidate's")
            elif reference_large is not None and not agrees(out_large, reference_large):
                raise ValueError("output differs from the first candidate's with activations past float16's range")
            ms = _graph_time(lambda: [launch(cand, *a) for a in sets], len(sets))
        except Exception:  # noqa: BLE001 - a config this GPU or Triton cannot build is skipped
            ms = math.inf
        results.append((cand, ms))
    del sets
    best = min(results, key=lambda r: r[1])[0]
    chosen[key], timings[key] = best, results
    seconds[key] = time.perf_counter() - t0
    return best


def _large_x(args: tuple) -> tuple | None:
    """args with the activations (the first argument) scaled to a largest magnitude of 1e5, past float16's
    range, or None when they cannot hold it (float16, fp8) or are all zero. A candidate that converts them
    to float16 on the way (triton_int8_mma did, where the compiler moved its scaling after the conversion)
    then returns inf or NaN, which never agrees."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float32) or x.numel() == 0:
        return None
    peak = float(x.abs().max())
    if not peak > 0:
        return None
    return (x * (1e5 / peak),) + tuple(args[1:])


def agrees(out: torch.Tensor, reference: torch.Tensor, rtol: float = 2e-2) -> bool:
    """Whether a candidate's output equals the first candidate's up to 16-bit rounding of the weights
    and of the sums (relative Frobenius error below rtol; NaN or inf anywhere never agrees)."""
    if out.shape != reference.shape:
        return False
    out = out.float()
    err = (out - reference).norm()
    return bool(torch.isfinite(err)) and float(err) <= rtol * float(reference.norm()) + 1e-6


def _graph_time(fn: Callable[[], object], calls: int, reps: int = 4) -> float:
    """Milliseconds per call of fn's launches, from replays of a CUDA graph of `reps` x fn (best of 3)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                fn()
        best = math.inf
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
    torch.cuda.current_stream().wait_stream(stream)
    del graph
    return best / (reps * calls)


def weight_copies(weight_bytes: int, l2_bytes: int = 50 * 2**20) -> int:
    """How many copies of a layer's weights make a working set of about 3x the L2 cache (1 to 8)."""
    return max(1, min(8, math.ceil(3 * l2_bytes / max(weight_bytes, 1))))
