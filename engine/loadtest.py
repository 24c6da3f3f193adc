"""Load test: fill an engine's KV cache with requests of max_model_len tokens until preemption starts.

The memory planner's verdict "fits" claims that a config survives its worst case: every step at the
token budget, the KV pool full, requests preempted and recomputed. `load_test` drives exactly that
through the step API and records what memory it really took: torch's allocation peak, and the
device-wide memory in use (NVML through torch where nvidia-ml-py is installed, else cudaMemGetInfo),
sampled after every step. A CUDA out-of-memory error is caught and reported, not raised.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .sampling import SamplingParams


def _used_probe(device: torch.device):
    """(probe() -> device-wide used bytes, source name)."""
    try:
        torch.cuda.device_memory_used(device)
        return (lambda: int(torch.cuda.device_memory_used(device))), "nvml"
    except Exception:  # no nvidia-ml-py, or NVML unavailable: the driver's view of the same number
        def probe():
            free, total = torch.cuda.mem_get_info(device)
            return total - free
        return probe, "cudaMemGetInfo"


def load_test(llm, num_requests: int | None = None, max_tokens: int | None = None, stop: str = "preemption",
              steps_after_preemption: int = 4, time_limit: float | None = None, seed: int = 0) -> dict:
    """Send requests of max_model_len tokens (random prompts of max_model_len - max_tokens) and step.

    num_requests defaults to enough prompts to overfill the KV pool (capacity // prompt + 2); max_tokens to
    the steps the prompts take to fill the pool (capacity // max_num_batched_tokens) + 2 x block_size + 1, at
    most max_model_len // 2, so the first requests still decode, and need new blocks, once the pool is full.
    stop="preemption" ends `steps_after_preemption` steps after the first preemption (unfinished requests
    are then aborted), stop="completion" runs every request to the end. time_limit (seconds) ends the run early.

    Returns a dict: counts (requests finished / aborted / lost, preemptions, steps), max_kv_usage,
    stop_reason, oom (bool) and error, seconds, and on CUDA the memory seen in bytes: torch_peak_allocated,
    torch_peak_reserved, device_used_before / _peak (device-wide, source in device_used_source),
    budget_bytes (gpu_memory_utilization x total) and over_budget_bytes (device_used_peak - budget).
    """
    if stop not in ("preemption", "completion"):
        raise ValueError(f"stop={stop!r} is not allowed: use 'preemption' or 'completion'")
    engine = llm.engine
    if engine.has_unfinished_requests():
        raise ValueError("load_test needs an idle engine: finish or abort its requests first")
    cfg = engine.config
    bs, max_len = cfg.block_size, cfg.max_model_len
    num_blocks = engine.kv.num_blocks
    capacity = num_blocks * bs
    if max_tokens is None:
        # The first requests must still be decoding when the last prompts fill the pool (about capacity / budget
        # steps later), and then need new blocks: decode for that long plus two blocks, within max_model_len / 2.
        max_tokens = max(1, min(max_len // 2, capacity // cfg.max_num_batched_tokens + 2 * bs + 1))
    if not 1 <= max_tokens < max_len:
        raise ValueError(f"max_tokens={max_tokens} must be in [1, max_model_len={max_len}) to leave a prompt")
    prompt_len = max_len - max_tokens
    num_requests = capacity // prompt_len + 2 if num_requests is None else num_requests
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")

    device = engine.runner.device
    cuda = device.type == "cuda"
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"load-{seed}-{i}" for i in range(num_requests)]
    engine.reset_stats()
    probe, source, used_before = None, None, None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe, source = _used_probe(device)
        used_before = probe()
    used_peak = used_before
    # Distinct random prompts: no prefix-cache hits, so every request needs its own blocks.
    for rid in ids:
        engine.add_request(rid, rng.integers(0, engine.spec.vocab_size, prompt_len).tolist(), params)

    finished: dict[str, object] = {}
    preempt_base = engine.scheduler.num_preemptions
    first_preemption_step, max_used, max_running = None, 0, 0
    steps, oom, error, reason = 0, False, None, "all finished"
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
            steps += 1
            max_used = max(max_used, engine.kv.num_used_blocks)
            max_running = max(max_running, len(engine.scheduler.running))
            if cuda:
                used_peak = max(used_peak, probe())
            if first_preemption_step is None and engine.scheduler.num_preemptions > preempt_base:
                first_preemption_step = steps
            if (stop == "preemption" and first_preemption_step is not None
                    and steps - first_preemption_step >= steps_after_preemption):
                reason = "preemption"
                break
            if time_limit is not None and time.perf_counter() - start > time_limit:
                reason = "time limit"
                break
    except torch.cuda.OutOfMemoryError as exc:
        oom, error, reason = True, str(exc)[:1000], "oom"
    except Exception as exc:  # reported, so a sweep of load tests goes on to the next config
        error, reason = f"{type(exc).__name__}: {exc}"[:1000], "error"
    seconds = time.perf_counter() - start
    aborted = sum(engine.abort_request(rid) is not None for rid in ids if rid not in finished)
    stats = engine.stats()
    result = {
        "num_requests": num_requests, "prompt_len": prompt_len, "max_tokens": max_tokens, "max_model_len": max_len,
        "num_gpu_blocks": num_blocks, "kv_capacity_tokens": capacity, "num_steps": steps,
        "num_finished": len(finished), "num_aborted": aborted, "num_lost": num_requests - len(finished) - aborted,
        "outputs_complete": all(len(o.token_ids) == max_tokens for o in finished.values()),
        "num_preemptions": stats.num_preemptions, "first_preemption_step": first_preemption_step,
        "max_kv_usage": max_used / num_blocks, "max_num_running": max_running,
        "num_prompt_tokens": stats.num_prompt_tokens, "num_generation_tokens": stats.num_generation_tokens,
        "stop_reason": reason, "oom": oom, "error": error, "seconds": seconds, "device": str(device),
        "attention_backend": stats.attention_backend, "cuda_graphs": stats.cuda_graphs,
    }
    if cuda:
        torch.cuda.synchronize(device)
        used_peak = max(used_peak, probe())
        total = torch.cuda.mem_get_info(device)[1]
        budget = int(cfg.gpu_memory_utilization * total)
        result.update(
            torch_peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
            torch_peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
            device_used_before_bytes=used_before, device_used_peak_bytes=used_peak, device_used_source=source,
            total_bytes=total, budget_bytes=budget, over_budget_bytes=used_peak - budget)
    return result
