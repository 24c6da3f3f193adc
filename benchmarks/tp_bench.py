"""Tensor parallelism: throughput, TPOT and the all-reduce share of decode step time, per degree, in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/tp_bench.py --model llama-3.1-8b --degrees 2,1
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/tp_bench.py --model llama-3.1-70b --degrees 2 \
        --workload sharegpt-like --num-requests 1000 --trace-head 400 --profile-repeats 1 --tag h200x2
For each degree: the model is loaded (random weights: under tensor parallelism each tensor is drawn on
rank 0's GPU and scattered, so no GPU and no host copy ever holds the whole model; each rank's peak
allocated memory is recorded to show it); then, for each batch of --decode-batches, that many requests are
brought to pure decode and 40 steps are timed (ms per step = TPOT at that batch, --repeats times, median
and range), and in the first --profile-repeats of them 20 more run under torch.profiler on rank 0: the
all-reduce share is the time of NCCL kernels (the all-reduces and the LM head's all-gather, as rank 0's GPU
runs them, waiting for its peer included) per step over the step's wall time; last, an offline run of
--num-requests requests of --workload (fixed: 256 prompt + 128 output tokens; sharegpt-like: the
1000-request trace of `python -m workbench bench`), or of its first --trace-head requests, gives output
tok/s and TPOT/TTFT. A degree that fails is recorded with its error, and the run goes on. The JSON is
rewritten after every stage (so a run cut short keeps what finished) to $OUT (when set) and
data/benchmarks/tp_<model>_<tag>.json.
"""
import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch

from engine import LLM, EngineConfig, SamplingParams
from workbench.bench import environment, run_engine
from workbench.workloads import make_workload


def decode_steps(llm: LLM, batch: int, timed_steps: int = 40, profiled_steps: int = 20) -> dict:
    """profiled_steps=0: no profiler window."""
    """ms per pure-decode step at `batch` running requests, and the NCCL kernels' share of it (rank 0)."""
    eng = llm.engine
    gen = torch.Generator().manual_seed(0)
    ids = [f"decode-{i}" for i in range(batch)]
    params = SamplingParams(max_tokens=timed_steps + profiled_steps + 20, ignore_eos=True, temperature=0.0)
    for i in ids:
        eng.add_request(i, torch.randint(0, llm.vocab_size, (128,), generator=gen).tolist(), params)
    for _ in range(200):  # until every request has its prompt computed and decodes
        eng.step()
        last = eng._steps[-1]
        if not last.num_prefill_tokens and last.num_running == batch:
            break
    else:
        raise RuntimeError(f"{batch} requests did not all reach decode in 200 steps")
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(timed_steps):
        eng.step()
    step_ms = (time.perf_counter() - t0) / timed_steps * 1e3
    out = {"batch": batch, "step_ms": step_ms, "cuda_graph": eng.stats().steps[-1].cuda_graph}
    if profiled_steps and llm.config.tensor_parallel_size > 1 and llm.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(profiled_steps):
                eng.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        nccl_us = sum(e.time_range.elapsed_us() for e in kernels if "nccl" in e.name.lower())
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        out.update(profiled_step_ms=wall / profiled_steps * 1e3, nccl_ms_per_step=nccl_us / profiled_steps / 1e3,
                   kernel_ms_per_step=busy_us / profiled_steps / 1e3, num_kernels=len(kernels),
                   allreduce_share_of_step=nccl_us / 1e6 / wall if kernels else None)
    for i in ids:
        eng.abort_request(i)
    return out


def peak_memory(llm: LLM) -> dict:
    """Peak bytes allocated by torch on each rank's GPU since the process started (rank 0 here, the others
    as their workers report them), beside the bytes of the whole model."""
    out = {"whole_model_bytes": llm.spec.num_params() * torch.empty((), dtype=llm.dtype).element_size()}
    if llm.device.type == "cuda":
        out["rank0_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(llm.device)
        if llm.config.tensor_parallel_size > 1:
            for r in llm.engine.runner.describe_ranks():
                out[f"rank{r['rank']}_peak_allocated_bytes"] = r.get("max_memory_allocated")
    import resource
    out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--degrees", default="1,2")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--trace-head", type=int, default=None,
                    help="run only the first N requests of the --num-requests trace (a stated fraction of it)")
    ap.add_argument("--workload", default="fixed", choices=["fixed", "sharegpt-like"])
    ap.add_argument("--decode-batches", default="1,64", help="running requests of the timed decode steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode windows per batch (median, min-max)")
    ap.add_argument("--profile-repeats", type=int, default=None,
                    help="decode windows per batch followed by a profiled window (default: every one)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: 1024 (fixed) or 4096")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tag", default=None, help="suffix of the JSON file name (default: the GPU count)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {"environment": environment(device), "model": args.model, "runs": {},
               "command": "python3 " + " ".join(__import__("sys").argv)}
    if device.type == "cuda":
        results["environment"]["gpus"] = torch.cuda.device_count()
    tag = args.tag or (f"{torch.cuda.device_count()}gpu" if device.type == "cuda" else "cpu")
    profile_repeats = args.repeats if args.profile_repeats is None else args.profile_repeats

    def save() -> None:
        base = results["runs"].get(1, {})
        for tp, run in results["runs"].items():
            if tp != 1 and "output_tok_s" in run and "output_tok_s" in base:
                run["throughput_vs_tp1"] = run["output_tok_s"] / base["output_tok_s"]
                run["throughput_runs"] = 1  # one trace run per degree: no spread
            if tp != 1 and run.get("decode") and base.get("decode"):
                run["decode_speedup_vs_tp1"] = {b: base["decode"][b]["step_ms"] / d["step_ms"]
                                                for b, d in run["decode"].items() if b in base["decode"]}
        for d in {Path(os.environ.get("OUT", "data/benchmarks")), Path("data/benchmarks")}:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"tp_{args.model}_{tag}.json").write_text(json.dumps(results, indent=2, default=str))

    for tp in [int(d) for d in args.degrees.split(",")]:
        llm = None
        run = results["runs"][tp] = {}
        try:
            t0 = time.perf_counter()
            max_len = args.max_model_len or (1024 if args.workload == "fixed" else 4096)
            config = EngineConfig(tensor_parallel_size=tp, max_model_len=max_len, device=args.device)
            llm = LLM.random(args.model, config)
            run.update(load_s=time.perf_counter() - t0, memory=peak_memory(llm), config=llm.config.to_dict())
            print(tp, "loaded", json.dumps(run), flush=True)
            save()
            run["decode"] = {}
            for b in [int(x) for x in args.decode_batches.split(",")]:
                reps = [decode_steps(llm, b, profiled_steps=20 if i < profile_repeats else 0)
                        for i in range(args.repeats)]
                ms = sorted(r["step_ms"] for r in reps)
                run["decode"][b] = {"step_ms": ms[len(ms) // 2], "step_ms_min": ms[0], "step_ms_max": ms[-1],
                                    "repeats": reps}
                shares = [r["allreduce_share_of_step"] for r in reps if r.get("allreduce_share_of_step") is not None]
                if shares:
                    run["decode"][b]["allreduce_share_of_step"] = sorted(shares)[len(shares) // 2]
                print(tp, "decode", b, json.dumps(run["decode"][b]["step_ms"]), flush=True)
                save()
            shape = {"prompt_len": 256, "output_len": 128, "seed": 1} if args.workload == "fixed" else {"seed": 0}
            wl = make_workload(args.workload, num_requests=args.num_requests, vocab_size=llm.vocab_size, **shape)
            if args.trace_head is not None:
                wl = wl.head(args.trace_head)
            run["trace"] = {"workload": args.workload, "num_requests_of_trace": args.num_requests,
                            "num_requests_run": len(wl), "total_output_tokens": sum(r.max_tokens for r in wl)}
            save()
            t1 = time.perf_counter()
            s = run_engine(llm, wl).summary
            run["trace"]["run_s"] = time.perf_counter() - t1
            run.update({"output_tok_s": s["output_throughput"], "tpot_p50_ms": s["tpot_p50_ms"],
                        "ttft_p50_ms": s["ttft_p50_ms"], "num_gpu_blocks": s["kv_blocks"],
                        "num_preemptions": s["num_preemptions"], "weight_bytes_per_gpu": s["weight_bytes"],
                        "cuda_graphs": s["cuda_graphs"]})
            run["memory"] = peak_memory(llm)
        except Exception as exc:  # noqa: BLE001 - one degree failing must not lose the others
            run.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        print(tp, json.dumps({k: v for k, v in run.items() if k not in ("decode", "config")}, default=str), flush=True)
        save()
        if llm is not None:
            llm._release_engine()
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
