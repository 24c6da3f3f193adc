"""Host time of Int4Linear.input_columns, the call the Triton backend makes before each int4 layer that a norm or
SwiGLU kernel feeds (about 100 a step of an 8B model; eager steps pay them, CUDA graphs do not): with its lookup by
rows bucket, against the same call with that lookup emptied before each call (the path every call took before the
lookup: the tuning key, the tuned config and its kernel order), in interleaved rounds of one run. CPU only: a tc
x_perm config is chosen by hand for llama-3.1-8b's qkv shape, and the call is timed at row counts of one bucket.

    TRITON_INTERPRET=1 python benchmarks/int4_input_columns_host.py [CALLS] [ROUNDS]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from engine.quant import tuning
from engine.quant.int4 import Int4Linear, quantize_int4
from engine.quant.triton_int4 import tuning_key


def main(calls: int = 10000, rounds: int = 3) -> None:
    qweight, scales, zeros = quantize_int4(torch.randn(6144, 4096) * 0.05, 128)
    layer = Int4Linear(qweight, scales.to(torch.float16), zeros, None, 128)
    config = dict(gemv=False, kernel="tc", block_m=16, block_n=32, chunks=4, split_k=2, x_perm=True)
    tuning.chosen[tuning_key(16, 6144, 4096, 128, torch.float16, x_ordered=True)] = config
    cpu = torch.device("cpu")
    layer.input_columns(16, torch.float16, cpu)  # builds the columns once

    def lookup():
        layer.input_columns(9 + i % 8, torch.float16, cpu)

    def without():
        layer._columns_by_rows.clear()
        layer.input_columns(9 + i % 8, torch.float16, cpu)
    times = {"with the lookup": [], "lookup emptied each call": []}
    for _ in range(rounds):
        for name, call in zip(times, (lookup, without)):
            t0 = time.perf_counter()
            for i in range(calls):
                call()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    for name, ts in times.items():
        print(f"input_columns, {name}: {statistics.median(ts):.2f} us a call (median of {rounds} x {calls}; range "
              f"{min(ts):.2f}-{max(ts):.2f})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
