"""Sliding-window paged KV on one GPU: concurrent 4096-token requests of gemma-3-12b vs the same model without windows.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/sliding_window_capacity.py --out data/benchmarks/sliding_window_h200.json

gemma-3-12b (random bf16 weights; 40 sliding layers of window 1024, 8 global) against the same config with every
layer global ("no-window": the same size, the same KV bytes per token). Per variant, one engine
(EngineConfig(max_model_len=4096, block_size=16, max_num_batched_tokens=16384, enforce_eager=True)):

- pool: the engine's own KV pool (num_gpu_blocks, sized from this GPU's memory) and its own manager: requests of
  4096 tokens are allocated one after another through engine.kv exactly as the scheduler allocates them (prefill
  in chunks of max_num_batched_tokens, then decode to 4096 tokens), each kept, until an allocation fails; the count
  is the concurrent 4096-token requests the pool holds. Done --repeats times (a deterministic count: the spread
  shows it is one), the pool returning to 0 used blocks each time.
- planner: workbench.planner.plan for the same config on this GPU ("current"), its max_concurrent_requests.
- run (skip with --no-run): the real engine runs that many requests at once (prompts of 4048 tokens, 49 tokens each
  to reach 4096; max_num_seqs = the pool's count): peak of running requests, preemptions, peak used blocks.

The planner counts a sliding group's worst case, cdiv(W - 1, 16) + 1 = 65 blocks (the window straddling one block
more than it fills, as it does at most positions); a request that ends exactly at 4096 tokens holds 64 there, so the
pool's count can exceed the planner's by about 1%. The run admits requests while others still prefill, so a few
may wait or be preempted (a prefill chunk holds all its blocks in every group until the next step frees them).

Target (issue 19): sliding / no-window >= 1.5 (expected ~2.6: 6 x 256 / (256 + 5 x 65)), the pool and the planner
agreeing (their ratios within 5%). Expected runtime on an H200: about 2.5 minutes with the run, 1 without.

--tensor-parallel-size 2 (two GPUs): the same at TP=2, where every rank keeps the KV cache groups over its half of
the KV heads (rank 0's per-group block tables broadcast each step): a request holds the same blocks of the pool as
at TP=1 (blocks_per_request), each rank's pool has about twice TP=1's blocks (half the KV bytes per token), and the
sliding / no-window ratio stays ~2.6, the planner agreeing:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/sliding_window_capacity.py --tensor-parallel-size 2 \
        --out data/benchmarks/sliding_window_tp2_h200x2.json
Writes JSON (command, device, versions, every number) to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.request import Request
from workbench.bench import environment
from workbench.planner import plan
from workbench.bench import median_spread

TOKENS = 4096
MODEL = "gemma-3-12b"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def smoke_config():
    """--smoke: a tiny Gemma 3 (window 32, 5 sliding layers per global one) on the CPU, 256-token requests."""
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024,
                            sliding_window=32, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(12)])


def no_window_config(cfg):
    cfg = type(cfg).from_dict(cfg.to_dict())
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    return cfg


def pool_capacity(engine, chunk: int) -> dict:
    """Requests of TOKENS tokens the engine's pool holds at once, allocated through its own KV manager as the
    scheduler would (prefill chunks, then one token a step); the pool is emptied again afterwards."""
    kv, held = engine.kv, []
    params = SamplingParams(max_tokens=1)
    while True:
        req = Request(f"cap{len(held)}", [3] * (TOKENS - 1), params, 0.0, ())
        ok = kv.allocate_slots(req, min(chunk, TOKENS - 1), [])
        req.num_computed_tokens = min(chunk, TOKENS - 1)
        while ok and req.num_computed_tokens < TOKENS:
            n = min(chunk, TOKENS - 1 - req.num_computed_tokens) or 1  # the prompt, then the token at TOKENS - 1
            ok = kv.allocate_slots(req, n)
            req.num_computed_tokens += n
        if not ok:
            kv.free(req)
            break
        held.append(req)
    used = kv.num_used_blocks
    groups = kv.group_used_blocks()
    for req in held:
        kv.free(req)
        kv.forget(req)
    kv.commit()
    assert kv.num_used_blocks == 0, "the pool did not return to 0 used blocks"
    return {"requests": len(held), "used_blocks": used, "group_used_blocks": list(groups),
            "blocks_per_request": used / max(len(held), 1)}


def real_run(llm, n: int) -> dict:
    """n requests of 4048 prompt tokens generating 49 tokens (4096 at the end), all at once."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(32000, llm.spec.vocab_size), (TOKENS - 48,), generator=g).tolist()
               for _ in range(n)]
    eng = llm.engine
    eng.reset_stats()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=49, temperature=0.0, ignore_eos=True))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    st = eng.stats()
    return {"requests": n, "wall_s": time.perf_counter() - t0, "peak_running": max(s.num_running for s in st.steps),
            "preemptions": st.num_preemptions, "peak_used_blocks": max(s.num_used_blocks for s in st.steps),
            "final_used_blocks": st.num_used_blocks, "steps": st.num_steps}



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-run", action="store_true", help="skip the real engine run (pool and planner only)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks the script, measures nothing)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over (default 1)")
    args = ap.parse_args()
    global TOKENS
    chunk = 16384
    extra = {}
    if args.smoke:
        TOKENS, chunk = 256, 512
        extra = dict(device="cpu")
        args.gpu_memory_utilization = 0.02  # of the CPU budget: a pool of a few dozen such requests
        hf, dtype, gpu = smoke_config(), torch.float32, "cpu"
    else:
        hf, dtype, gpu = LLM.hf_config(MODEL), torch.bfloat16, "current"
    device = torch.device("cpu" if args.smoke else "cuda")
    cfg = EngineConfig(max_model_len=TOKENS, block_size=16, max_num_batched_tokens=chunk, max_num_seqs=256,
                       enforce_eager=True, enable_prefix_caching=False,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       tensor_parallel_size=args.tensor_parallel_size, **extra)
    variants = {"sliding": hf, "no_window": no_window_config(hf)}
    result = {"command": " ".join([sys.executable] + sys.argv), "environment": environment(device),
              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "tokens_per_request": TOKENS}
    for name, hf in variants.items():
        log(f"{name}: building {'a tiny Gemma 3' if args.smoke else MODEL} (random weights)")
        t0 = time.perf_counter()
        llm = LLM.random(hf, cfg, dtype=dtype, seed=0)
        log(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s")
        eng = llm.engine
        spec = llm.spec
        caps = [pool_capacity(eng, chunk) for _ in range(args.repeats)]
        p = plan(spec, gpu, cfg, dtype=dtype)
        row = {"num_gpu_blocks": eng.kv.num_blocks, "kv_cache_groups": list(eng.stats().kv_cache_groups),
               "kv_cache_bytes": eng.stats().memory.kv_cache_bytes if eng.stats().memory else None,
               "pool_requests": median_spread([c["requests"] for c in caps]), "pool_runs": caps,
               "planner_requests": p.max_concurrent_requests, "planner_num_gpu_blocks": p.num_gpu_blocks,
               "planner_kv_cache_bytes": p.kv_cache_bytes, "planner_reason": p.reason}
        log(f"{name}: pool {row['num_gpu_blocks']} blocks, {caps[0]['requests']} requests of {TOKENS} tokens "
            f"({caps[0]['blocks_per_request']:.1f} blocks each, per group {caps[0]['group_used_blocks']}); planner "
            f"{p.max_concurrent_requests} requests ({p.num_gpu_blocks} blocks)")
        if not args.no_run:
            row["run"] = real_run(llm, min(caps[0]["requests"], cfg.max_num_seqs))
            log(f"{name}: run {row['run']}")
        result[name] = row
        llm.engine.runner.close()  # the KV pool (and the workers of a tensor-parallel group) before the next model
        del llm, eng
        gc.collect()
        torch.cuda.empty_cache()
    s, w = result["sliding"], result["no_window"]
    pool_ratio = s["pool_requests"]["median"] / w["pool_requests"]["median"]
    planner_ratio = s["planner_requests"] / w["planner_requests"]
    result["summary"] = {
        "pool_ratio": pool_ratio, "planner_ratio": planner_ratio,
        "target": "sliding / no-window concurrent 4096-token requests >= 1.5, the planner agreeing",
        "met": pool_ratio >= 1.5 and planner_ratio >= 1.5 and abs(planner_ratio / pool_ratio - 1) <= 0.05,
        "pool_vs_planner_sliding": s["pool_requests"]["median"] / max(s["planner_requests"], 1),
        "pool_vs_planner_no_window": w["pool_requests"]["median"] / max(w["planner_requests"], 1)}
    log(f"summary: {json.dumps(result['summary'])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
