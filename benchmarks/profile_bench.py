"""Where the time of the default bench run goes on the GPU, and what the always-on timeline costs.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/profile_bench.py \
        --out data/benchmarks/profile_llama-3.1-8b_h200.json [--model llama-3.1-8b] [--num-requests 1000] \
        [--overhead-requests 1000] [--repeats 3] [--trace PATH] [--no-deep] [--no-overhead] \
        [--windows 32:16,500:16]

In one process, with EngineConfig() defaults and the ShareGPT-like trace (offline, seed 0):
1. the device rates (bf16 matmul FLOP/s, copy bandwidth), as `python -m workbench bench` measures them;
2. the main run of --num-requests requests: the gap-to-limit waterfall (target: the parts add up to the
   measured time within 2%), written as a Chrome trace to --trace if given;
3. the always-on overhead: --repeats runs with the timeline on and as many with its CUDA events and request
   events off (`LLMEngine.set_timeline(False)`; the few perf_counter marks per step stay), interleaved
   (on, off, off, on, ...), of --overhead-requests requests; medians and spreads of output tok/s
   (target: on is within 1% of off);
4. deep mode (profile="kernels") over steps [32, 48) of one more run (--windows FIRST:COUNT,...: one run per
   window, e.g. the early steps where all requests run and the tail where few do): device time by kernel class
   against each class's roofline.
Prints each part and writes JSON (command, device, versions, every number) to --out.
About 5-6 minutes on one H200 at the defaults (8 runs of about 28 s, plus loading and CUDA-graph capture);
--overhead-requests 500 shortens the overhead part by half.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from engine import LLM, EngineConfig
from workbench.bench import environment, measure_device_rates, run_engine
from workbench.profiling import KERNEL_WINDOW, format_attribution, format_kernels, kernel_breakdown, run_profile
from workbench.workloads import make_workload
from workbench.bench import median_spread



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--overhead-requests", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm of the overhead measurement (>= 3)")
    ap.add_argument("--trace", help="write the main run's Chrome trace here")
    ap.add_argument("--no-deep", action="store_true", help="skip the deep-mode run")
    ap.add_argument("--no-overhead", action="store_true", help="skip the always-on overhead runs")
    ap.add_argument("--windows", default=f"{KERNEL_WINDOW[0]}:{KERNEL_WINDOW[1]}",
                    help="deep-mode step windows FIRST:COUNT, comma-separated (one run each)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        windows = [tuple(int(v) for v in w.split(":")) for w in args.windows.split(",")]
    except ValueError:
        windows = []
    if not windows or any(len(w) != 2 or w[0] < 0 or w[1] < 1 for w in windows):
        ap.error(f"--windows={args.windows!r}: expected FIRST:COUNT pairs (FIRST >= 0, COUNT >= 1), e.g. 32:16,500:16")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    rates = measure_device_rates(device) if device.type == "cuda" else None
    config = EngineConfig()
    llm = LLM.random(args.model, config)
    workload = make_workload("sharegpt-like", num_requests=args.num_requests, vocab_size=llm.vocab_size, seed=0)
    result = {"environment": env, "model": args.model, "config": config.to_dict(), "workload": workload.summary()}

    # 2. The main run and its waterfall.
    run = run_engine(llm, workload)
    prof = run_profile(llm, run, rates, trace=args.trace, echo=False)
    att = prof["attribution"]
    error = abs(att["gap_attributed_s"] - att["gap_measured_s"]) / att["gap_measured_s"]
    print(format_attribution(att))
    print(f"output tok/s {run.summary['output_throughput']:.1f}; attribution error {error:.2e} (target < 0.02)",
          flush=True)
    result["main"] = {"summary": run.summary, "duration": run.duration, "attribution": att,
                      "attribution_error": error, "attribution_within_2pct": error < 0.02,
                      "rates": prof["rates"], "trace": prof.get("trace")}

    # 3. Always-on overhead: interleaved runs with the timeline on and off.
    if not args.no_overhead:
        result["overhead"] = _overhead(llm, workload, args)

    # 4. Deep mode over windows of steps.
    if not args.no_deep:
        result["deep"] = [_deep(llm, workload, prof["rates"], first, count) for first, count in windows]

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {args.out}")


def _overhead(llm, workload, args) -> dict:
    wl = workload if args.overhead_requests == args.num_requests else make_workload(
        "sharegpt-like", num_requests=args.overhead_requests, vocab_size=llm.vocab_size, seed=0)
    tput = {True: [], False: []}
    for i in range(args.repeats):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            llm.engine.set_timeline(on)
            r = run_engine(llm, wl)
            tput[on].append(r.summary["output_throughput"])
            print(f"overhead run {i}: timeline {'on ' if on else 'off'} {tput[on][-1]:.1f} out tok/s", flush=True)
    llm.engine.set_timeline(True)
    on, off = median_spread(tput[True]), median_spread(tput[False])
    overhead = 1 - on["median"] / off["median"]
    print(f"always-on overhead: {overhead:+.2%} of output throughput (median on {on['median']:.1f}, "
          f"off {off['median']:.1f} out tok/s; target < 1%)")
    return {"num_requests": len(wl), "repeats": args.repeats, "timeline_on": on, "timeline_off": off,
            "overhead": overhead, "within_1pct": overhead < 0.01}


def _deep(llm, workload, rates: dict, first: int, count: int) -> dict | None:
    """One run with deep mode over steps [first, first + count): device time by kernel class vs roofline."""
    deep = run_engine(llm, workload, profile="kernels", kernel_window=(first, count))
    kp = deep.stats.kernel_profile
    if kp is None or not kp.kernels:
        print(f"deep mode, steps from {first}: no kernels recorded (the run has fewer steps?)")
        return None
    st = deep.stats
    kb = kernel_breakdown(kp, deep.steps, llm.spec, st.weight_bytes, st.kv_bytes_per_token, rates)
    w = deep.steps.iloc[kp.first_step:kp.last_step + 1]
    running = float(w["num_running"].mean()) if "num_running" in w else float("nan")
    print(f"deep mode, steps {kp.first_step}-{kp.last_step} (mean running {running:.0f}):")
    print(format_kernels(kb))
    return {"first_step": kp.first_step, "last_step": kp.last_step, "mean_running": running, "window_s": kp.window,
            "profiler_overhead_s": kp.overhead, "kernel_breakdown": kb.to_dict("records"),
            "top_kernels": _top_kernels(kp)}


def _top_kernels(kp, n: int = 15) -> list[dict]:
    total: dict[tuple[str, str], float] = {}
    for name, cls, _, _, own in kp.kernels:
        total[(name[:120], cls)] = total.get((name[:120], cls), 0.0) + own
    top = sorted(total.items(), key=lambda kv: -kv[1])[:n]
    return [{"name": name, "class": cls, "seconds": s} for (name, cls), s in top]


if __name__ == "__main__":
    main()
