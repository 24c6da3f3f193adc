"""NVML sampler overhead on engine throughput (target < 1%), llama-3.1-8b preset on the GPU.

    PYTHONPATH=. python3 benchmarks/telemetry_overhead.py --out data/benchmarks/telemetry_overhead.json [--repeats 5]

Runs with and without the sampler are interleaved in alternating order (`workbench.telemetry.measure_overhead`);
prints the medians with their min-max and whether the difference is within that noise; writes JSON with
the command, device and versions to --out. About 2-3 minutes on one H100/H200.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from workbench.bench import environment
from workbench.telemetry import measure_overhead
from workbench.workloads import make_workload

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="telemetry_overhead.json", help="JSON file to write (default: %(default)s)")
ap.add_argument("--repeats", type=int, default=5, help="runs with and without the sampler, each (default: 5)")
ap.add_argument("--interval", type=float, default=0.1, help="NVML sampling interval, s (default: 0.1)")
args = ap.parse_args()
llm = LLM.random("llama-3.1-8b", EngineConfig())
wl = make_workload("sharegpt-like", num_requests=200, vocab_size=llm.spec.vocab_size, seed=0)
r = measure_overhead(llm, wl, interval=args.interval, repeats=args.repeats)
result = {**r, "command": " ".join([Path(sys.executable).name] + sys.argv),
          "environment": environment(torch.device("cuda")), "workload": wl.summary()}
print(f"without sampler: median {r['throughput_off']:.0f} tok/s (min-max {r['range_off'][0]:.0f}-{r['range_off'][1]:.0f})")
print(f"with sampler:    median {r['throughput_on']:.0f} tok/s (min-max {r['range_on'][0]:.0f}-{r['range_on'][1]:.0f})")
print(f"overhead {r['overhead_pct']:.2f}% of median throughput (target < 1%); "
      f"{'within' if r['within_noise'] else 'outside'} run-to-run noise ({args.repeats} runs each)")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(result, indent=2, default=str))
