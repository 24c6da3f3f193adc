"""The memory profile of an engine per quantization mode against what torch's caching allocator reserves: after
setup, after 16 decode steps at batch 1 and at batch 64, and after empty_cache, with the allocator trims counted.
threshold_minus_reserved_after_empty < 0 means the engine holds memory its profile did not count and empty_cache
cannot return (then every step would trim; the engine now warns once and raises its threshold instead).

    PYTHONPATH=. python3 -W always benchmarks/memory_trims.py none,int8

One H200, data/benchmarks/: trim_diag_h200.log (before the kernels were tuned ahead of the profile),
trim_diag_h200_after.log (tuned ahead), trim_diag_h200_compacted.log (and quantize_model's compaction).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time

import torch

from engine import LLM, EngineConfig, SamplingParams


def memory() -> dict:
    return {"reserved": torch.cuda.memory_reserved(), "allocated": torch.cuda.memory_allocated()}


def check(mode: str) -> dict:
    t0 = time.perf_counter()
    llm = LLM.random("llama-3.1-8b", EngineConfig(quantization=None if mode == "none" else mode),
                     dtype=torch.bfloat16, seed=0)
    runner = llm.engine.runner
    profile = runner.memory
    out = {"setup_s": round(time.perf_counter() - t0, 1), "profile": dataclasses.asdict(profile),
           "after_setup": memory()}
    for batch in (1, 64):
        llm.generate([[5] * 64] * batch, SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0))
        torch.cuda.synchronize()
        out[f"after_b{batch}"] = {**memory(), "trims": profile.num_reserved_trims}
    torch.cuda.empty_cache()
    out["after_empty_cache"] = memory()
    out["kv_bytes"] = sum(t.numel() * t.element_size() for pair in runner.kv_caches for t in pair)
    out["threshold_minus_reserved_after_empty"] = profile.reserved_trim_bytes - out["after_empty_cache"]["reserved"]
    return out


def main() -> None:
    for mode in sys.argv[1].split(","):
        print(mode, json.dumps(check(mode)), flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
