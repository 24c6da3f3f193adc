"""Issue 13's load-test grid on one GPU: no out-of-memory at any accepted setting, memory within the share plus the
stated margin, and the planner's verdict and block count against the engine's.

Grid (llama-3.1-8b, random bf16 weights, one model loaded once and reconfigured per point):
max_num_seqs {256, 1024, 2048} x max_num_batched_tokens {8192, 32768} x gpu_memory_utilization {0.9, 0.95}, then
kv_cache_dtype="fp8" and quantization="int8" at (1024, 16384, 0.9), and (1024, 16384, 0.9) itself (the setting
that died during graph capture before issue 13).

Each point: the planner plans it (gpu="current", this GPU's total), the engine is reconfigured to it (a start-up
OOM is counted), then driven to a full pool with max_num_seqs requests decoding at once: a ballast of KV blocks,
held through the KV manager by requests that never run, leaves room for exactly the prompts and one more block
each, so the pool fills within a few decode steps and preemption follows (the memory of a pool is allocated at
start-up whatever it holds, so the ballast changes no memory figure, only the minutes needed to compute it). Every
request samples with top-k=50 / top-p=0.9 / temperature 0.8 (on the device, Sampler.chunk_rows rows at a time; its
temporaries are in the profile).
A run ends 4 steps after the first preemption. Recorded per point: OOM (start-up or
run), torch's peak reserved bytes + non-torch bytes against gpu_memory_utilization x total + MEMORY_MARGIN_BYTES,
the engine's MemoryProfile, and the planner's verdict and num_gpu_blocks against the engine's (target: equal
verdict, blocks within 1%). Memory figures are not timings, so each point runs once.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/memory_loadtest.py --out data/benchmarks/memory_loadtest_h200.json

Expected: about 5-7 minutes on one H200 (the first start ~30 s, each reconfigure 5-20 s, each run 5-20 s).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.memory import MEMORY_MARGIN_BYTES  # noqa: E402
from engine.request import Request  # noqa: E402
from workbench import planner  # noqa: E402

MODEL = "llama-3.1-8b"
MAX_MODEL_LEN = 2048
PROMPT_LEN, MAX_TOKENS = 64, 48
SAMPLED_EVERY = 1  # every request samples with top-k/top-p


def grid() -> list[dict]:
    points = [dict(max_num_seqs=s, max_num_batched_tokens=t, gpu_memory_utilization=u)
              for s in (256, 1024, 2048) for t in (8192, 32768) for u in (0.9, 0.95)]
    issue = dict(max_num_seqs=1024, max_num_batched_tokens=16384, gpu_memory_utilization=0.9)
    # int8 last: it quantizes the loaded model in place, later bf16 points would rebuild it.
    return points + [issue, {**issue, "kv_cache_dtype": "fp8"}, {**issue, "quantization": "int8"}]


def environment(command: list[str]) -> dict:
    import triton
    import transformers
    dev = torch.cuda.current_device()
    return {"command": " ".join(command), "device_name": torch.cuda.get_device_name(dev),
            "total_bytes": torch.cuda.mem_get_info(dev)[1], "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "memory_margin_bytes": MEMORY_MARGIN_BYTES}


def non_torch_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return (total - free) - torch.cuda.memory_reserved()


def drive(llm: LLM, seed: int, time_limit: float) -> dict:
    """Full pool, max_num_seqs decoding at once, until 4 steps after the first preemption (see the docstring)."""
    eng = llm.engine
    cfg = eng.config
    kv, bs, n_seqs = eng.kv, cfg.block_size, cfg.max_num_seqs
    rng = np.random.default_rng(seed)
    per_request = -(-PROMPT_LEN // bs) + 1  # the prompt and one block of decode
    ballast_blocks = max(kv.num_free_blocks - n_seqs * per_request, 0)
    ballast = Request(f"ballast-{seed}", rng.integers(0, eng.spec.vocab_size, ballast_blocks * bs).tolist(),
                      SamplingParams(max_tokens=1), 0.0)
    if ballast_blocks and not kv.allocate_slots(ballast, ballast_blocks * bs, []):
        raise RuntimeError("could not place the ballast")
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, top_k=50, ignore_eos=True)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    num_requests = n_seqs + n_seqs // 8
    ids = [f"p{seed}-{i}" for i in range(num_requests)]
    for i, rid in enumerate(ids):
        prompt = rng.integers(0, eng.spec.vocab_size, PROMPT_LEN).tolist()
        eng.add_request(rid, prompt, sampled if i % SAMPLED_EVERY == 0 else greedy)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    non_torch_peak = non_torch_bytes()
    steps, first_preemption, max_running, max_used, oom, error = 0, None, 0, 0, False, None
    p0 = eng.scheduler.num_preemptions
    start = time.perf_counter()
    try:
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
            max_running = max(max_running, len(eng.scheduler.running))
            max_used = max(max_used, kv.num_used_blocks)
            non_torch_peak = max(non_torch_peak, non_torch_bytes())
            if first_preemption is None and eng.scheduler.num_preemptions > p0:
                first_preemption = steps
            if first_preemption is not None and steps - first_preemption >= 4:
                break
            if time.perf_counter() - start > time_limit:
                break
    except torch.cuda.OutOfMemoryError as exc:
        oom, error = True, str(exc)[:500]
    except Exception as exc:  # recorded; the next point runs
        error = f"{type(exc).__name__}: {exc}"[:500]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for rid in ids:
        eng.abort_request(rid)
    kv.free(ballast)
    kv.forget(ballast)
    return {"oom": oom, "error": error, "steps": steps, "seconds": seconds, "first_preemption_step": first_preemption,
            "num_preemptions": eng.scheduler.num_preemptions - p0, "max_num_running": max_running,
            "max_kv_usage": max_used / kv.num_blocks, "ballast_blocks": ballast_blocks,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "peak_allocated_bytes":
            torch.cuda.max_memory_allocated(), "non_torch_peak_bytes": non_torch_peak}


def run_point(llm: LLM | None, cfg: EngineConfig, seed: int, time_limit: float) -> tuple[LLM | None, dict]:
    row = {k: v for k, v in cfg.to_dict().items() if k in (
        "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "quantization", "kv_cache_dtype",
        "max_model_len", "block_size", "enforce_eager")}
    try:
        p = planner.plan(MODEL, "current", cfg)
        row.update(planner_verdict=p.verdict, planner_blocks=p.num_gpu_blocks, planner_reason=p.reason,
                   planner_terms={k: getattr(p, k) for k in (
                       "weight_bytes", "static_bytes", "activation_peak_bytes", "graph_pool_bytes", "non_torch_bytes",
                       "margin_bytes", "kv_cache_bytes")})
    except ValueError as exc:
        row.update(planner_verdict="not allowed", planner_blocks=0, planner_reason=str(exc))
    t0 = time.perf_counter()
    try:
        if llm is None:
            llm = LLM.random(MODEL, cfg)
        else:
            llm.reconfigure(cfg)
        started, start_error, start_oom = True, None, False
    except torch.cuda.OutOfMemoryError as exc:
        started, start_error, start_oom = False, str(exc)[:500], True
    except ValueError as exc:
        started, start_error, start_oom = False, str(exc)[:500], False
    row.update(start_seconds=time.perf_counter() - t0, engine_started=started, start_oom=start_oom,
               start_error=start_error)
    if not started:
        row.update(engine_verdict="does not fit", engine_blocks=0, oom=start_oom,
                   verdict_agrees=row["planner_verdict"] != "fits")
        return llm, row
    stats = llm.engine.stats()
    m = stats.memory
    row.update(engine_verdict="fits", engine_blocks=stats.num_gpu_blocks,
               verdict_agrees=row["planner_verdict"] == "fits",
               blocks_rel_error=(row["planner_blocks"] - stats.num_gpu_blocks) / stats.num_gpu_blocks,
               memory_profile=vars(m).copy() if m is not None else None)
    run = drive(llm, seed, time_limit)
    row.update(run)
    share = m.budget_bytes
    row.update(share_bytes=share, limit_bytes=share + MEMORY_MARGIN_BYTES,
               peak_device_bytes=run["peak_reserved_bytes"] + run["non_torch_peak_bytes"])
    row["within_share_plus_margin"] = row["peak_device_bytes"] <= row["limit_bytes"]
    # <= 0: torch's allocations stayed within what the profile left them (a larger peak_device_bytes is the caching
    # allocator's cached blocks or non-torch growth); and how often a step emptied that cache (engine/memory.py).
    row.update(allocated_over_profile_bytes=run["peak_allocated_bytes"] - (share - m.non_torch_bytes - m.margin_bytes),
               reserved_trim_bytes=m.reserved_trim_bytes, num_reserved_trims=m.num_reserved_trims)
    return llm, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON result path")
    ap.add_argument("--points", default=None, help="comma-separated indices into the grid (default: all)")
    ap.add_argument("--run-time-limit", type=float, default=45.0, help="seconds per point's run, at most")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    points = grid()
    chosen = range(len(points)) if args.points is None else [int(i) for i in args.points.split(",")]
    result = {"environment": environment([sys.executable, *sys.argv]), "model": MODEL, "rows": []}
    llm, t_all = None, time.perf_counter()
    for i in chosen:
        cfg = EngineConfig(max_model_len=MAX_MODEL_LEN, **points[i])
        llm, row = run_point(llm, cfg, seed=i, time_limit=args.run_time_limit)
        row["point"] = i
        result["rows"].append(row)
        print(json.dumps({k: row.get(k) for k in (
            "point", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "quantization",
            "kv_cache_dtype", "engine_verdict", "planner_verdict", "engine_blocks", "planner_blocks",
            "blocks_rel_error", "oom", "error", "max_num_running", "num_preemptions", "peak_device_bytes",
            "limit_bytes", "within_share_plus_margin", "allocated_over_profile_bytes", "num_reserved_trims",
            "start_seconds", "seconds")}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    rows = result["rows"]
    ran = [r for r in rows if r.get("engine_started")]
    result["summary"] = {
        "points": len(rows), "oom_count": sum(bool(r.get("oom")) for r in rows),
        "errors": sum(bool(r.get("error")) for r in ran),
        "all_within_share_plus_margin": all(r.get("within_share_plus_margin") for r in ran),
        "max_over_share_bytes": max((r["peak_device_bytes"] - r["share_bytes"] for r in ran), default=None),
        "max_allocated_over_profile_bytes": max((r["allocated_over_profile_bytes"] for r in ran), default=None),
        "num_reserved_trims": sum(r["num_reserved_trims"] for r in ran),
        "verdicts_agree": all(r["verdict_agrees"] for r in rows),
        "max_abs_blocks_rel_error": max((abs(r["blocks_rel_error"]) for r in ran), default=None),
        "all_preempted_with_max_num_seqs_running": all(
            r.get("num_preemptions", 0) > 0 and r.get("max_num_running", 0) >= r["max_num_seqs"] for r in ran),
        "seconds": time.perf_counter() - t_all}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
