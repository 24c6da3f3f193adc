"""The fused decode GEMV (engine/kernels/triton_gemv.py) against cuBLAS after the separate norm / SwiGLU kernel,
on one GPU (llama-3.1-8b shapes, random bf16 weights):

- kernels: each decoder projection at 1 row with its prologue (qkv and gate_up after the norm, down after
  SwiGLU, o without), every candidate timed by CUDA-graph replay over weights that overflow L2, in 5 interleaved
  rounds (median, min..max); the GEMV's read bandwidth against the measured copy bandwidth;
- engine: decode at batch 1 (128 in / 256 out, issue 17's target TPOT <= 1.15 x weight bytes / copy bandwidth)
  with the fused path on and off (ENGINE_FUSED_GEMV=1/0, the engine rebuilt with its CUDA graphs each switch),
  3 interleaved runs each; the batch-1 graph's replay time; then deep mode (kernel classes per step) for each.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_gemv.py --out data/benchmarks/gemv_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# Every key tuned afresh (the fused-vs-unfused choice is part of what is measured), not read from the tuning cache.
os.environ.setdefault("ENGINE_TUNING_CACHE", "0")

from engine import LLM, EngineConfig
from engine.kernels import triton_gemv
from engine.quant import tuning
from bench_quant import graph_replay_ms
from throughput_targets import decode_batch1, deep
from workbench.bench import environment, median_spread
from workbench.profiling import measure_rates
from workbench.workloads import fixed

T0 = time.perf_counter()
# (name, N, K, prologue) of Llama-3.1-8B's decoder projections
SHAPES = [("qkv_proj", 6144, 4096, "norm"), ("o_proj", 4096, 4096, "none"), ("gate_up_proj", 28672, 4096, "norm"),
          ("down_proj", 4096, 14336, "silu")]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def kernel_part(rates: dict, rounds: int = 5) -> dict:
    out = {}
    for name, n, k, prologue in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(n + k)
        x = torch.randn(1, 2 * k if prologue == "silu" else k, device="cuda", dtype=torch.bfloat16, generator=g)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        norm = torch.nn.Module()
        norm.weight, norm.eps = torch.ones(k, device="cuda", dtype=torch.bfloat16), 1e-5
        residual = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g) if prologue == "norm" else None
        copies = [lin.weight] + [lin.weight.clone() for _ in range(tuning.weight_copies(lin.weight.numel() * 2) - 1)]
        ref = triton_gemv.gemv_reference(x, lin.weight, None, prologue, residual, norm.weight, 1e-5)
        ref = ref[0] if isinstance(ref, tuple) else ref
        samples = {}
        for cfg in triton_gemv.candidates():
            samples[json.dumps(cfg)] = []

        def launch(cfg, w):
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            tuning.chosen[("gemv", prologue, 1, n, k, torch.bfloat16, False, residual is not None)] = cfg
            r = triton_gemv.fused_linear(x, lin, prologue, residual, norm if prologue == "norm" else None)
            return r[0] if isinstance(r, tuple) else r
        errors = {}
        for key in samples:
            got = launch(json.loads(key), copies[0])
            errors[key] = float((got.float() - ref.float()).norm() / ref.float().norm())
        for _ in range(rounds):  # interleaved: each round times every candidate once
            for key in samples:
                cfg = json.loads(key)
                samples[key].append(tuning._graph_time(lambda: [launch(cfg, w) for w in copies], len(copies)) * 1e3)
        tuning.chosen.pop(("gemv", prologue, 1, n, k, torch.bfloat16, False, residual is not None), None)
        lin.weight = torch.nn.Parameter(copies[0], requires_grad=False)
        timed = {key: median_spread(v) for key, v in samples.items()}
        unfused = timed[json.dumps({"kernel": "unfused"})]["median"]
        best = min((key for key in timed if "gemv" in key), key=lambda key: timed[key]["median"])
        gbps = n * k * 2 / (timed[best]["median"] * 1e-6) / 1e9
        out[name] = {"n": n, "k": k, "prologue": prologue, "us": timed, "rel_err": errors, "best_gemv": json.loads(best),
                     "unfused_over_best_gemv": unfused / timed[best]["median"], "best_gemv_read_GBps": gbps,
                     "best_gemv_over_copy_bw": gbps * 1e9 / rates["copy_bandwidth"]}
        log(f"{name} ({prologue}): unfused {unfused:.1f} us, best GEMV {best} {timed[best]['median']:.1f} us "
            f"({timed[best]['min']:.1f}..{timed[best]['max']:.1f}): {unfused / timed[best]['median']:.2f}x; "
            f"{gbps:.0f} GB/s = {gbps * 1e9 / rates['copy_bandwidth']:.2f} of copy; max rel err "
            f"{max(errors.values()):.1e}")
    return out


def engine_part(rates: dict, runs: int) -> dict:
    llm = LLM.random("llama-3.1-8b", EngineConfig(max_model_len=4096), dtype=torch.bfloat16, seed=0)
    modes = {"fused": "1", "unfused": "0"}
    res = {m: {"tpot_s": [], "graph_ms": [], "ratio": []} for m in modes}
    for rnd in range(runs):
        for m, flag in (modes.items() if rnd % 2 == 0 else list(modes.items())[::-1]):
            os.environ["ENGINE_FUSED_GEMV"] = flag
            llm.reconfigure(llm.config)  # recaptures the CUDA graphs with (or without) the fused GEMVs
            d = next(iter(decode_batch1(llm, rates, 1, [None]).values()))
            res[m]["tpot_s"].append(d["tpot_s"]["median"])
            res[m]["ratio"].append(d["ratio"])
            res[m]["graph_ms"].append(graph_replay_ms(llm))
            log(f"round {rnd + 1} {m}: TPOT {d['tpot_s']['median'] * 1e3:.3f} ms = {d['ratio']:.3f}x the weight read "
                f"({d['weight_read_s'] * 1e3:.2f} ms); graph replay {res[m]['graph_ms'][-1]:.3f} ms")
    out = {m: {k: median_spread(v) for k, v in r.items()} for m, r in res.items()}
    out["weight_read_s"] = d["weight_read_s"]
    wl = fixed(num_requests=1, prompt_len=128, output_len=256, vocab_size=llm.spec.vocab_size, seed=1)
    for m, flag in modes.items():
        os.environ["ENGINE_FUSED_GEMV"] = flag
        llm.reconfigure(llm.config)
        out[m]["deep"] = dp = deep(llm, wl, rates, 16, 16)
        log(f"deep mode, {m}, {dp['per_step_ms']:.3f} ms per step:\n{dp['table']}")
    os.environ.pop("ENGINE_FUSED_GEMV")
    out["chosen"] = {str(k): v for k, v in tuning.chosen.items() if k[0] == "gemv"}
    f, u = out["fused"]["tpot_s"]["median"], out["unfused"]["tpot_s"]["median"]
    log(f"TPOT fused {f * 1e3:.3f} ms ({out['fused']['ratio']['median']:.3f}x) vs unfused {u * 1e3:.3f} ms "
        f"({out['unfused']['ratio']['median']:.3f}x): {u / f:.3f}x faster; target <= 1.15x: "
        f"{'met' if out['fused']['ratio']['median'] <= 1.15 else 'MISSED'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/benchmarks/gemv.json")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parts", default="kernels,engine")
    args = ap.parse_args()
    env = environment(torch.device("cuda"))
    result = {"command": " ".join(["python3"] + sys.argv), "environment": env}
    rates = measure_rates(torch.device("cuda"))
    result["rates"] = rates
    log(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}; copy {rates['copy_bandwidth'] / 1e12:.2f} TB/s")
    save = lambda: Path(args.out).write_text(json.dumps(result, indent=1, default=str))  # noqa: E731
    if "kernels" in args.parts:
        result["kernels"] = kernel_part(rates)
        save()
    if "engine" in args.parts:
        result["engine"] = engine_part(rates, args.runs)
        save()
    log("done")


if __name__ == "__main__":
    main()
