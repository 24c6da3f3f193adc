"""Nsight Compute target: int4 kernels at 64 rows (gemv1: 1 row) on llama-3.1-8b's gate_up (28672 x 4096), and
bf16 cuBLAS.

One config a run, launched 3 times (ncu profiles the third, --launch-skip 2; the first launch compiles). The
configs are the tuner's picks at 64 rows on the H200 (quant_kernels_int4_prefetch_h200.log): the one-dot-per-step
kernel, not swapped (tc-gemm 64 x 128, 4 warps, 2 slices reduced in the kernel, inline-PTX dequantization, x in
feature order), with and without the next step's scale / zero prefetched, and the per-plane tl.dot kernel:

    for w in tcgemm tcgemm_pf dot bf16; do
      PYTHONPATH=. ncu --clock-control none --launch-skip 2 --launch-count 1 -k "regex:int4|gemm|nvjet" \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis python3 benchmarks/ncu_int4_rows.py $w; done
    # per-instruction stall samples: add --set full --import-source yes -o REPORT, then
    ncu -i REPORT.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 benchmarks/ncu_int4_rows.py --sass-top sass.csv  # the main loop's mix and its most-stalled instructions
"""
import csv
import sys
from collections import Counter

import torch

from engine.quant.int4 import Int4Linear
from engine.quant.triton_int4 import _launch

TC = dict(kernel="tc", block_m=64, block_n=128, chunks=4, split_k=2, serial=True, num_warps=4, num_stages=3,
          swap=False, dequant="asm_scaled", x_natural=True)
CONFIGS = {"tcgemm": TC, "tcgemm_pf": dict(TC, prefetch=True),
           "dot": dict(block_m=64, block_n=128, chunks=4, split_k=2, serial=True, num_warps=8, num_stages=3),
           # decode at 1 row: the CUDA-core GEMV, the tuner's gate_up pick on the H200 (quant_kernels_int4_async_h200)
           "gemv1": dict(gemv=True, block_n=128, chunks=4, split_k=1, num_warps=4, num_stages=3)}
CONFIGS["gemv1_pf"] = dict(CONFIGS["gemv1"], prefetch=True)
ROWS = {"gemv1": 1, "gemv1_pf": 1}


def sass_top(path: str, top: int = 12) -> None:
    """The main loop of an ncu SASS source page (the instructions executed most often): its size, its opcode mix,
    and the `top` instructions by stall samples (share of all samples)."""
    rows = list(csv.reader(open(path)))
    head, data = rows[1], rows[2:]
    src, stalls, execs = (head.index(k) for k in ("Source", "Warp Stall Sampling (All Samples)",
                                                     "Instructions Executed"))
    total = sum(int(r[stalls] or 0) for r in data)
    most = max(int(r[execs] or 0) for r in data)
    loop = [r for r in data if int(r[execs] or 0) >= most / 2]
    print(f"samples {total}, instructions {len(data)}; main loop: {len(loop)} instructions executed {most} times, "
          f"{sum(int(r[stalls] or 0) for r in loop) / total:.1%} of the samples")
    ops = Counter(r[src].split()[1] if r[src].split()[0].startswith("@") else r[src].split()[0] for r in loop)
    print("opcodes:", ", ".join(f"{op} {n}" for op, n in ops.most_common(20)))
    for r in sorted(data, key=lambda r: -int(r[stalls] or 0))[:top]:
        print(f"{int(r[stalls]) / total:6.1%} {r[execs]:>8} {r[src].strip()[:90]}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--sass-top":
        return sass_top(sys.argv[2])
    which = sys.argv[1] if len(sys.argv) > 1 else "tcgemm"
    if which not in (*CONFIGS, "bf16"):
        sys.exit(f"config {which!r}: choose one of {sorted((*CONFIGS, 'bf16'))}")
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 28672, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    layer = Int4Linear.from_linear(lin, "gate_up")
    x = torch.randn(ROWS.get(which, 64), 4096, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, lin.weight)
    for _ in range(3):
        if which == "bf16":
            y = torch.nn.functional.linear(x, lin.weight)
        else:
            y = _launch(x, layer.packed, layer.scales, layer.zeros, layer.group_size, **CONFIGS[which])
    torch.cuda.synchronize()
    print(which, "relative difference from bf16 (int4 rounding):",
          ((y.float() - ref.float()).norm() / ref.float().norm()).item())


if __name__ == "__main__":
    main()
