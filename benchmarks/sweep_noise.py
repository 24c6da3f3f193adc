"""A GPU sweep with repeats: how noisy each point is, whether the winner is a tie, NVML for every point.

    PYTHONPATH=. python3 benchmarks/sweep_noise.py --out sweep_noise.json [--model llama-3.1-8b] [--repeats 3]

Runs `workbench.Sweep` (shared-prefix workload, block_size 16/32 x prefix caching on/off, 3 interleaved runs
per point) and prints, per point, the median output throughput with its min-max and spread, whether the
NVML columns (power, energy per token, SM clock, memory used, temperature, utilisation) were measured, and
the recommendation per objective with its margin and ties. Writes the JSON (with the command, device and
versions) to --out. No plotly needed (no report is written). About 3-4 minutes on one H100/H200.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from workbench import Sweep, recommend, schema
from workbench.bench import environment
from workbench.schema import C

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="sweep_noise.json", help="JSON file to write (default: %(default)s)")
ap.add_argument("--model", default="llama-3.1-8b", help="preset or checkpoint folder (default: %(default)s)")
ap.add_argument("--num-requests", type=int, default=400, help="requests per run (default: %(default)s)")
ap.add_argument("--repeats", type=int, default=3, help="runs per point (default: %(default)s)")
args = ap.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    sweep = Sweep(args.model, "shared-prefix", grid={C.block_size: [16, 32], C.enable_prefix_caching: [True, False]},
                  num_requests=args.num_requests, repeats=args.repeats, out=os.path.join(tmp, "runs.jsonl"),
                  progress=False)
    df = sweep.run()
    sweep.close()
    runs = sweep.runs

points = []
for r in df.to_dict("records"):
    lo, hi = schema.spread(C.output_throughput)
    nvml = {c: r.get(c) for c in schema.NVML_COLUMNS}
    points.append({"label": r[C.label], "status": r[C.status], "error": r.get(C.error),
                   "output_throughput": [r.get(lo), r.get(C.output_throughput), r.get(hi)],
                   "spread_pct": 100 * (r.get(hi, 0) - r.get(lo, 0)) / r[C.output_throughput]
                   if r.get(C.output_throughput) else None,
                   "ttft_p99_ms": r.get(C.ttft_p99_ms), "nvml": nvml,
                   "nvml_measured": all(v is not None and v == v for v in nvml.values())})
    p = points[-1]
    print(f"{p['label']:22s} {p['status']:5s} out tok/s median {r.get(C.output_throughput, float('nan')):8.1f} "
          f"(min-max {r.get(lo, float('nan')):.1f}-{r.get(hi, float('nan')):.1f}, spread {p['spread_pct'] or 0:.1f}%); "
          f"NVML measured: {p['nvml_measured']}; energy/token {r.get(C.energy_per_output_token_j)} J")
recs = recommend.recommendations(df)
for rec in recs:
    print(f"{rec['objective']}: {rec[C.label]} - {rec['value_text']}; {rec['verdict']}")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "environment": environment(device),
          "repeats": args.repeats, "num_requests": args.num_requests, "points": points,
          "recommendations": [{k: v for k, v in rec.items() if k != "ties"} | {"ties": rec["ties"]} for rec in recs],
          "runs": runs.to_dict("records")}
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(result, indent=2, default=str))
print(f"wrote {args.out}")
