"""Nsight Compute target: int4 kernels at 64 rows (gemv1: 1 row; mma16: 16 rows) on llama-3.1-8b's gate_up
(28672 x 4096), and bf16 cuBLAS.

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
    python3 benchmarks/ncu_int4_rows.py bf16 16  # a config at another row count (default: its own, else 64)
    python3 benchmarks/ncu_int4_rows.py --time 16 mma16 mma16_async:split_k=4 bf16  # CUDA-graph timings, 5 rounds
    python3 benchmarks/ncu_int4_rows.py --time 16@down mma16:split_k=16 bf16  # another layer (LAYERS)
"""
import csv
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.quant.int4 import Int4Linear  # noqa: E402
from engine.quant.triton_int4 import _launch  # noqa: E402

TC = dict(kernel="tc", block_m=64, block_n=128, chunks=4, split_k=2, serial=True, num_warps=4, num_stages=3,
          swap=False, dequant="asm_scaled", x_natural=True)
CONFIGS = {"tcgemm": TC, "tcgemm_pf": dict(TC, prefetch=True),
           "dot": dict(block_m=64, block_n=128, chunks=4, split_k=2, serial=True, num_warps=8, num_stages=3),
           # decode at 1 row: the CUDA-core GEMV, the tuner's gate_up pick on the H200 (quant_kernels_int4_async_h200)
           "gemv1": dict(gemv=True, block_n=128, chunks=4, split_k=1, num_warps=4, num_stages=3)}
CONFIGS["gemv1_pf"] = dict(CONFIGS["gemv1"], prefetch=True)
# decode at 16 rows: the swap-AB "pairs" tile, folded (the tuner's gate_up pick, quant_kernels_int4_async_h200)
# and unfolded with x permuted once (one accumulator a dot, the wgmmas in flight)
PAIRS16 = dict(kernel="mma", layout="pairs", swap=True, asm=True, block_m=16, block_n=128, block_k=128, split_k=2,
               serial=True, num_warps=4, num_stages=3)
CONFIGS["mma16"] = dict(PAIRS16, fold=True)
CONFIGS["mma16_perm"] = dict(PAIRS16, fold=True, x_perm=True)
CONFIGS["mma16_async"] = dict(PAIRS16, fold=False, x_perm=True)
for name in ("mma16", "mma16_perm", "mma16_async"):  # each step loading the next step's scale and zero
    CONFIGS[name + "_pf"] = dict(CONFIGS[name], prefetch=True)
# 64 rows: the tuner's gate_up pick (tc, x permuted, prefetch) and the unfolded pairs tile
CONFIGS["tc64"] = dict(TC, x_natural=False, x_perm=True, prefetch=True)
CONFIGS["mma64_async_pf"] = dict(CONFIGS["mma16_async_pf"], block_m=64, num_warps=8, split_k=1)
# 1 row on integer dot products (triton_int4_dp4a), the first of its tiles without split-K
CONFIGS["dp4a1"] = dict(kernel="dp4a", block_n=128, chunks=4, split_k=1, serial=False, num_warps=4, num_stages=3)
ROWS = {name: 16 if name.startswith("mma16") else 1 for name in CONFIGS if name.startswith(("gemv1", "mma16", "dp4a"))}


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


# llama-3.1-8b's projections, (N, K)
LAYERS = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096),
          "lm_head": (128256, 4096)}


def _setup(rows: int, layer_name: str = "gate_up"):
    n, k = LAYERS[layer_name]
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, 0.0, 0.02)
    layer = Int4Linear.from_linear(lin, layer_name)
    return lin, layer, torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)


def _config(which: str) -> dict:
    """A config by name, with overrides after a colon: "mma16_async_pf:block_n=64,split_k=4"."""
    name, _, over = which.partition(":")
    cfg = dict(CONFIGS[name])
    for item in filter(None, over.split(",")):
        key, value = item.split("=")
        cfg[key] = {"True": True, "False": False}.get(value, value) if not value.isdigit() else int(value)
    return cfg


def _run(which: str, lin, layer, x):
    if which == "bf16":
        return torch.nn.functional.linear(x, lin.weight)
    return _launch(x, layer.packed, layer.scales, layer.zeros, layer.group_size, **_config(which))


def time_configs(names: list[str], rows: int, layer_name: str = "gate_up", rounds: int = 5) -> None:
    """Median (min-max) microseconds of each config at `rows` rows of a layer over `rounds` interleaved CUDA-graph
    timings."""
    from triton.testing import do_bench_cudagraph
    lin, layer, x = _setup(rows, layer_name)
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            times[n].append(1e3 * do_bench_cudagraph(lambda: _run(n, lin, layer, x), rep=50))
    for n, t in times.items():
        t.sort()
        print(f"{layer_name:8s} {n:40s} {rows:4d} rows  {t[len(t) // 2]:7.1f} us ({t[0]:.1f}-{t[-1]:.1f})")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--sass-top":
        return sass_top(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[1] == "--time":  # --time ROWS[@LAYER] NAME...
        rows, _, layer_name = sys.argv[2].partition("@")
        return time_configs(sys.argv[3:], int(rows), layer_name or "gate_up")
    which = sys.argv[1] if len(sys.argv) > 1 else "tcgemm"
    if which.partition(":")[0] not in (*CONFIGS, "bf16"):
        sys.exit(f"config {which!r}: choose one of {sorted((*CONFIGS, 'bf16'))}")
    lin, layer, x = _setup(int(sys.argv[2]) if len(sys.argv) > 2 else ROWS.get(which.partition(":")[0], 64))
    ref = torch.nn.functional.linear(x, lin.weight)
    for _ in range(3):
        y = _run(which, lin, layer, x)
    torch.cuda.synchronize()
    print(which, "relative difference from bf16 (int4 rounding):",
          ((y.float() - ref.float()).norm() / ref.float().norm()).item())


if __name__ == "__main__":
    main()
