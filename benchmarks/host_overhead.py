"""Host time per decode step with N requests decoding (issue 17): where the host's time goes, phase by phase.

    PYTHONPATH=. python3 benchmarks/host_overhead.py [--model tiny] [--num-seqs 256,1024] [--runs 3] [--steps 40]
                                                   [--prompt-len 32] [--device cpu|cuda] [--host-only]
                                                   [--profile 25] [--out host_overhead.json]

The model is small by default ("tiny") so that host work dominates: N requests of a --prompt-len token prompt
are admitted, then `--steps` pure-decode steps with all N running are timed from the step timeline (StepStats
schedule / prepare / launch / sample / output). "host_ms" is the step's wall time less the device's share:
on CUDA the median StepStats.host_time (duration - time waiting for the device); on the CPU, whose forward pass
is synchronous, the sum of the phases' medians less the forward's wall time (device_time) (the CPU sampler's
argmax is compute, counted as host here). "between_ms": host time between one step's end and the next's start
(recording the step), outside the timeline. "host_time_phases_ms": schedule + prepare + launch + output, the
phases StepStats.host_time counts on CUDA (--host-only on the CPU: the figure to set beside a GPU's host_ms; its
sample phase is the CPU's argmax, device work on a GPU). Prints the median over
`--runs` interleaved runs with min..max, and writes JSON (command, device, versions) to --out.

--host-only replaces the forward pass by constant logits: on a machine without a GPU this is the stand-in for the
host's share of a GPU step (the real scheduler, KV manager, runner input preparation, sampler call and step
recording, with a forward that costs nothing). --profile N runs cProfile over one more run of the largest size (on
any device) and prints the N functions with the most own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time

import numpy as np
import torch

from engine import LLM, EngineConfig, SamplingParams

PHASES = ("schedule", "prepare", "launch", "sample", "output")


def measure(llm: LLM, num_seqs: int, num_steps: int, prompt_len: int = 32, profiler=None) -> dict:
    """Median per-step figures (ms) of num_steps decode steps with num_seqs requests running (profiler: a
    cProfile.Profile enabled over those steps only)."""
    eng = llm.engine
    rng = np.random.default_rng(num_seqs)
    params = SamplingParams(max_tokens=num_steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(num_seqs):
        eng.add_request(f"h{num_seqs}-{i}-{time.perf_counter_ns()}",
                        rng.integers(3, llm.vocab_size, prompt_len).tolist(), params)
    while True:  # admit and prefill everything first
        eng.step()
        last = eng.last_step_stats()
        if last.num_running == num_seqs and last.num_prefill_tokens == 0:
            break
    eng.reset_stats()
    if profiler is not None:
        profiler.enable()
    for _ in range(num_steps):
        eng.step()
    if profiler is not None:
        profiler.disable()
    steps = [s for s in eng.stats().steps if s.num_prefill_tokens == 0 and s.num_decode_tokens == num_seqs]
    while eng.has_unfinished_requests():
        eng.step()
    cuda = llm.device.type == "cuda"

    def med(f):
        return statistics.median(f(s) for s in steps) * 1e3

    # Host work after a step's clock stopped (recording its StepStats, the KV commit) and before the next began.
    gaps = [b.start - (a.start + a.duration) for a, b in zip(steps, steps[1:])]
    out = {"steps": len(steps), "duration_ms": med(lambda s: s.duration), "device_ms": med(lambda s: s.device_time),
           "between_ms": statistics.median(gaps) * 1e3}
    for p in PHASES:
        out[f"{p}_ms"] = med(lambda s, p=p: getattr(s, f"{p}_time"))
    if cuda:
        out["host_ms"] = med(lambda s: s.host_time)
    else:
        # On a shared CPU a step is now and then descheduled for milliseconds, in any phase: the median of each
        # phase is robust to that where the median of their sum is not. The forward pass is the device's share.
        out["host_ms"] = (sum(out[f"{p}_ms"] for p in PHASES if p != "launch")
                          + med(lambda s: s.launch_time - s.device_time))
    out["host_between_ms"] = out["host_ms"] + out["between_ms"]
    # What StepStats.host_time counts on CUDA, where the sample phase is waiting for the device: with --host-only
    # on the CPU, the figure to compare with a GPU's host_ms (the sample phase there is the CPU's argmax).
    out["host_time_phases_ms"] = sum(out[f"{p}_ms"] for p in PHASES if p != "sample")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--num-seqs", default="256,1024")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default=None)
    ap.add_argument("--host-only", action="store_true",
                    help="replace the forward pass by constant logits: the host's work alone, with no forward "
                         "evicting the host's caches between steps (a CPU stand-in for a GPU, whose forward runs "
                         "elsewhere)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the runs, cProfile one more run of the largest size and print the top N functions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.num_seqs.split(",")]
    dtype = torch.bfloat16 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" \
        else torch.float32
    max_len = args.prompt_len + args.steps + 8
    cfg = EngineConfig(max_num_seqs=max(sizes), max_num_batched_tokens=max(8192, max(sizes) * 40),
                       max_model_len=max(1024, max_len), device=args.device,
                       num_gpu_blocks=max(sizes) * max(8, -(-max_len // 16) + 1))
    llm = LLM.random(args.model, cfg, dtype=dtype, seed=0)
    if args.host_only:
        runner = llm.engine.runner
        logits = torch.zeros(max(sizes), llm.vocab_size, device=llm.device)
        runner.forward_step = lambda plan: logits[:plan.num_seqs if plan.sample_rows is None else len(plan.sample_rows)]
    measure(llm, min(sizes), 5)  # warm-up (kernels, allocator)
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(args.runs):  # interleaved: run r of every size before run r+1
        for n in sizes:
            runs[n].append(measure(llm, n, args.steps, args.prompt_len))
    result = {"command": " ".join([sys.executable.split("/")[-1]] + sys.argv), "model": args.model,
              "host_only": args.host_only, "prompt_len": args.prompt_len,
              "device": torch.cuda.get_device_name() if llm.device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "runs": args.runs,
              "steps_per_run": args.steps, "results": {}}
    print(f"{args.model} on {llm.device.type}{' (host only: no forward)' if args.host_only else ''}: median of "
          f"{args.runs} runs (min..max), ms per decode step")
    for n in sizes:
        row = {}
        for key in ["host_ms", "host_between_ms", "host_time_phases_ms", "between_ms", "duration_ms",
                    "device_ms"] + [f"{p}_ms" for p in PHASES]:
            vals = [r[key] for r in runs[n]]
            row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        result["results"][str(n)] = row
        print(f"  {n:5d} decoding: host {row['host_ms']['median']:.3f} ({row['host_ms']['min']:.3f}.."
              f"{row['host_ms']['max']:.3f})  +between steps {row['between_ms']['median']:.3f}  "
              f"host_time's phases {row['host_time_phases_ms']['median']:.3f}  "
              f"step {row['duration_ms']['median']:.3f}  "
              + "  ".join(f"{p} {row[f'{p}_ms']['median']:.3f}" for p in PHASES))
    if args.profile:
        prof = cProfile.Profile()
        measure(llm, max(sizes), args.steps, args.prompt_len, prof)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(f"cProfile of the {args.steps} decode steps at {max(sizes)} (own time first):")
        print(text.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
