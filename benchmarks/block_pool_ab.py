"""A/B on the host: the KV block pool of this checkout against the one of another commit (default 3b19d6d, which made
every KVBlock object when the pool was built), loaded from git into the same process.

Two cases, timed in interleaved rounds (the side alternating first), medians and (min, max):
- build: BlockPool(N) for N = 2.6 million blocks, the shipped 6M model's pool in 0.9 of an H200 (48 KiB blocks).
- steps: what a decode step asks of the pool with 256 requests: 16 new blocks (a request fills a 16-token block every
  16 steps) and 16 freed, 1000 steps on a pool of 50,000 blocks (llama-3.1-8b's on an H200), prefix caching on; on a
  new pool (steps_first_pass: every block handed out is one never used, which the lazy pool makes then) and on one
  whose blocks were all handed out and freed once (steps_after_pass).

    PYTHONPATH=. python3 benchmarks/block_pool_ab.py [ROUNDS] [--base REV] [--out OUT.json]
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.kv import block_pool  # noqa: E402

BUILD_BLOCKS = 2_600_000
STEP_POOL, STEPS, PER_STEP = 50_000, 1000, 16


def pool_module_at(rev: str) -> types.ModuleType:
    """engine/kv/block_pool.py as it was at `rev`, as a module of the engine.kv package (its relative imports)."""
    src = subprocess.run(["git", "show", f"{rev}:engine/kv/block_pool.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("engine.kv.block_pool_base")
    mod.__package__ = "engine.kv"
    exec(compile(src, f"{rev}:engine/kv/block_pool.py", "exec"), mod.__dict__)
    return mod


def build(mod) -> float:
    t = time.perf_counter()
    mod.BlockPool(BUILD_BLOCKS, True)
    return time.perf_counter() - t


def steps(mod, after_pass: bool) -> float:
    pool = mod.BlockPool(STEP_POOL, True)
    if after_pass:  # every block handed out and freed once before timing
        pool.free_blocks(pool.get_new_blocks(STEP_POOL))
    held = [pool.get_new_blocks(PER_STEP) for _ in range(16)]  # 16 steps' worth in use before timing
    t = time.perf_counter()
    for _ in range(STEPS):
        held.append(pool.get_new_blocks(PER_STEP))
        pool.free_blocks(reversed(held.pop(0)))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rounds", nargs="?", type=int, default=5)
    ap.add_argument("--base", default="3b19d6d")
    ap.add_argument("--out")
    args = ap.parse_args()
    sides = {"base": pool_module_at(args.base), "head": block_pool}
    cases = {"build": build, "steps_first_pass": lambda m: steps(m, False), "steps_after_pass": lambda m: steps(m, True)}
    times = {(case, side): [] for case in cases for side in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for case, fn in cases.items():
            for side in order:
                times[case, side].append(fn(sides[side]))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {"command": "python3 benchmarks/block_pool_ab.py " + " ".join(sys.argv[1:]), "base": args.base,
              "head": head.strip(), "machine": platform.processor() or platform.machine(), "rounds": args.rounds}
    for case in cases:
        med = {side: statistics.median(times[case, side]) for side in sides}
        result[case] = {side: {"median_s": med[side], "min_s": min(times[case, side]),
                               "max_s": max(times[case, side])} for side in sides}
        result[case]["head_over_base"] = med["head"] / med["base"]
        print(f"{case}: base {med['base'] * 1e3:.3f} ms ({min(times[case, 'base']) * 1e3:.3f}-"
              f"{max(times[case, 'base']) * 1e3:.3f}), head {med['head'] * 1e3:.3f} ms "
              f"({min(times[case, 'head']) * 1e3:.3f}-{max(times[case, 'head']) * 1e3:.3f}), "
              f"head / base {med['head'] / med['base']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
