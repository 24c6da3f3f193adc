"""Where a decode step's time goes at one batch size and quantization mode: deep mode (torch.profiler) over 16
decode steps of `--batch` requests (128 in / 64 out; all options below), kernel classes against their roofline and
the top kernels.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_profile.py --quantization fp8 --batch 256 \
        --out data/benchmarks/decode_profile_fp8_b256.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from throughput_targets import deep, log
from workbench.bench import environment
from workbench.profiling import measure_rates
from workbench.workloads import fixed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--quantization", default="none", help="none or an EngineConfig.quantization mode")
    ap.add_argument("--batch", default="256", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--first-step", type=int, default=24, help="the profiled window's first step")
    ap.add_argument("--steps", type=int, default=16, help="steps in the profiled window")
    ap.add_argument("--out", default="data/benchmarks/decode_profile.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    rates = measure_rates(device)
    quant = None if args.quantization == "none" else args.quantization
    llm = LLM.random(args.model, EngineConfig(max_model_len=4096, quantization=quant), dtype=torch.bfloat16, seed=0)
    result = {"command": " ".join(["python3"] + sys.argv), "environment": environment(device), "rates": rates,
              "quantization": args.quantization, "batches": {}}
    for b in (int(x) for x in args.batch.split(",")):
        wl = fixed(num_requests=b, prompt_len=args.prompt_len, output_len=args.output_len,
                   vocab_size=llm.spec.vocab_size, seed=b)
        deep(llm, wl, rates, 0, 2)  # warm-up: tuning and compiles outside the measured window
        result["batches"][b] = d = deep(llm, wl, rates, args.first_step, args.steps)
        log(f"{args.quantization} batch {b}: {d['per_step_ms']:.3f} ms per step ({d['mean_batched_tokens']:.0f} "
            f"tokens)\n{d['table']}\n" + "\n".join(f"  {k['ms'] / 16:8.3f} ms/step {k['calls'] // 16:4d}x "
                                                  f"{k['class']:16s} {k['name'][:90]}" for k in d["top_kernels"]))
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
