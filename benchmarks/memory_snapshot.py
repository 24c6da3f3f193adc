"""What keeps memory reserved past allocated after an engine's setup: per memory pool, reserved and allocated bytes,
then the segments with more than 16 MB free and the live blocks in them, with the engine frames that allocated each
(torch.cuda.memory._snapshot with allocation stacks).

    ENGINE_TUNING_CACHE=0 PYTHONPATH=. python3 benchmarks/memory_snapshot.py int8

One H200: data/benchmarks/mem_snapshot_int8_h200.log (before quantize_model's compaction: 3.2 GB free in 11
segments, pinned by int8 weights allocated into the segments of float temporaries).
"""
from __future__ import annotations

import collections
import os
import sys

import torch

MiB = 2**20


def where(block: dict) -> str:
    frames = [f for f in block.get("frames", []) if "/engine/" in f["filename"] or "/workbench/" in f["filename"]]
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:5])


def main() -> None:
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=200000)
    from engine import LLM, EngineConfig
    mode = sys.argv[1]
    LLM.random("llama-3.1-8b", EngineConfig(quantization=None if mode == "none" else mode), dtype=torch.bfloat16,
               seed=0)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    print("reserved", torch.cuda.memory_reserved(), "allocated", torch.cuda.memory_allocated(), flush=True)
    segments = torch.cuda.memory._snapshot()["segments"]
    pools = collections.defaultdict(lambda: [0, 0, 0])
    for seg in segments:
        p = pools[str(seg.get("segment_pool_id"))]
        p[0] += seg["total_size"]
        p[1] += seg["allocated_size"]
        p[2] += 1
    for key, (reserved, allocated, count) in pools.items():
        print(f"pool {key} reserved {reserved / 1e9:.3f} GB allocated {allocated / 1e9:.3f} GB segments {count}")
    holes = sorted(((seg["total_size"] - seg["allocated_size"], seg) for seg in segments
                    if seg["total_size"] - seg["allocated_size"] > 16 * MiB), key=lambda t: -t[0])
    print(f"segments with > 16 MB free: {len(holes)} free total {sum(f for f, _ in holes) / 1e9:.3f} GB")
    for free, seg in holes[:25]:
        live = [b for b in seg["blocks"] if b["state"] != "inactive"]
        print(f"seg {seg['total_size'] / MiB:.1f} MB free {free / MiB:.1f} MB pool {seg.get('segment_pool_id')} "
              f"stream {seg.get('stream')} live blocks {len(live)}")
        for b in live[:3]:
            print(f"    live {b['size'] / MiB:.2f} MB {b['state']} | {where(b)}")


if __name__ == "__main__":
    main()
