"""The ShareGPT-like trace's floor with every kernel at its roofline, one after another (no GPU needed).

    PYTHONPATH=. python3 benchmarks/trace_floor.py [--model llama-3.1-8b] [--num-requests 1000] \
        [--matmul-tflops 787] [--copy-tbps 4.22] [--target 20000]

`bench` prints "limit / measured" against the trace's absolute limit: its FLOPs, with the weights read once per
step of the fewest steps. That limit leaves out two costs no schedule avoids: a decode step reads every weight
however few requests it carries, and decode attention reads every request's K/V once per step, next to GEMMs
that are compute-bound. `workbench.profiling.serial_limit_time` counts both on a run's own steps (each step's
GEMMs, then its attention, each at its roofline: `bench.step_limits`' serial_time). This asks the same of the
best schedule there is, before any run: every prompt prefilled in one step, then every request decoding from the
next step on, one token a step (the default 1024 / 16384 settings admit all 1000 within the first steps).

Default rates: what `throughput_targets.py` measured on one H200 (throughput_targets_h200_s8.log).
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from engine.model.presets import preset_config
from engine.model.spec import ModelSpec
from workbench.bench import step_limits
from workbench.workloads import make_workload


def ideal_steps(prompt_lens: np.ndarray, output_lens: np.ndarray) -> pd.DataFrame:
    """The engine's step counters (num_batched_tokens, num_sampled_tokens, num_attention_scores,
    num_kv_tokens_read) of the best schedule: one prefill step of every prompt (causal scores, each prompt's K/V
    read once, the first output token sampled), then decode step t for the requests with more than t + 1
    output tokens, each scoring and reading its context (prompt + t + 1 tokens before the new one)."""
    p = prompt_lens.astype(np.int64)
    rows = [dict(num_batched_tokens=int(p.sum()), num_sampled_tokens=len(p),
                 num_attention_scores=int((p * (p + 1) // 2).sum()), num_kv_tokens_read=0)]
    for t in range(int(output_lens.max()) - 1):
        alive = output_lens > t + 1
        ctx = int((p[alive] + t + 1).sum())
        rows.append(dict(num_batched_tokens=int(alive.sum()), num_sampled_tokens=int(alive.sum()),
                         num_attention_scores=ctx + int(alive.sum()), num_kv_tokens_read=ctx))
    return pd.DataFrame(rows)


def trace_floor(spec: ModelSpec, prompt_lens: np.ndarray, output_lens: np.ndarray, rates: dict,
                dtype_bytes: int = 2) -> dict:
    """Seconds of the best schedule's steps at `bench.step_limits`' serial_time: the prefill step, the decode
    steps, and both; with the output tokens they make."""
    limits = step_limits(ideal_steps(prompt_lens, output_lens), spec, spec.weight_bytes(dtype_bytes),
                         spec.kv_bytes_per_token(dtype_bytes), rates)["serial_time"]
    return {"prefill_s": float(limits.iloc[0]), "decode_s": float(limits.iloc[1:].sum()),
            "floor_s": float(limits.sum()), "output_tokens": int(output_lens.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--matmul-tflops", type=float, default=787.0)
    ap.add_argument("--copy-tbps", type=float, default=4.22)
    ap.add_argument("--target", type=float, default=20000.0, help="an output tok/s to compare with the floor")
    args = ap.parse_args()
    if args.matmul_tflops <= 0 or args.copy_tbps <= 0 or args.target <= 0:
        ap.error("--matmul-tflops, --copy-tbps and --target must be > 0")
    spec = ModelSpec.from_hf_config(preset_config(args.model))
    wl = make_workload("sharegpt-like", num_requests=args.num_requests, vocab_size=spec.vocab_size, seed=0)
    prompts = np.array([r.prompt_len for r in wl])
    outputs = np.array([r.max_tokens for r in wl])
    rates = {"matmul_flops": args.matmul_tflops * 1e12, "copy_bandwidth": args.copy_tbps * 1e12}
    f = trace_floor(spec, prompts, outputs, rates)
    best = f["output_tokens"] / f["floor_s"]
    print(f"{args.model}, {len(wl)} ShareGPT-like requests ({prompts.sum()} prompt, {f['output_tokens']} output "
          f"tokens), {args.matmul_tflops:g} TFLOP/s, {args.copy_tbps:g} TB/s:")
    print(f"  prefill {f['prefill_s']:.2f} s + decode {f['decode_s']:.2f} s = floor {f['floor_s']:.2f} s, "
          f"{best:,.0f} out tok/s")
    print(f"  {args.target:,.0f} out tok/s takes {f['output_tokens'] / args.target:.2f} s: "
          f"{f['floor_s'] * args.target / f['output_tokens']:.3f} of the floor's speed")


if __name__ == "__main__":
    main()
