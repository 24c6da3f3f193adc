"""Is the first measured run as fast as the next ones? (workbench's warm_up must compile every kernel variant.)

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/warmup_check.py [--model llama-3.1-8b] [--runs 2]
In one fresh process: `run_engine` (which calls `warm_up` once) on --runs offline workloads of 128 x
(256 + 128) tokens. Prints, per run, output tok/s, TTFT p50, the slowest steps (index, ms, host ms,
batched tokens, prefill tokens), and the first run's throughput over the last one's (the baseline,
measured in the same process). Writes JSON to $OUT (when set) and data/benchmarks/warmup_check_<model>.json.
"""
import argparse
import json
import os
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from workbench.bench import environment, run_engine
from workbench.workloads import fixed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm = LLM.random(args.model, EngineConfig(max_model_len=1024))
    result = {"environment": environment(device), "model": args.model, "runs": []}
    for i in range(args.runs):
        wl = fixed(num_requests=128, prompt_len=256, output_len=128, vocab_size=llm.vocab_size, seed=1 + i)
        run = run_engine(llm, wl, warmup=i == 0)
        steps = run.steps.sort_values("duration", ascending=False).head(4)
        row = {"output_tok_s": run.summary["output_throughput"], "ttft_p50_ms": run.summary["ttft_p50_ms"],
               "slowest_steps": [{"step": int(k), "ms": d * 1e3, "host_ms": h * 1e3, "tokens": int(n),
                                  "prefill_tokens": int(p)}
                                 for k, d, h, n, p in zip(steps.index, steps.duration, steps.host_time,
                                                          steps.num_batched_tokens, steps.num_prefill_tokens)]}
        result["runs"].append(row)
        print(i, json.dumps(row), flush=True)
    first, last = result["runs"][0], result["runs"][-1]
    result["first_over_last_throughput"] = first["output_tok_s"] / last["output_tok_s"]
    print(f"first run / last run throughput: {result['first_over_last_throughput']:.3f}")
    for d in {Path(os.environ.get("OUT", "data/benchmarks")), Path("data/benchmarks")}:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"warmup_check_{args.model}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
