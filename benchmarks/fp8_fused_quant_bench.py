"""fp8 W8A8's activation quantization fused into its producers, kernel by kernel, on one GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/fp8_fused_quant_bench.py \
        --out data/benchmarks/fp8_fused_quant_h200.json [--rows 1,16,64,256] [--repeats 5]

Per point (tokens t, Llama-3.1-8B and -70B widths, bfloat16), the device time of one call of:
    norm   "bf16":    add_rms_norm_triton (what the bf16 model runs; the floor)
           "unfused": add_rms_norm_triton, then fp8_quantize_per_token of its output (fp8 before the fusion)
           "fused":   add_rms_norm_fp8 (triton_fp8.py)
    swiglu the same with silu_and_mul_triton / silu_and_mul_fp8 (I = 14336, 28672)
    pertoken           fp8_quantize_per_token of a [t, hidden] row block (o_proj's input: attention's output)
and, as A/B in the same run, each fused kernel with the e4m3 cast rounded to the grid first ("grid_round":
what Triton's interpreter runs, and the GPU kernels ran before the cast went to the conversion instruction),
and the norm and per-token kernels with 16 and 32 warps a program whatever the width ("warps16",
"warps32"; what set _row_launch's rule).
Each is captured 50 times in one CUDA graph (decode runs in graphs, so launch cost on the host is not
counted) and the replay timed with CUDA events; runs are interleaved (every variant once per repeat), the
JSON gives each median with its min-max spread and the saving unfused - fused in microseconds. The fused
codes are also checked against the unfused ones (mismatching codes, counted).

Expected: well under a minute on one H200 (most of it Triton compiles).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels.triton_fused import add_rms_norm_triton, silu_and_mul_triton  # noqa: E402
from engine.quant import triton_fp8  # noqa: E402
from engine.quant.triton_fp8 import add_rms_norm_fp8, fp8_quantize_per_token, silu_and_mul_fp8  # noqa: E402
from workbench.bench import environment, median_spread  # noqa: E402

CALLS_PER_GRAPH = 50
SHAPES = {"llama-3.1-8b": dict(hidden=4096, intermediate=14336),
          "llama-3.1-70b": dict(hidden=8192, intermediate=28672)}


def graphed(fn) -> torch.cuda.CUDAGraph:
    """fn captured CALLS_PER_GRAPH times in one graph, after a warm-up call (compiles) on the side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS_PER_GRAPH):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph) -> float:
    """Microseconds of device time per captured call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()  # warm caches
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH


def patched(fn, **attrs):
    """fn run (and so captured) with triton_fp8's attributes replaced by attrs."""
    def run():
        saved = {name: getattr(triton_fp8, name) for name in attrs}
        for name, value in attrs.items():
            setattr(triton_fp8, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(triton_fp8, name, value)
    return run


def mismatching_codes(fused, unfused) -> int:
    return int((fused[0].view(torch.uint8) != unfused[0].view(torch.uint8)).sum().item())


def point(model: str, t: int, device: torch.device, repeats: int) -> dict:
    shape = SHAPES[model]
    n, inter = shape["hidden"], shape["intermediate"]
    gen = torch.Generator(device=device).manual_seed(t)
    x = torch.randn(t, n, device=device, dtype=torch.bfloat16, generator=gen)
    residual = torch.randn(t, n, device=device, dtype=torch.bfloat16, generator=gen)
    weight = 1 + 0.1 * torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
    h = torch.randn(t, 2 * inter, device=device, dtype=torch.bfloat16, generator=gen)
    o_in = torch.randn(t, n, device=device, dtype=torch.bfloat16, generator=gen)
    variants = {
        ("norm", "bf16"): lambda: add_rms_norm_triton(x, residual, weight, 1e-5),
        ("norm", "unfused"): lambda: fp8_quantize_per_token(add_rms_norm_triton(x, residual, weight, 1e-5)[0]),
        ("norm", "fused"): lambda: add_rms_norm_fp8(x, residual, weight, 1e-5),
        ("swiglu", "bf16"): lambda: silu_and_mul_triton(h),
        ("swiglu", "unfused"): lambda: fp8_quantize_per_token(silu_and_mul_triton(h)),
        ("swiglu", "fused"): lambda: silu_and_mul_fp8(h),
        ("pertoken", "fused"): lambda: fp8_quantize_per_token(o_in),
    }
    # The kernels with the e4m3 cast rounded to the grid first, as the interpreter needs (A/B of HW_CAST).
    for op, fn in [("norm", variants[("norm", "fused")]), ("swiglu", variants[("swiglu", "fused")]),
                   ("pertoken", variants[("pertoken", "fused")])]:
        variants[(op, "grid_round")] = patched(fn, hw_cast=lambda device: False)
    # The one-program-per-token kernels (norm, per-token) with 16 and 32 warps a program whatever the row's width.
    row_launch = triton_fp8._row_launch
    for op, warps in itertools.product(("norm", "pertoken"), (16, 32)):
        variants[(op, f"warps{warps}")] = patched(variants[(op, "fused")],
                                                 _row_launch=lambda k, w=warps: (row_launch(k)[0], w))
    graphs = {key: graphed(fn) for key, fn in variants.items()}
    times = {key: [] for key in variants}
    for _ in range(repeats):
        for key, graph in graphs.items():
            times[key].append(replay_us(graph))
    out = {"model": model, "tokens": t, "hidden": n, "intermediate": inter,
           "norm_mismatching_codes": mismatching_codes(variants[("norm", "fused")](),
                                                       variants[("norm", "unfused")]()),
           "swiglu_mismatching_codes": mismatching_codes(variants[("swiglu", "fused")](),
                                                         variants[("swiglu", "unfused")]())}
    for op in ("norm", "swiglu", "pertoken"):
        out[f"{op}_grid_round_mismatching_codes"] = mismatching_codes(variants[(op, "fused")](),
                                                                      variants[(op, "grid_round")]())
    for (op, variant), ts in times.items():
        out[f"{op}_{variant}_us"] = median_spread(ts)
    for op in ("norm", "swiglu"):
        out[f"{op}_saving_us"] = out[f"{op}_unfused_us"]["median"] - out[f"{op}_fused_us"]["median"]
    del graphs
    return out


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    results = {"environment": environment(device), "calls_per_graph": CALLS_PER_GRAPH, "points": []}
    for model in SHAPES:
        for t in args.rows:
            row = point(model, t, device, args.repeats)
            results["points"].append(row)
            print(f"{model:14s} t={t:4d}  norm bf16/unfused/fused {row['norm_bf16_us']['median']:6.2f} "
                  f"{row['norm_unfused_us']['median']:6.2f} {row['norm_fused_us']['median']:6.2f} us "
                  f"(spread {row['norm_fused_us']['min']:.2f}-{row['norm_fused_us']['max']:.2f}, "
                  f"{row['norm_mismatching_codes']} codes off)  swiglu {row['swiglu_bf16_us']['median']:6.2f} "
                  f"{row['swiglu_unfused_us']['median']:6.2f} {row['swiglu_fused_us']['median']:6.2f} us "
                  f"(spread {row['swiglu_fused_us']['min']:.2f}-{row['swiglu_fused_us']['max']:.2f}, "
                  f"{row['swiglu_mismatching_codes']} codes off)", flush=True)
            print(" " * 22 + "grid-rounded cast: norm {:6.2f}  swiglu {:6.2f}  per-token {:6.2f} -> {:6.2f} us".format(
                *(row[k]["median"] for k in ("norm_grid_round_us", "swiglu_grid_round_us", "pertoken_grid_round_us",
                                             "pertoken_fused_us"))), flush=True)
            print(" " * 22 + "16 / 32 warps a program: norm {:6.2f} {:6.2f}  per-token {:6.2f} {:6.2f} us".format(
                *(row[f"{op}_warps{w}_us"]["median"] for op in ("norm", "pertoken") for w in (16, 32))), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args())
