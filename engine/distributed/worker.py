"""The process of one tensor-parallel rank r >= 1, started by WorkerGroup with torch.multiprocessing (spawn).

It builds its shard (empty), says "ready" through its pipe, joins the process group, receives its
weights from rank 0 (sharding.scatter_shards) and then serves rank 0's commands until "shutdown" or
until rank 0 goes away (its end of the pipe closes). Each command answers ("ok", result) except the
per-step "step", which answers nothing (its broadcast and collectives are the synchronisation).
Any exception is sent as ("error", type name, message) and ends the process: the group is then out
of step, and rank 0 raises instead of waiting for it. A ValueError of an answered command (a setting
that does not fit) is the exception: the group is still in step, so the worker answers with it and
goes on serving until rank 0, having raised it, shuts the group down together with it.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback

# NVLink multicast (NVLS) off: it fails on the lent multi-GPU machines. Set in every rank's environment
# unless the user set them; NCCL reads them when the communicator is created, after this module loads.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def apply_nccl_env() -> None:
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)


def run_worker(rank: int, world_size: int, init_method: str, spec, config, device: str, dtype, timeout_s: float,
               conn) -> None:
    """Entry point of the rank's process (arguments are pickled by the spawn start method)."""
    apply_nccl_env()
    import torch
    import torch.distributed as dist

    code, shut_down = 0, False
    try:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # share the host's cores with rank 0 instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        from .sharding import build_shard, rank_spec, scatter_shards
        from .step_broadcast import TPModelRunner

        model = build_shard(spec, rank, world_size, dtype, device)
        conn.send(("ready", os.getpid()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        scatter_shards(model)
        runner = _serve(conn, TPModelRunner(model, rank_spec(spec, world_size), config, device, dtype), model)
        runner.graphs = {}  # before the teardown: captured graphs hold the communicator's collectives
        shut_down = True
    except (EOFError, KeyboardInterrupt):
        pass  # rank 0 is gone, or the terminal's Ctrl-C reached the whole process group
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then this process ends
        code = 1
        try:
            conn.send(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))
        except OSError:
            pass
    # Rank 0 asked: tear the group down together with it. Otherwise the group may be stuck, or its other
    # ranks gone (NCCL's teardown would wait for them): leave it to the OS.
    if shut_down and dist.is_initialized():
        dist.destroy_process_group()
    # Skip the interpreter's teardown (about a second with torch loaded): nothing here needs it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(conn, runner, model):
    """Answer rank 0's commands until "shutdown"; returns the runner in use then."""
    import torch

    while True:
        command, *args = conn.recv()
        if command == "shutdown":
            return runner
        with torch.inference_mode():
            if command == "step":
                runner.forward_step(args[0])
                continue
            if command == "reconfigure":  # a new runner (KV pool, graphs, buffers) for a config; same shard
                runner = _rebuilt(runner, model, args[0])
                conn.send(("ok", None))
                continue
            try:
                result = _answer(command, args, runner, model)
            except ValueError as exc:
                # A setting that does not fit (say, a KV pool too small): raised after the command's collectives,
                # so the group is still in step; rank 0 raises it and closes the group with this rank's help.
                conn.send(("error", "ValueError", f"{exc}\n{traceback.format_exc()}"))
                continue
        conn.send(("ok", result))


def _rebuilt(runner, model, config):
    """A TPModelRunner for `config` over the same shard; the old runner's KV cache and CUDA graphs are freed
    before the new one allocates anything (the caller drops its last reference)."""
    import gc

    import torch

    from .step_broadcast import TPModelRunner

    spec, device, dtype = runner.spec, runner.device, runner.dtype
    runner.close()
    del runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return TPModelRunner(model, spec, config, device, dtype)


def _answer(command: str, args: list, runner, model):
    if command == "num_blocks":
        return runner.determine_num_blocks()
    if command == "allocate_kv_cache":
        return runner.allocate_kv_cache(*args)
    if command == "capture":
        return runner.capture_cuda_graphs()
    if command == "prompt_logits":
        runner.prompt_logits(*args)
        return None
    if command == "describe":
        return _describe(runner, model)
    raise ValueError(f"unknown command {command!r}")


def _describe(runner, model) -> dict:
    """What this rank holds, for tests and debugging."""
    import torch

    attn = model.layers[0].self_attn
    cuda = runner.device.type == "cuda"
    return {"max_memory_allocated": torch.cuda.max_memory_allocated(runner.device) if cuda else None,
            "pid": os.getpid(), "rank": model.tensor_parallel[0], "device": str(runner.device),
            "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads,
            "kv_cache_shape": tuple(runner.kv_caches[0][0].shape) if runner.kv_caches else None,
            "kv_cache_groups": (tuple(g.sliding_window for g in runner.kv_groups) if runner.kv_groups else None),
            "num_kv_tensors": len({id(c) for c in runner.kv_caches}),
            "env": {k: os.environ.get(k) for k in NCCL_ENV}}
