"""NVML sampler overhead on engine throughput (target < 1%), llama-3.1-8b preset on the GPU.

    PYTHONPATH=. python3 benchmarks/telemetry_overhead.py [--out DIR]
"""
import argparse
import json
import os
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from workbench.bench import environment
from workbench.telemetry import measure_overhead
from workbench.workloads import make_workload

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "data/benchmarks"))
args = ap.parse_args()
llm = LLM.random("llama-3.1-8b", EngineConfig())
wl = make_workload("sharegpt-like", num_requests=200, vocab_size=llm.spec.vocab_size, seed=0)
result = {**measure_overhead(llm, wl, interval=0.1, repeats=3), "environment": environment(torch.device("cuda")),
          "workload": wl.summary()}
print(json.dumps({k: v for k, v in result.items() if k != "environment"}, default=str))
Path(args.out).mkdir(parents=True, exist_ok=True)
(Path(args.out) / "telemetry_overhead.json").write_text(json.dumps(result, indent=2, default=str))
