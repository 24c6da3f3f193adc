"""Host time of Int4Linear.input_columns, the call the Triton backend makes before each int4 layer that a norm or
SwiGLU kernel feeds (about 100 a step of an 8B model; eager steps pay them, CUDA graphs do not). CPU only: a tc x_perm
config is chosen by hand for llama-3.1-8b's qkv shape, then the call is timed at row counts of one tuning bucket.

    TRITON_INTERPRET=1 python benchmarks/int4_input_columns_host.py [CALLS]
"""
from __future__ import annotations

import sys
import time

import torch

from engine.quant import tuning
from engine.quant.int4 import Int4Linear, quantize_int4
from engine.quant.triton_int4 import tuning_key


def main(calls: int = 10000) -> None:
    qweight, scales, zeros = quantize_int4(torch.randn(6144, 4096) * 0.05, 128)
    layer = Int4Linear(qweight, scales.to(torch.float16), zeros, None, 128)
    config = dict(gemv=False, kernel="tc", block_m=16, block_n=32, chunks=4, split_k=2, x_perm=True)
    tuning.chosen[tuning_key(16, 6144, 4096, 128, torch.float16, x_ordered=True)] = config
    cpu = torch.device("cpu")
    layer.input_columns(16, torch.float16, cpu)  # builds the columns once
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(calls):
            layer.input_columns(9 + i % 8, torch.float16, cpu)
        times.append((time.perf_counter() - t0) / calls * 1e6)
    print(f"input_columns: {sorted(times)[1]:.2f} us a call (median of 3 x {calls}; range "
          f"{min(times):.2f}-{max(times):.2f})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
