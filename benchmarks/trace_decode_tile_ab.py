"""The 1000-request ShareGPT-like trace at the engine's defaults with the engine's decode-attention tile rule
(engine.kernels.triton_decode.decode_tile, "engine") and one or more alternatives, the engine rebuilt with its CUDA
graphs each switch, 3 interleaved rounds (each round runs every rule once, in a rotated order): output tok/s, and
the steps' duration summed by running requests (below 32, 32-255, from 256). The alternatives (--alt, comma-separated):
- "tiles" (the default): for a bf16 cache "tiles32", 32-token tiles, 4 warps and 3 stages at 32-255 requests
  (faster in bench_attention.py's decode_batches at equal contexts); for --kv-cache-dtype fp8 "tiles64", the
  64-token tiles, 4 warps and 2 stages that the engine's rule replaced there;
- "tiles128": 128-token tiles, 4 warps and 2 stages at 32-255 requests (0.98 of copy bandwidth at
  64 requests x 4096 in attention_batches_h200_run2.json; the engine's rule since trace_decode_tile_ab_tiles128_h200.json,
  whose "engine" ran 64-token tiles there);
- "tiles128_all": the same from 32 requests up (the engine's rule takes 64-token tiles and 2 warps from 256);
- "rows_first": the engine's tile rule with the programs ordered request fastest (heads_first=False; the engine
  orders them KV head fastest);
- "batch_order": the engine's tile rule with the decode rows in the batch's order (the engine's programs take them
  longest context first, AttentionMetadata.decode_order);
- "prefill_grid": prefill attention over its grid of every request by the longest request's query blocks (the
  engine's runs a work list of the (request, query block) pairs, longest request first, AttentionMetadata.prefill_work);
- "prefill_tile=mBM_nBN_wW_sS" (a name of benchmarks/prefill_trace_ab.py --scan): the prefill kernel's CUDA tile
  (triton_prefill.GPU_TILE, which the runner's work list follows) block_m BM, block_n BN, W warps, S stages.
Each run also sums the duration of the steps that hold prefill tokens.
On a machine without CUDA: a tiny-model smoke run. (trace_decode_tile_ab_h200.json ran when tiles32 was the engine's
rule: its "new" is tiles32, its "old" the engine's rule now.)

    PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=data/benchmarks python3 benchmarks/trace_decode_tile_ab.py [--kv-cache-dtype fp8]
        [--alt tiles|tiles128|tiles128_all|rows_first|batch_order|prefill_grid|prefill_tile=mBM_nBN_wW_sS[,...]]
        [--rounds 3]
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
from engine.kernels import triton_backend, triton_decode, triton_prefill
from workbench.bench import run_engine
from workbench.workloads import make_workload

ENGINE = triton_decode.decode_tile
DECODE = triton_backend.decode_attention
PREFILL = triton_backend.prefill_attention
TILE = triton_prefill.GPU_TILE


def _rule(name: str, lo: int, hi: int, tile: tuple[int, int, int]):
    """The engine's rule, except `tile` (block_n, warps, stages on CUDA) for lo <= requests < hi (the run's one cache
    dtype: the rule cannot tell them apart)."""
    def rule(num_seqs: int, block_d: int, on_cuda: bool) -> tuple[int, int, int]:
        if block_d <= 128 and lo <= num_seqs < hi:
            return tile[0], tile[1], (tile[2] if on_cuda else 1)
        return ENGINE(num_seqs, block_d, on_cuda)
    rule.__name__ = name
    return rule


def _batch_order(*args, order=None, **kwargs):
    """decode_attention with the decode rows in the batch's order, whatever order the backend passes."""
    return DECODE(*args, **kwargs)


def _prefill_grid(*args, work=None, **kwargs):
    """prefill_attention over its own grid, whatever work list the backend passes."""
    return PREFILL(*args, **kwargs)


def alternative(name: str, kv_cache_dtype: str) -> tuple[str, object, object, object, tuple]:
    """(its name, its decode tile rule, its decode_attention, its prefill_attention, its prefill tile) for an --alt
    value."""
    if name == "rows_first":
        return name, ENGINE, functools.partial(DECODE, heads_first=False), PREFILL, TILE
    if name == "batch_order":
        return name, ENGINE, _batch_order, PREFILL, TILE
    if name == "prefill_grid":
        return name, ENGINE, DECODE, _prefill_grid, TILE
    if name.startswith("prefill_tile="):
        tile = tuple(int(part[1:]) for part in name.split("=", 1)[1].split("_"))
        return name, ENGINE, DECODE, PREFILL, tile
    if name == "tiles":
        name, tile = ("tiles64", (64, 4, 2)) if kv_cache_dtype == "fp8" else ("tiles32", (32, 4, 3))
        return name, _rule(name, 32, 256, tile), DECODE, PREFILL, TILE
    if name in ("tiles128", "tiles128_all"):
        return name, _rule(name, 32, 256 if name == "tiles128" else 1 << 30, (128, 4, 2)), DECODE, PREFILL, TILE
    raise SystemExit(f"--alt {name!r}: expected tiles, tiles128, tiles128_all, rows_first, batch_order, prefill_grid "
                     f"or prefill_tile=mBM_nBN_wW_sS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--alt", default="tiles",
                    help="comma-separated: tiles, tiles128, tiles128_all, rows_first, batch_order, prefill_grid, "
                         "prefill_tile=mBM_nBN_wW_sS")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rules = {"engine": (ENGINE, DECODE, PREFILL, TILE)}
    for alt in args.alt.split(","):
        name, *rule = alternative(alt.strip(), args.kv_cache_dtype)
        rules[name] = tuple(rule)
    names = list(rules)
    t0 = time.perf_counter()
    cpu = not torch.cuda.is_available()
    llm = LLM.random("tiny" if cpu else "llama-3.1-8b",
                     EngineConfig(device="cpu" if cpu else None, kv_cache_dtype=args.kv_cache_dtype),
                     dtype=torch.float32 if cpu else torch.bfloat16, seed=0)
    wl = make_workload("sharegpt-like", num_requests=6 if cpu else 1000, vocab_size=llm.spec.vocab_size, seed=0)
    runs = []
    for i in range(args.rounds):
        for rule in names[i % len(names):] + names[:i % len(names)]:
            (triton_decode.decode_tile, triton_backend.decode_attention, triton_backend.prefill_attention,
             triton_prefill.GPU_TILE) = rules[rule]
            llm.reconfigure(llm.config)  # recaptures the decode graphs with the rule
            run = run_engine(llm, wl)
            s = run.steps
            bucket = s["num_running"].map(lambda n: "<32" if n < 32 else "32-255" if n < 256 else ">=256")
            by = s.groupby(bucket)["duration"].agg(["sum", "count"])
            r = {"rule": rule, "tok_s": run.summary["output_throughput"],
                 "seconds_by_running": {k: float(v) for k, v in by["sum"].items()},
                 "prefill_steps_s": float(s.loc[s["num_prefill_tokens"] > 0, "duration"].sum()),
                 "steps_by_running": {k: int(v) for k, v in by["count"].items()}}
            runs.append(r)
            print(f"[{time.perf_counter() - t0:5.0f}s] {rule}: {r['tok_s']:.0f} tok/s, step seconds by running "
                  f"requests { {k: round(v, 3) for k, v in r['seconds_by_running'].items()} }, steps with prefill "
                  f"{r['prefill_steps_s']:.3f} s", flush=True)
    (triton_decode.decode_tile, triton_backend.decode_attention, triton_backend.prefill_attention,
     triton_prefill.GPU_TILE) = rules["engine"]
    summary = {}
    for rule in names:
        mine = [r for r in runs if r["rule"] == rule]
        tok = [r["tok_s"] for r in mine]
        summary[rule] = {"tok_s_median": statistics.median(tok), "tok_s_min": min(tok), "tok_s_max": max(tok),
                         "prefill_steps_s_median": statistics.median(r["prefill_steps_s"] for r in mine),
                         "seconds_by_running_median": {k: statistics.median(r["seconds_by_running"].get(k, 0.0)
                                                                            for r in mine)
                                                       for k in ("<32", "32-255", ">=256")}}
    for rule in names[1:]:
        summary[f"{rule}_over_engine"] = summary[rule]["tok_s_median"] / summary["engine"]["tok_s_median"]
    print(json.dumps(summary, indent=1), flush=True)
    suffix = ("" if args.kv_cache_dtype == "auto" else f"_{args.kv_cache_dtype}") + \
        ("" if args.alt == "tiles" else "_" + args.alt.replace(",", "_").replace("=", "_"))
    out = {"command": f"PYTHONPATH=. python3 benchmarks/trace_decode_tile_ab.py --kv-cache-dtype {args.kv_cache_dtype}"
                      f" --alt {args.alt} --rounds {args.rounds}",
           "device": "cpu" if cpu else torch.cuda.get_device_name(), "config": {
               "max_num_seqs": llm.config.max_num_seqs, "max_num_batched_tokens": llm.config.max_num_batched_tokens,
               "kv_cache_dtype": args.kv_cache_dtype}, "runs": runs, "summary": summary}
    with open(os.path.join(os.environ.get("OUT", "."), f"trace_decode_tile_ab{suffix}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
