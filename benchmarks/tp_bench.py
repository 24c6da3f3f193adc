"""Tensor parallelism: throughput and TPOT of one model at each degree, in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/tp_bench.py --model llama-3.1-8b --degrees 1,2
Writes JSON to $OUT (when set) and data/benchmarks/tp_<model>.json.
"""
import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from workbench.bench import environment, run_engine
from workbench.workloads import fixed

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="llama-3.1-8b")
ap.add_argument("--degrees", default="1,2")
ap.add_argument("--num-requests", type=int, default=128)
ap.add_argument("--device", default=None)
args = ap.parse_args()
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
results = {"environment": environment(device), "model": args.model, "runs": {}}
for tp in [int(d) for d in args.degrees.split(",")]:
    t0 = time.perf_counter()
    llm = LLM.random(args.model, EngineConfig(tensor_parallel_size=tp, max_model_len=1024, device=args.device))
    load = time.perf_counter() - t0
    wl = fixed(num_requests=args.num_requests, prompt_len=256, output_len=128, vocab_size=llm.vocab_size, seed=1)
    run = run_engine(llm, wl)
    s = run.summary
    results["runs"][tp] = {"load_s": load, "output_tok_s": s["output_throughput"], "tpot_p50_ms": s["tpot_p50_ms"],
                           "ttft_p50_ms": s["ttft_p50_ms"], "num_gpu_blocks": s["kv_blocks"],
                           "weight_bytes_per_gpu": s["weight_bytes"], "cuda_graphs": s["cuda_graphs"]}
    print(tp, json.dumps(results["runs"][tp]), flush=True)
    llm._release_engine()
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
for d in {Path(os.environ.get("OUT", "data/benchmarks")), Path("data/benchmarks")}:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"tp_{args.model}.json").write_text(json.dumps(results, indent=2, default=str))
