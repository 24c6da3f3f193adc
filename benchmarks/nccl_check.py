"""All-reduce speed between the GPUs of one machine, one process per GPU (as the engine's ranks run).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/nccl_check.py [--world-size 2]
Prints, per message size, the time of one bf16 all-reduce (eager, and replayed from a CUDA graph of 32)
and its bus bandwidth (2 (W-1)/W x bytes / time, as nccl-tests reports), plus peer access between the
GPUs. Writes JSON to $OUT (when set) and data/benchmarks/nccl_<W>gpu.json.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed.worker import apply_nccl_env

SIZES = [4096 * 2, 128 * 4096 * 2, 1024 * 4096 * 2, 8192 * 4096 * 2, 8192 * 8192 * 2]  # bytes


def timed(fn, iters: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def worker(rank: int, world: int, port: int) -> None:
    apply_nccl_env()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    rows = []
    for nbytes in SIZES:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        eager = timed(lambda: dist.all_reduce(x), 20)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(32):
                dist.all_reduce(x)
        graph.replay()
        in_graph = timed(graph.replay, 5) / 32
        y = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        dist.all_reduce(y)
        ok = bool((y == world).all())
        rows.append({"bytes": nbytes, "eager_us": eager * 1e6, "graph_us": in_graph * 1e6,
                     "busbw_GBps": 2 * (world - 1) / world * nbytes / min(eager, in_graph) / 1e9, "correct_sum": ok})
    if rank == 0:
        report(world, rows)
    # No teardown of the process group: it can wait for long after CUDA-graph captures, and nothing needs it.
    sys.stdout.flush()
    os._exit(0)


def report(world: int, rows: list) -> None:
    peer = {f"{i}->{j}": torch.cuda.can_device_access_peer(i, j) for i in range(world) for j in range(world) if i != j}
    result = {"world_size": world, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "peer_access": peer,
              "env": {k: os.environ.get(k) for k in sorted(os.environ) if k.startswith("NCCL_")}, "rows": rows}
    print(json.dumps(result, indent=1), flush=True)
    for d in {Path(os.environ.get("OUT", "data/benchmarks")), Path("data/benchmarks")}:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"nccl_{world}gpu.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    args = ap.parse_args()
    world = args.world_size
    ctx = mp.get_context("spawn")
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=worker, args=(r, world, port)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        if p.is_alive():
            p.kill()
            raise SystemExit("a rank did not finish within 300 s")


if __name__ == "__main__":
    main()
