"""The dp4a GEMV's input at 1-2 rows: the SwiGLU kernel / decode attention then `_x_limbs_kernel` (before), against
the fused producer that stores the limbs itself (silu_and_mul_limbs / decode attention with decode_reduce_limbs),
llama-3.1-8b's shapes (intermediate 14336, 32 heads and 8 KV heads of 128, contexts of CONTEXT tokens over the split
count of a decode graph of max_model_len 8192). A norm writing the limbs, measured so at 574c56b
(int4_limbs_producers_h100.json), lost and was removed. Each variant is a CUDA graph of REPEAT calls (as in a decode
step's graph), timed by CUDA events; ROUNDS interleaved rounds, median and spread of the time per call, and the
ratio before / fused.

    PYTHONPATH=. python3 benchmarks/int4_limbs_producers.py [ROUNDS] [--out FILE]
"""
from __future__ import annotations

import functools
import json
import statistics
import sys

import torch

from engine.kernels.pdl import pdl_enabled
from engine.kernels.triton_decode import decode_attention
from engine.kernels.triton_fused import silu_and_mul_triton
from engine.quant.triton_int4_dp4a import decode_reduce_limbs, empty_limbs, silu_and_mul_limbs, x_limbs

REPEAT, INTER, CHUNKS = 64, 14336, 4
HEADS, KV_HEADS, HEAD_DIM, BLOCK, CONTEXT, MAX_MODEL_LEN = 32, 8, 128, 16, 1024, 8192


def attention(rows: int, dev: torch.device, dt: torch.dtype, limbs: bool):
    """decode_attention over rows requests of CONTEXT tokens (random cache, contiguous blocks), then x_limbs of its
    output (limbs=False) or with the reduce storing them (limbs=True)."""
    q = torch.randn(rows, HEADS, HEAD_DIM, device=dev, dtype=dt)
    blocks = CONTEXT // BLOCK
    k_cache, v_cache = (torch.randn(rows * blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=dt) for _ in range(2))
    tables = torch.arange(rows * blocks, device=dev, dtype=torch.int32).view(rows, blocks)
    lens = torch.full((rows,), CONTEXT, device=dev, dtype=torch.int32)
    out, lb = torch.empty_like(q), empty_limbs(rows, HEADS * HEAD_DIM, CHUNKS, dt, dev)
    reduce = functools.partial(decode_reduce_limbs, limbs=lb) if limbs else None

    def run():
        decode_attention(q, k_cache, v_cache, tables, lens, out, HEAD_DIM ** -0.5, MAX_MODEL_LEN, reduce=reduce)
        if not limbs:
            x_limbs(out.view(rows, -1), CHUNKS, pdl_enabled(dev))
    return run


def graph(fn):
    """fn captured REPEAT times in one CUDA graph (warmed up first, outside the capture)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPEAT):
            fn()
    return g


def time_us(g) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * REPEAT)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else 5
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    dev, dt = torch.device("cuda"), torch.bfloat16
    pdl = pdl_enabled(dev)  # as the dp4a launch calls x_limbs
    result = {"command": " ".join(["python3"] + sys.argv), "device": torch.cuda.get_device_name(dev),
              "repeat": REPEAT, "rounds": rounds, "per_call_us": {}}
    for rows in (1, 2):
        h = torch.randn(rows, 2 * INTER, device=dev, dtype=dt)
        variants = {
            "swiglu, then x_limbs": lambda: x_limbs(silu_and_mul_triton(h), CHUNKS, pdl),
            "swiglu writing limbs": lambda: silu_and_mul_limbs(h, CHUNKS),
            "attention, then x_limbs": attention(rows, dev, dt, False),
            "attention writing limbs": attention(rows, dev, dt, True),
        }
        graphs = {name: graph(fn) for name, fn in variants.items()}
        times = {name: [] for name in graphs}
        for _ in range(rounds):
            for name, g in graphs.items():
                times[name].append(time_us(g))
        for name, ts in times.items():
            ts.sort()
            result["per_call_us"][f"{name} @{rows}"] = {"median": statistics.median(ts), "min": ts[0],
                                                          "max": ts[-1]}
            print(f"rows {rows}  {name:25s} {statistics.median(ts):7.2f} us ({ts[0]:.2f}-{ts[-1]:.2f})")
        for a, b in (("swiglu, then x_limbs", "swiglu writing limbs"),
                     ("attention, then x_limbs", "attention writing limbs")):
            ratio = statistics.median(times[a]) / statistics.median(times[b])
            result[f"ratio {a.split(',')[0]} @{rows}"] = ratio
            print(f"rows {rows}  {a.split(',')[0]}: before / fused {ratio:.2f}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
