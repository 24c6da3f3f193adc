"""The engine behind its own HTTP server vs the same engine in-process, on the same traffic.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/serve_bench.py --out data/benchmarks/serve_bench_h200.json

One workload (sharegpt-like lengths, outputs clipped to --max-len, Poisson arrivals at --request-rate)
is replayed --runs times against each side, interleaved (server, in-process, in-process, server, ...):

- server: ``python -m engine serve`` in a subprocess, load-tested over streaming HTTP by
  `workbench.loadtest_http.run_loadtest` (TTFT from the client's clock, from the scheduled send time);
- in-process: an LLM in this process, driven by `workbench.trace_replay.replay` (engine timestamps).

Both sides use the same EngineConfig (incl. a fixed num_gpu_blocks, so both have the same KV pool), the
same random weights (seed 0) and one unmeasured warm-up run. Prints medians over the runs with their
spread (min..max) and the targets: server output tok/s within 10% of in-process, TTFT p50 within 20 ms.
Writes JSON (command, device, versions, every run) to --out. About 4-5 minutes on one H200.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from engine.serve.background import free_port
from workbench import metrics
from workbench.bench import environment
from workbench.loadtest_http import run_loadtest
from workbench.server_sweep import stop_server, wait_healthy
from workbench.trace_replay import replay, warm_up
from workbench.workloads import make_workload

KEYS = ("output_throughput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "e2e_p50_ms",
        "num_finished", "num_steps")


def in_process_run(llm, workload) -> dict:
    llm.engine.reset_stats()
    run = replay(llm.engine, workload)
    req = metrics.request_frame(run.outputs)
    return {**metrics.throughput(req, run.duration), **metrics.latency_summary(req), "duration_s": run.duration,
            "num_steps": llm.engine.stats().num_steps, "num_failed": 0}


def server_run(url, name, workload, warmup=False) -> dict:
    res = run_loadtest(url, name, workload, scrape_interval=0.5, telemetry=False, warmup=warmup)
    if res.failures:
        print(f"  {len(res.failures)} failed requests, first: {res.failures[0]}", flush=True)
    return res.row


def summarize(runs: list[dict]) -> dict:
    out = {}
    for k in KEYS:
        v = [r[k] for r in runs]
        out[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="preset (random weights) or checkpoint folder")
    ap.add_argument("--request-rate", type=float, default=8.0, help="Poisson arrivals, requests/s (default 8)")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512, help="prompt and output lengths are clipped to this")
    ap.add_argument("--mean-prompt-len", type=float, default=161.0)
    ap.add_argument("--mean-output-len", type=float, default=338.0)
    ap.add_argument("--runs", type=int, default=3, help="measured runs per side (default 3)")
    ap.add_argument("--num-gpu-blocks", type=int, default=4096, help="KV pool of both sides (default 4096)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                    help="each side's share of the GPU: both are loaded at once (default 0.45)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--out", default="data/benchmarks/serve_bench.json")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = EngineConfig(num_gpu_blocks=args.num_gpu_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                       max_model_len=2 * args.max_len + 64, device=device.type)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "engine", "serve", "--model", args.model, "--served-model-name", "bench",
           "--port", str(port), "--num-gpu-blocks", str(cfg.num_gpu_blocks), "--gpu-memory-utilization",
           str(cfg.gpu_memory_utilization), "--max-model-len", str(cfg.max_model_len), "--device", device.type]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".server.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        why = wait_healthy(url, server, 600)
        if why:
            raise SystemExit(f"{why}; see {log_path}")
        print(f"server up in {time.perf_counter() - t0:.0f} s: {shlex.join(cmd)}", flush=True)
        t1 = time.perf_counter()
        llm = LLM.from_pretrained(args.model, cfg) if Path(args.model).is_dir() else LLM.random(args.model, cfg)
        print(f"in-process LLM loaded in {time.perf_counter() - t1:.0f} s", flush=True)
        vocab = llm.spec.vocab_size
        w = make_workload("sharegpt-like", num_requests=args.num_requests, max_len=args.max_len, vocab_size=vocab,
                          mean_prompt_len=args.mean_prompt_len, mean_output_len=args.mean_output_len, seed=0).with_arrival("poisson", request_rate=args.request_rate, seed=0)
        warm = make_workload("fixed", num_requests=16, prompt_len=min(64, args.max_len),
                             output_len=min(16, args.max_len), vocab_size=vocab,
                             seed=99).with_arrival("poisson", request_rate=args.request_rate, seed=99)
        server_run(url, "bench", warm, warmup=True)  # the same waves as warm_up, then the warm-up trace
        warm_up(llm.engine, cfg)
        in_process_run(llm, warm)
        llm.engine.reset_stats()
        runs = {"server": [], "in_process": []}
        for i in range(args.runs):
            order = ("server", "in_process") if i % 2 == 0 else ("in_process", "server")
            for side in order:
                row = server_run(url, "bench", w) if side == "server" else in_process_run(llm, w)
                # num_steps (the server's from /metrics): more, smaller steps on one side shows where time went
                runs[side].append({k: row.get(k) for k in (*KEYS, "duration_s", "num_failed", "num_steps",
                                                           "generation_tokens_scraped")})
                print(f"run {i} {side:10s} " + "  ".join(f"{k}={row[k]:.4g}" for k in KEYS), flush=True)
        summary = {side: summarize(r) for side, r in runs.items()}
        s, p = summary["server"], summary["in_process"]
        tput_ratio = s["output_throughput"]["median"] / p["output_throughput"]["median"]
        ttft_diff = s["ttft_p50_ms"]["median"] - p["ttft_p50_ms"]["median"]
        targets = {"output_throughput_ratio": tput_ratio, "output_throughput_within_10pct": abs(tput_ratio - 1) <= 0.10,
                   "ttft_p50_diff_ms": ttft_diff, "ttft_p50_within_20ms": abs(ttft_diff) <= 20.0}
    finally:
        stop_server(server)
    for side in ("server", "in_process"):
        print(f"{side:10s} " + "  ".join(f"{k} {v['median']:.4g} [{v['min']:.4g}..{v['max']:.4g}]"
                                         for k, v in summary[side].items()))
    print(f"server / in-process output tok/s: {tput_ratio:.3f} (target 0.90..1.10: "
          f"{'PASS' if targets['output_throughput_within_10pct'] else 'FAIL'})")
    print(f"server - in-process TTFT p50: {ttft_diff:+.1f} ms (target within 20 ms: "
          f"{'PASS' if targets['ttft_p50_within_20ms'] else 'FAIL'})")
    versions = {}
    for mod in ("fastapi", "uvicorn", "starlette", "httpx", "httpx_sse", "prometheus_client", "pydantic"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    result = {"command": shlex.join([sys.executable, *sys.argv]), "server_command": shlex.join(cmd),
              "environment": environment(device), "serve_versions": versions, "config": cfg.to_dict(),
              "workload": w.summary(), "runs": runs, "summary": summary, "targets": targets,
              "server_log": str(log_path)}
    out.write_text(json.dumps(result, indent=2, default=str))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / out.name).write_text(out.read_text())
    print(f"results: {out}")


if __name__ == "__main__":
    main()
