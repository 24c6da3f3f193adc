"""The 1000-request ShareGPT-like trace at the engine's defaults with two decode-attention tile rules: the engine's
(engine.kernels.triton_decode.decode_tile, "engine") and an alternative at 32-255 requests, the engine rebuilt with
its CUDA graphs each switch, 3 interleaved rounds: output tok/s, and the steps' duration summed by running requests
(below 32, 32-255, from 256), where the rules differ only in the middle bucket. The alternative:
- bf16 cache (default): "tiles32", 32-token tiles, 4 warps and 3 stages (faster in bench_attention.py's
  decode_batches at equal contexts);
- --kv-cache-dtype fp8: "tiles64", the 64-token tiles, 4 warps and 2 stages that the engine's rule replaced there.
--alt rows_first instead compares the engine's decode-attention program order (heads_first, the default) with the
programs ordered request fastest (heads_first=False), the tile rule unchanged.
On a machine without CUDA: a tiny-model smoke run. (trace_decode_tile_ab_h200.json ran when tiles32 was the engine's
rule: its "new" is tiles32, its "old" the engine's rule now.)

    PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=data/benchmarks python3 benchmarks/trace_decode_tile_ab.py [--kv-cache-dtype fp8]
        [--alt rows_first]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

from engine import LLM, EngineConfig
from engine.kernels import triton_backend, triton_decode
from workbench.bench import run_engine
from workbench.workloads import make_workload

ENGINE = triton_decode.decode_tile
DECODE = triton_backend.decode_attention


def tiles32(num_seqs: int, block_d: int, fp8_kv: bool, on_cuda: bool) -> tuple[int, int, int]:
    """The engine's rule, except 32-token tiles, 4 warps and 3 stages for a bf16 cache at 32-255 requests."""
    if block_d <= 128 and 32 <= num_seqs < 256 and not fp8_kv:
        return 32, 4, (3 if on_cuda else 1)
    return ENGINE(num_seqs, block_d, fp8_kv, on_cuda)


def tiles64(num_seqs: int, block_d: int, fp8_kv: bool, on_cuda: bool) -> tuple[int, int, int]:
    """The engine's rule, except 64-token tiles, 4 warps and 2 stages for an fp8 cache at 32-255 requests."""
    if block_d <= 128 and 32 <= num_seqs < 256 and fp8_kv:
        return 64, 4, (2 if on_cuda else 1)
    return ENGINE(num_seqs, block_d, fp8_kv, on_cuda)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--alt", default="tiles", choices=["tiles", "rows_first"])
    args = ap.parse_args()
    if args.alt == "rows_first":
        alt_name, alt_tile, alt_decode = "rows_first", ENGINE, functools.partial(DECODE, heads_first=False)
    else:
        alt_name, alt_tile = ("tiles64", tiles64) if args.kv_cache_dtype == "fp8" else ("tiles32", tiles32)
        alt_decode = DECODE
    t0 = time.perf_counter()
    cpu = not torch.cuda.is_available()
    llm = LLM.random("tiny" if cpu else "llama-3.1-8b",
                     EngineConfig(device="cpu" if cpu else None, kv_cache_dtype=args.kv_cache_dtype),
                     dtype=torch.float32 if cpu else torch.bfloat16, seed=0)
    wl = make_workload("sharegpt-like", num_requests=6 if cpu else 1000, vocab_size=llm.spec.vocab_size, seed=0)
    runs = []
    for rule in (alt_name, "engine", "engine", alt_name, alt_name, "engine"):
        triton_decode.decode_tile, triton_backend.decode_attention = \
            (alt_tile, alt_decode) if rule == alt_name else (ENGINE, DECODE)
        llm.reconfigure(llm.config)  # recaptures the decode graphs with the rule
        run = run_engine(llm, wl)
        s = run.steps
        bucket = s["num_running"].map(lambda n: "<32" if n < 32 else "32-255" if n < 256 else ">=256")
        by = s.groupby(bucket)["duration"].agg(["sum", "count"])
        r = {"rule": rule, "tok_s": run.summary["output_throughput"],
             "seconds_by_running": {k: float(v) for k, v in by["sum"].items()},
             "steps_by_running": {k: int(v) for k, v in by["count"].items()}}
        runs.append(r)
        print(f"[{time.perf_counter() - t0:5.0f}s] {rule}: {r['tok_s']:.0f} tok/s, step seconds by running requests "
              f"{ {k: round(v, 3) for k, v in r['seconds_by_running'].items()} }", flush=True)
    triton_decode.decode_tile, triton_backend.decode_attention = ENGINE, DECODE
    summary = {}
    for rule in ("engine", alt_name):
        mine = [r for r in runs if r["rule"] == rule]
        tok = [r["tok_s"] for r in mine]
        summary[rule] = {"tok_s_median": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
                         "seconds_by_running_median": {k: statistics.median(r["seconds_by_running"].get(k, 0.0)
                                                                            for r in mine)
                                                       for k in ("<32", "32-255", ">=256")}}
    summary[f"{alt_name}_over_engine"] = summary[alt_name]["tok_s_median"] / summary["engine"]["tok_s_median"]
    print(json.dumps(summary, indent=1), flush=True)
    suffix = ("" if args.kv_cache_dtype == "auto" else f"_{args.kv_cache_dtype}") + \
        ("" if args.alt == "tiles" else f"_{args.alt}")
    out = {"command": f"PYTHONPATH=. python3 benchmarks/trace_decode_tile_ab.py --kv-cache-dtype {args.kv_cache_dtype}"
                      f" --alt {args.alt}",
           "device": "cpu" if cpu else torch.cuda.get_device_name(), "config": {
               "max_num_seqs": llm.config.max_num_seqs, "max_num_batched_tokens": llm.config.max_num_batched_tokens,
               "kv_cache_dtype": args.kv_cache_dtype}, "runs": runs, "summary": summary}
    with open(os.path.join(os.environ.get("OUT", "."), f"trace_decode_tile_ab{suffix}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
