"""A/B on the GPU: bf16 GEMMs of llama-3.1-8b's decode step at the 1000-request trace's batch sizes, cuBLAS (what
nn.Linear runs) against cuBLASLt (torch.backends.cuda.preferred_blas_library) and Triton tiles: the engine's
swapped-AB W8A8 kernel (engine.quant.triton_fp8_gemm, run on bf16 operands with unit scales, its tuner's tiles
and split-K variants, pointer and tensor-descriptor loads) and a plain grouped TMA GEMM written here. Each round
times every candidate (a CUDA graph of its launches over enough weight copies to overflow L2, as tuning.pick does);
rounds interleave with the order alternating; medians and spread of each kind's best are reported, and the
decode step's GEMMs (32 layers + LM head) per row count.

    PYTHONPATH=. python3 benchmarks/bf16_gemm_ab.py ROUNDS OUT.json [ROWS,ROWS,... | LO:HI:STEP] [--no-swapped]
    python3 benchmarks/bf16_gemm_ab.py --summary OUT.json [RATE_TFLOPS]   (no GPU: a saved run's summary)

LO:HI:STEP scans the row counts range(LO, HI + 1, STEP) (the engine captures a decode graph every 8 rows, so a
step's GEMMs run at any multiple of 8); --no-swapped leaves the swapped-AB tiles out (they lost everywhere
from 64 rows, bf16_gemm_ab_h200.json).
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from engine.quant.triton_fp8_gemm import HAS_TMA, _fp8_launch, dot_candidates  # noqa: E402
from engine.quant.triton_int8 import num_sms  # noqa: E402
from engine.quant.tuning import _graph_time, weight_copies  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
ROWS = (64, 128, 256, 512, 768, 1024)
# (block_m, block_n, block_k, warps, stages, group_m) of the plain kernel
PLAIN = ((128, 128, 64, 4, 4, 8), (128, 256, 64, 8, 3, 8), (64, 128, 64, 4, 4, 8), (64, 256, 64, 4, 3, 8),
         (128, 128, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8), (128, 128, 128, 8, 3, 8), (64, 64, 64, 4, 5, 8))


@triton.jit
def _plain_mm(a_desc, b_desc, c_ptr, M, N, K, stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, STAGES: tl.constexpr, GROUP_M: tl.constexpr):
    """c = a @ b^T, a [M, K], b [N, K] bf16 through tensor descriptors; programs in groups of GROUP_M row tiles
    (the column tiles of a group share their row tiles from L2)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = b_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask)


def plain(x, w, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, bk, warps, stages, group = cfg
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _plain_mm[grid](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), out, m, n,
                    k, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, GROUP_M=group,
                    num_warps=warps)
    return out


def cublas(x, w, lib):
    torch.backends.cuda.preferred_blas_library(lib)
    try:
        return x @ w.t()
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")


def candidates(m, n, k, sms, swapped_tiles=True):
    """(kind, label, fn(x, w)) of every candidate for an [m, k] x [n, k]^T product."""
    out = [("cublas", "cublas", lambda x, w: cublas(x, w, "cublas")),
           ("cublaslt", "cublaslt", lambda x, w: cublas(x, w, "cublaslt"))]
    for c in dot_candidates(m, n, k, sms) if swapped_tiles else ():
        ones = {}

        def swapped(x, w, c=c):  # unit row and column scales, made once per shape
            key = (x.shape[0], w.shape[0])
            if key not in ones:
                ones[key] = (torch.ones(x.shape[0], 1, device=x.device), torch.ones(w.shape[0], device=x.device))
            return _fp8_launch(x, ones[key][0], w, ones[key][1], x.dtype, **c)
        out.append(("swapped", json.dumps(c, sort_keys=True), swapped))
    if HAS_TMA:
        out += [("plain", str(cfg), lambda x, w, cfg=cfg: plain(x, w, cfg)) for cfg in PLAIN]
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = ROWS
    if len(args) > 2 and ":" in args[2]:
        lo, hi, step_rows = map(int, args[2].split(":"))
        rows = tuple(range(lo, hi + 1, step_rows))
    elif len(args) > 2:
        rows = tuple(int(r) for r in args[2].split(","))
    rounds = int(args[0]) if args else 3
    out_path = args[1] if len(args) > 1 else "bf16_gemm_ab.json"
    dev = torch.device("cuda")
    sms = num_sms(dev)
    torch.manual_seed(0)
    res = {"command": "python3 benchmarks/bf16_gemm_ab.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rounds": rounds, "rows": rows, "shapes": {}}
    cases = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wsets = [w if i == 0 else w.clone() for i in range(weight_copies(w.numel() * 2))]
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = (x.float() @ w.float().t())
            cands = []
            for kind, label, fn in candidates(m, n, k, sms, "--no-swapped" not in sys.argv):
                try:
                    err = ((fn(x, w).float() - ref).norm() / ref.norm()).item()
                except Exception as e:  # a tile that does not fit (shared memory, TMA box): left out, said so
                    print(f"{name} m={m} {kind} {label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if err > 1e-2:
                    print(f"{name} m={m} {kind} {label}: relative error {err:.2e}, left out", flush=True)
                    continue
                cands.append((kind, label, fn))
            cases[(name, m)] = dict(x=x, wsets=wsets, cands=cands, times={})
        print(name, "ready", flush=True)
    for r in range(rounds):
        for (name, m), case in cases.items():
            order = case["cands"] if r % 2 == 0 else case["cands"][::-1]
            for kind, label, fn in order:
                us = 1e3 * _graph_time(lambda: [fn(case["x"], w) for w in case["wsets"]], len(case["wsets"]))
                case["times"].setdefault((kind, label), []).append(us)
        print("round", r, "done", flush=True)
    step = {}
    for (name, m), case in cases.items():
        med = {key: statistics.median(v) for key, v in case["times"].items()}
        row = {}
        for kind in ("cublas", "cublaslt", "swapped", "plain"):
            mine = {label: t for (kd, label), t in med.items() if kd == kind}
            if not mine:
                continue
            label = min(mine, key=mine.get)
            runs = case["times"][(kind, label)]
            row[kind] = dict(us=mine[label], spread=[min(runs), max(runs)], config=label)
        best_kind = min(row, key=lambda kd: row[kd]["us"])
        n, k = SHAPES[name]
        row["best"] = best_kind
        row["best_over_cublas"] = row["cublas"]["us"] / row[best_kind]["us"]
        row["cublas_tflops"] = 2 * m * n * k / row["cublas"]["us"] / 1e6
        res["shapes"].setdefault(name, {})[m] = row
        layers = 1 if name == "lm_head" else 32
        for kind in ("cublas", "cublaslt", "best"):
            us = row[best_kind]["us"] if kind == "best" else row[kind]["us"]
            step.setdefault(m, {}).setdefault(kind, 0.0)
            step[m][kind] += layers * us
        print(f"{name:13s} m={m:5d} " + "  ".join(f"{kd} {row[kd]['us']:8.1f}" for kd in ("cublas", "cublaslt",
              "swapped", "plain") if kd in row) + f"  best {best_kind} {row['best_over_cublas']:.3f}x "
              f"({row['cublas_tflops']:.0f} TFLOP/s cuBLAS)", flush=True)
    res["decode_step_gemms_us"] = step
    for m, t in step.items():
        print(f"m={m:5d} decode-step GEMMs, us: cublas {t['cublas']:.0f} cublaslt {t['cublaslt']:.0f} "
              f"best {t['best']:.0f} ({t['cublas'] / t['best']:.3f}x)", flush=True)
    summary(res)
    json.dump(res, open(out_path, "w"), indent=1, default=str)


def step_flops(m: int) -> int:
    """FLOPs of the decode step's GEMMs at m rows: 32 layers of SHAPES' projections and the LM head."""
    return sum(2 * m * n * k * (1 if name == "lm_head" else 32) for name, (n, k) in SHAPES.items())


def summary(res: dict, rate_tflops: float | None = None) -> None:
    """The decode step's GEMMs over the run's row counts: the best candidate against cuBLAS (over the sum, median,
    how many row counts above 1.02x, the largest), and cuBLAS's TFLOP/s (against rate_tflops if given)."""
    step = {int(m): t for m, t in res["decode_step_gemms_us"].items()}
    ratios = {m: t["cublas"] / t["best"] for m, t in step.items()}
    top = max(ratios, key=ratios.get)
    over_sum = sum(t["cublas"] for t in step.values()) / sum(t["best"] for t in step.values())
    print(f"best / cuBLAS over {len(step)} row counts: sum {over_sum:.3f}x, "
          f"median {statistics.median(ratios.values()):.3f}x, above 1.02x at {sum(r > 1.02 for r in ratios.values())}, "
          f"largest {ratios[top]:.2f}x at {top} rows")
    for m in sorted(step):
        tflops = step_flops(m) / step[m]["cublas"] / 1e6
        of_rate = f" = {tflops / rate_tflops:.2f} of {rate_tflops:.0f}" if rate_tflops else ""
        print(f"m={m:5d} cuBLAS decode-step GEMMs {step[m]['cublas']:8.0f} us, {tflops:.0f} TFLOP/s{of_rate}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summary(json.load(open(sys.argv[2])), float(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        main()
