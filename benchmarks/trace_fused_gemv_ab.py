"""The 1000-request ShareGPT-like trace with the fused decode GEMVs on and off (ENGINE_FUSED_GEMV=1/0, the engine
rebuilt with its CUDA graphs each switch), 2 interleaved rounds (on off, off on): output tok/s, host time, hidden
host time, device gaps, and the 8 steps with the most host time. The fused kernels only run at <= 4 rows (the
trace's tail), so this checks that they cost the big batches nothing. On a machine without CUDA: a tiny-model
smoke run of the script.

    PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=data/benchmarks python3 benchmarks/trace_fused_gemv_ab.py
"""
from __future__ import annotations

import json
import os
import time

import torch

from engine import LLM, EngineConfig
from engine.timeline import device_gaps
from workbench.bench import run_engine
from workbench.workloads import make_workload

T0 = time.perf_counter()
CPU = not torch.cuda.is_available()
llm = LLM.random("tiny" if CPU else "llama-3.1-8b", EngineConfig(max_model_len=4096, device="cpu" if CPU else None),
                 dtype=torch.float32 if CPU else torch.bfloat16, seed=0)
wl = make_workload("sharegpt-like", num_requests=6 if CPU else 1000, vocab_size=llm.spec.vocab_size, seed=0)
res = []
for rnd in range(2):
    for flag in (("1", "0") if rnd == 0 else ("0", "1")):
        os.environ["ENGINE_FUSED_GEMV"] = flag
        llm.reconfigure(llm.config)
        run = run_engine(llm, wl)
        s = run.steps
        print(f"[{time.perf_counter() - T0:5.0f}s] fused={flag}: {run.summary['output_throughput']:.0f} tok/s "
              f"host {s['host_time'].sum():.2f} hidden {s['hidden_host_time'].sum():.2f}", flush=True)
        try:
            gaps = [g for g in device_gaps(run.stats.steps) if g == g]
            top = s.sort_values("host_time", ascending=False).head(8)
            cols = [c for c in ("num_running", "num_batched_tokens", "num_prefill_tokens", "cuda_graph", "host_time",
                                "hidden_host_time", "schedule_time", "prepare_time", "launch_time", "sample_time",
                                "output_time", "token_wait_time") if c in s.columns]
            r = {"fused": flag, "tok_s": run.summary["output_throughput"], "host_s": float(s["host_time"].sum()),
                 "hidden_s": float(s["hidden_host_time"].sum()), "gap_s": sum(gaps),
                 "graphed_steps": int(s["cuda_graph"].sum()), "steps": len(s),
                 "host_by_graph": s.groupby("cuda_graph")["host_time"].agg(["sum", "count", "median"]).to_dict(),
                 "phases_s": {c: float(s[c].sum()) for c in cols if c.endswith("_time")},
                 "top": top[cols].to_dict("records")}
            res.append(r)
            print(f"[{time.perf_counter() - T0:5.0f}s] fused={flag}: {r['tok_s']:.0f} tok/s host {r['host_s']:.2f} s hidden "
                  f"{r['hidden_s']:.2f} gap {r['gap_s']:.2f} graphed {r['graphed_steps']}/{r['steps']}\n  phases "
                  f"{ {k: round(v, 2) for k, v in r['phases_s'].items()} }\n  by graph {r['host_by_graph']}", flush=True)
            for row in r["top"][:5]:
                print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        except Exception as exc:
            print("analysis failed", repr(exc), list(s.columns), flush=True)
        json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "trace_fused_gemv_ab.json"), "w"), indent=1, default=str)
