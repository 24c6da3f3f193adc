"""One workload, one config: the engine's numbers beside the naive baseline and the physical limit.

The physical limit of a run is the sum over its engine steps of
    max(FLOPs of the step / measured bf16 matmul rate,
        bytes the step must move (weights + K/V read and written) / measured copy bandwidth),
with both rates measured at the start of the same run. measured time / limit time says how far
the engine is from what the GPU could do with the same schedule of work.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .metrics import throughput
from .point_run import load_llm, run_point
from .schema import C, latency


# ----- repeated measurements ----------------------------------------------------------------------

def median_spread(values) -> dict:
    """A repeated measurement as the benchmarks record it: median, min, max, how many and the runs themselves."""
    values = [float(v) for v in values]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "count": len(values),
            "runs": values}


# ----- device rates -------------------------------------------------------------------------------

def median_cuda_time(fn, repeats: int) -> float:
    """Median seconds of fn() on the GPU, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def measure_device_rates(device="cuda", matmul_size: int = 8192, copy_bytes: int = 2 * 1024**3) -> dict:
    """bf16 matmul rate (FLOP/s) on random data and device-to-device copy bandwidth (bytes read + written / s)."""
    def matmul_time():
        a, b = (torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16) for _ in range(2))
        return median_cuda_time(lambda: a @ b, 20)

    def copy_time():
        src = torch.randn(copy_bytes // 2, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return median_cuda_time(lambda: dst.copy_(src), 20)

    # Each in its own function, so its buffers are freed before the next one and before the engine loads.
    t_mm, t_copy = matmul_time(), copy_time()
    torch.cuda.empty_cache()
    return {"matmul_flops": 2 * matmul_size**3 / t_mm, "copy_bandwidth": 2 * copy_bytes / t_copy}


# ----- physical limit -----------------------------------------------------------------------------

def step_limits(steps: pd.DataFrame, spec, weight_bytes: int, kv_bytes_per_token: int, rates: dict) -> pd.DataFrame:
    """Per step: FLOPs, bytes moved and the time the GPU needs at least (seconds), from engine counters:
    limit_time = max(FLOPs / R, bytes / BW), and serial_time, the GEMMs' max(FLOPs / R, weight bytes / BW)
    plus attention's max(FLOPs / R, K/V bytes / BW): the limit of a step that runs them in turn."""
    h, vocab = spec.hidden_size, spec.vocab_size
    embed = vocab * h
    lm_head = vocab * h
    linear_params = spec.num_params() - embed - (0 if spec.tie_word_embeddings else lm_head)
    attn_width = spec.num_layers * spec.num_heads * spec.head_dim
    R, BW = rates["matmul_flops"], rates["copy_bandwidth"]
    gemm_flops = (2 * linear_params * steps["num_batched_tokens"] + 2 * lm_head * steps["num_sampled_tokens"]).astype(float)
    attn_flops = (4 * attn_width * steps["num_attention_scores"]).astype(float)
    kv_bytes = (kv_bytes_per_token * (steps["num_kv_tokens_read"] + steps["num_batched_tokens"])).astype(float)
    out = pd.DataFrame({"flops": gemm_flops + attn_flops, "bytes": weight_bytes + kv_bytes})
    out["compute_time"] = out["flops"] / R
    out["memory_time"] = out["bytes"] / BW
    out["limit_time"] = out[["compute_time", "memory_time"]].max(axis=1)
    # the GEMMs and attention one after the other, each at its own roofline (no overlap of the two)
    out["serial_time"] = np.maximum(gemm_flops / R, weight_bytes / BW) + np.maximum(attn_flops / R, kv_bytes / BW)
    return out


# ----- runs ---------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """A finished run: per-request rows, per-step rows, its wall time (s) and the summary numbers."""

    name: str
    requests: pd.DataFrame
    duration: float
    steps: pd.DataFrame | None = None
    summary: dict = field(default_factory=dict)
    stats: object | None = None    # the engine's EngineStats of the run (request events, kernel profile)


def run_engine(llm, workload, warmup: bool = True, profile: str | None = None,
               kernel_window: tuple[int, int] | None = None) -> RunResult:
    """The workload through the engine (`workbench.point_run.run_point`, the sweep's measurement).
    profile="kernels": deep mode over kernel_window = (first step, number of steps)."""
    run = run_point(llm, workload, warmup=warmup, profile=profile, kernel_window=kernel_window)
    return RunResult("engine", run.requests, run.duration, run.steps, run.metrics, run.stats)


def run_naive_baseline(hf_model, workload, max_batch_size: int = 128) -> RunResult:
    """The "naive server": HF generate on static batches in arrival order, each padded (left) to its
    longest prompt and run to its longest output; each request counts only its own output tokens."""
    device = next(hf_model.parameters()).device
    reqs = list(workload.requests)
    rows = []
    start = time.perf_counter()
    for i in range(0, len(reqs), max_batch_size):
        batch = reqs[i:i + max_batch_size]
        longest = max(r.prompt_len for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for j, r in enumerate(batch):
            ids[j, longest - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
            mask[j, longest - r.prompt_len:] = 1
        new = max(r.max_tokens for r in batch)
        with torch.inference_mode():
            hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done = time.perf_counter()
        for r in batch:
            rows.append({"request_id": r.request_id, "num_prompt_tokens": r.prompt_len,
                         "num_output_tokens": r.max_tokens, "e2e": done - start})
    duration = time.perf_counter() - start
    frame = pd.DataFrame(rows)
    return RunResult("naive HF generate", frame, duration, summary=throughput(frame, duration))


def environment(device: torch.device) -> dict:
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "command": " ".join([Path(sys.executable).name] + sys.argv)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env[C.device_name] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env[C.device_name] = platform.processor() or "cpu"
    return env


def format_table(engine: RunResult, baseline: RunResult | None, limit: dict | None) -> str:
    """One plain-text table: throughput, latency percentiles, KV usage and the two reference lines."""
    s = engine.summary
    lines = [f"{'':28s}{'req/s':>10s}{'out tok/s':>12s}{'total tok/s':>13s}",
             f"{'engine':28s}{s[C.request_throughput]:10.2f}{s[C.output_throughput]:12.1f}"
             f"{s[C.total_token_throughput]:13.1f}"]
    if baseline is not None:
        b = baseline.summary
        lines.append(f"{baseline.name:28s}{b[C.request_throughput]:10.2f}{b[C.output_throughput]:12.1f}"
                     f"{b[C.total_token_throughput]:13.1f}")
        short = "naive" if baseline.name.startswith("naive") else baseline.name
        lines.append(f"engine / {short} (output tok/s): {s[C.output_throughput] / b[C.output_throughput]:.2f}x")
    if limit is not None:
        lines.append(f"physical limit: {limit['limit_time']:.2f} s of {engine.duration:.2f} s measured "
                     f"-> limit / measured = {limit['limit_time'] / engine.duration:.3f} "
                     f"(compute-bound steps {limit['compute_bound_share']:.0%}; matmul "
                     f"{limit['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {limit['copy_bandwidth'] / 1e12:.2f} TB/s)")
    lines.append("latency (ms)        mean      p50      p90      p99")
    for name in ("ttft", "tpot", "itl", "e2e"):
        lines.append(f"  {name:12s}" + "".join(f"{s[latency(name, p)]:9.1f}" for p in ("mean", "p50", "p90", "p99")))
    lines.append(f"KV usage mean {s[C.kv_usage_mean]:.1%}, peak {s[C.kv_usage_peak]:.1%} of {s[C.kv_blocks]} "
                 f"blocks ({s[C.kv_capacity_tokens]} tokens); preemptions {s[C.num_preemptions]}; "
                 f"{s[C.num_steps]} steps; host time per step p50 {s[C.host_time_p50_ms]:.2f} ms; backend "
                 f"{s[C.attention_backend_used]}, CUDA graphs {s[C.cuda_graphs]}")
    return "\n".join(lines)


def bench(model: str, workload, config, baseline: bool | str = False, baseline_batch_size: int = 128,
          out: str | None = None, seed: int = 0, trace: str | None = None, profile: str | None = None) -> dict:
    """Run the bench on ``model`` (a preset with random weights, or an HF checkpoint folder); print the
    table and the gap-to-limit waterfall; write JSON to `out` (if given) and a Chrome trace to `trace` (if
    given); profile="kernels" adds deep mode. baseline: False, True or "naive" (HF generate on static
    batches), or "hf-cb" (transformers' continuous batching). Returns the result dict."""
    import os

    from engine import LLM

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    rates = measure_device_rates(device) if on_gpu else None
    base = None
    if baseline:
        # Before the engine exists, so the engine's KV pool can take the memory back afterwards.
        from transformers import AutoModelForCausalLM
        dtype = torch.bfloat16 if on_gpu else torch.float32
        if os.path.isdir(model):
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        else:
            with torch.device(device):
                hf = AutoModelForCausalLM.from_config(LLM.hf_config(model), dtype=dtype).eval()
        if baseline == "hf-cb":  # transformers' own continuous batching (paged KV), sized by transformers
            from .baselines import run_hf_cb_baseline
            base = run_hf_cb_baseline(hf, workload)
        else:
            base = run_naive_baseline(hf, workload, baseline_batch_size)
        del hf
        if on_gpu:
            torch.cuda.empty_cache()
    llm = load_llm(model, config, seed=seed)
    eng = run_engine(llm, workload, profile=profile)
    limit = None
    if rates is not None:
        st = llm.engine.stats()
        per_step = step_limits(eng.steps, llm.spec, st.weight_bytes, st.kv_bytes_per_token, rates)
        limit = {**rates, "limit_time": float(per_step["limit_time"].sum()),
                 "compute_bound_share": float((per_step["compute_time"] > per_step["memory_time"]).mean()),
                 "limit_over_measured": float(per_step["limit_time"].sum() / eng.duration)}
    print(format_table(eng, base, limit))
    from .profiling import run_profile
    profiled = run_profile(llm, eng, rates, trace=trace)
    result = {C.model: model, C.workload: workload.summary(), "config": llm.config.to_dict(),  # limits resolved
              "engine": {**eng.summary, "duration": eng.duration},
              "baseline": None if base is None else {**base.summary, "duration": base.duration, "name": base.name,
                                                     "batch_size": baseline_batch_size},
              "physical_limit": limit, "environment": environment(device)}
    result.update(profiled)
    if base is not None:
        result["engine_over_baseline"] = eng.summary[C.output_throughput] / base.summary[C.output_throughput]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=str))
    return result
