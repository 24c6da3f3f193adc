"""Nsight Compute driver: the tuned int4 and int8 decode GEMVs and bf16 cuBLAS at 1 row, llama-3.1-8b shapes.

Each shape is tuned first (tuning.pick, printed), then every kernel runs once between cudaProfilerStart and
cudaProfilerStop, so that ncu profiles those launches only (cold L2, one launch each: the durations are not
comparable to the tuner's graph replays; the occupancy, issue and memory sections are what this is for):

    PYTHONPATH=. ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
        python3 benchmarks/ncu_gemv.py > ncu_gemv.log
"""
import json

import torch

from engine.quant import triton_int4, triton_int8, tuning
from engine.quant.int4 import pack_int4_kernel, quantize_int4
from engine.quant.int8 import quantize_int8

SHAPES = {"qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main():
    torch.manual_seed(0)
    calls = []
    for n, k in SHAPES.values():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        codes, scales, zeros = quantize_int4(w)
        packed = pack_int4_kernel(codes)
        q8, s8 = quantize_int8(w)
        calls += [lambda x=x, p=packed, s=scales, z=zeros: triton_int4.int4_matmul(x, p, s, z, 128),
                  lambda x=x, q=q8, s=s8: triton_int8.int8_matmul(x, q, s),
                  lambda x=x, w=w: x @ w.t()]
        for f in calls[-3:]:  # tunes the quantized kernels
            f()
    torch.cuda.synchronize()
    print(json.dumps({repr(k): v for k, v in tuning.chosen.items()}, indent=1))
    torch.cuda.cudart().cudaProfilerStart()
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
