"""Command line for headless runs on GPU VMs: ``python -m workbench COMMAND ...``.

Each command is one entry of COMMANDS: (name, help, add_arguments(parser), run(args) -> exit code).
To add a command, write those two functions and append an entry.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.config import parse_value


def parse_assignment(text: str, many: bool = False):
    """``KEY=VALUE`` (or ``KEY=V1,V2,...`` with many=True) -> (key, value or [values])."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    key, _, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not key:
        raise argparse.ArgumentTypeError(f"{text!r} has no key before '='")
    return key, [parse_value(v) for v in value.split(",")] if many else parse_value(value)


def _grid_item(text):
    return parse_assignment(text, many=True)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: use an integer >= 1")
    return value


def _stem(model: str, workload: str) -> str:
    return f"{Path(model.rstrip('/')).name}-{Path(workload).stem}"


# --- arguments both commands take ----------------------------------------------------------------------

def add_model_arguments(p: argparse.ArgumentParser, default_model: str | None, default_requests: int | None) -> None:
    p.add_argument("--model", required=default_model is None, default=default_model, metavar="PRESET|DIR",
                   help="a model preset with random weights (tiny, llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, "
                        "mistral-7b, qwen2.5-7b, llama-3.1-70b) or a Hugging Face checkpoint folder"
                        + (" (default: %(default)s)" if default_model else ""))
    p.add_argument("--workload", default="sharegpt-like", metavar="NAME|FILE",
                   help="a built-in workload (fixed, sharegpt-like, shared-prefix, multi-turn) or a .jsonl trace "
                        "(looked up in data/workloads/ when not a path); default: %(default)s")
    p.add_argument("--num-requests", type=positive_int, default=default_requests, metavar="N",
                   help="number of requests, >= 1 (default: " + (str(default_requests) if default_requests
                                                                else "the workload's") + ")")
    p.add_argument("--workload-arg", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the built-in workload, e.g. prefix_len=512 or output_len=64; repeatable")
    p.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="FIELD=VALUE",
                   help="an EngineConfig field held fixed for every point, e.g. max_model_len=2048; repeatable")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the engine runs (default: CUDA when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the workload (default: 0)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _base_config(args):
    from engine import EngineConfig

    from .schema import C

    base = dict(args.set)
    if args.device:
        base[C.device] = args.device
    return EngineConfig(**base)


# --- sweep ---------------------------------------------------------------------------------------------

def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, None, None)
    p.add_argument("--arrival", choices=["offline", "poisson", "concurrency"],
                   help="arrival process: all at t=0, Poisson at --request-rate, or --concurrency in flight "
                        "(default: offline)")
    p.add_argument("--request-rate", type=float, metavar="REQ_PER_S", help="Poisson arrival rate (requests/s)")
    p.add_argument("--concurrency", type=positive_int, metavar="C", help="requests kept in flight (closed loop)")
    p.add_argument("--grid", type=_grid_item, action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="an EngineConfig field and the values to sweep, e.g. block_size=8,16,32 or "
                        "enable_prefix_caching=true,false or quantization=none,int8, or the workload's sampling: "
                        "n=1,2,4 (completions per request) or beam_width=none,2,4 (beam search); repeatable (the "
                        "grid is the product; repeated values run once)")
    p.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                   help="runs per point, interleaved across points; results are the median with min-max "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype of a preset model (default: the engine's)")
    p.add_argument("--slo-ttft", type=float, metavar="SECONDS", help="TTFT SLO for goodput, in seconds")
    p.add_argument("--slo-tpot", type=float, metavar="SECONDS", help="TPOT SLO for goodput, in seconds")
    p.add_argument("--slo-e2e", type=float, metavar="SECONDS", help="end-to-end latency SLO for goodput, in seconds")
    p.add_argument("--out", metavar="PATH", help="results file, .parquet or .jsonl, one row per run, appended as "
                   "runs finish; rerunning with the same file skips finished points (default: "
                   "./sweep-MODEL-WORKLOAD.jsonl)")
    p.add_argument("--html", metavar="PATH", help="the self-contained HTML report (default: the results file's "
                   "name with .html)")
    p.add_argument("--title", default="paged-workbench sweep report", help="title of the HTML report")
    p.add_argument("--no-warmup", action="store_true", help="skip the short warm-up before each point")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--telemetry", choices=["auto", "on", "off"], default="auto",
                   help="NVML GPU sampling: auto (when an NVIDIA GPU is there), on (fail without one), off")
    p.add_argument("--telemetry-interval", type=float, default=0.1, metavar="SECONDS",
                   help="NVML sampling interval (default: %(default)s s)")
    p.add_argument("--max-duration", type=float, metavar="SECONDS",
                   help="fail a point whose run takes longer than this")
    p.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed in --out")
    p.add_argument("--save-workload", metavar="PATH", help="also write the workload trace as JSONL here")
    p.add_argument("--trace", metavar="DIR", help="write each point's run as a Chrome trace-event JSON file "
                   "(Perfetto) into this folder, named by point id")
    p.add_argument("--executor", choices=["sequential", "ray"], default="sequential",
                   help="run points one after another here, or in parallel on Ray actors, one per group of "
                        "tensor_parallel_size GPUs (pip install -e '.[ray]'); default: %(default)s")
    p.add_argument("--address", metavar="ADDR", help="with --executor ray: a running Ray cluster to join "
                   "(e.g. auto or ray://HOST:10001); default: start Ray on this machine")
    p.add_argument("--num-workers", type=positive_int, metavar="N",
                   help="with --executor ray: at most N actors (default: as many as the GPUs, or CPUs, allow)")


def run_sweep(args) -> int:
    import torch

    from . import schema
    from .schema import C
    from .sweep import Sweep

    workload_args = dict(args.workload_arg)
    for key in (C.arrival, C.request_rate, C.concurrency):  # workload parameters, recorded as these columns
        if getattr(args, key) is not None:
            workload_args[key] = getattr(args, key)
    if C.request_rate in workload_args and C.arrival not in workload_args:
        workload_args[C.arrival] = "poisson"
    if C.concurrency in workload_args and C.arrival not in workload_args:
        workload_args[C.arrival] = C.concurrency
    grid = {}
    for key, values in args.grid:
        grid.setdefault(key, []).extend(values)
    slo = {k: v for k, v in (("ttft", args.slo_ttft), ("tpot", args.slo_tpot), ("e2e", args.slo_e2e)) if v is not None}
    out = args.out or f"sweep-{_stem(args.model, args.workload)}.jsonl"
    html = args.html or str(Path(out).with_suffix(".html"))
    sweep = Sweep(model=args.model, workload=args.workload, grid=grid, base_config=_base_config(args), slo=slo,
                  out=out, warmup=not args.no_warmup, progress=not args.no_progress,
                  num_requests=args.num_requests, workload_args=workload_args,
                  telemetry={"auto": None, "on": True, "off": False}[args.telemetry],
                  telemetry_interval=args.telemetry_interval, seed=args.seed,
                  dtype=getattr(torch, args.dtype) if args.dtype else None, max_duration=args.max_duration,
                  retry_failed=args.retry_failed, repeats=args.repeats, executor=args.executor,
                  ray_address=args.address, num_workers=args.num_workers)
    sweep.announce = lambda message: print(message, file=sys.stderr)
    if args.save_workload:
        sweep.workloads[0].save_jsonl(args.save_workload)
    try:
        df = sweep.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: saved {sweep.saved_points()} of {len(sweep.points)} points to {out}; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        sweep.close()
    cols = [c for c in schema.SUMMARY_COLUMNS if c in df]
    print(df[cols].rename(columns=schema.title).to_string(
        index=False, formatters={schema.title(c): (lambda v, c=c: schema.fmt(c, v)) for c in cols}))
    print(f"results: {out}")
    if args.trace:
        from .trace_export import write_sweep_traces
        for label, path in write_sweep_traces(sweep, args.trace).items():
            print(f"trace of {label}: {path}")
    try:
        import plotly  # noqa: F401 - the report needs it; a headless GPU VM may not have it
    except ImportError:
        print(f"no report: plotly is not installed (pip install plotly, then rerun the same command: it only "
              f"writes the report from {out})", file=sys.stderr)
    else:
        print(f"report: {sweep.write_report(html, title=args.title)}")
    failed = df[df[C.status] != "ok"] if len(df) else df
    if len(failed):
        reasons = failed[C.error].fillna("").map(lambda e: str(e).split(":")[0] or "unknown error").value_counts()
        why = ", ".join(f"{n} {r}" for r, n in reasons.items())
        print(f"FAILED: {len(failed)} of {len(df)} points ({why}); see the report's first section", file=sys.stderr)
        return 1
    return 0


# --- bench ---------------------------------------------------------------------------------------------

def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, "llama-3.1-8b", 256)
    p.add_argument("--baseline", nargs="?", const="naive", choices=["naive", "hf-cb"],
                   help="also run a baseline: naive (the default) is HF transformers generate on static batches; "
                        "hf-cb is transformers' own continuous batching (paged KV cache)")
    p.add_argument("--baseline-batch-size", type=positive_int, default=128, metavar="B",
                   help="largest static batch of the naive baseline (default: %(default)s)")
    p.add_argument("--out", metavar="PATH", help="write the results as JSON here (default: "
                   "./bench-MODEL-WORKLOAD.json)")
    p.add_argument("--trace", metavar="PATH", help="write the run as a Chrome trace-event JSON here (Perfetto)")
    p.add_argument("--profile", choices=["kernels"], help="deep mode: torch.profiler over a window of steps, "
                   "device time by kernel class against each class's roofline")


def run_bench(args) -> int:
    from .bench import bench
    from .point_run import model_vocab_size
    from .workloads import resolve_workload

    config = _base_config(args)
    workload = resolve_workload(args.workload, args.num_requests, model_vocab_size(args.model), args.seed,
                                dict(args.workload_arg))
    out = args.out or f"bench-{_stem(args.model, args.workload)}.json"
    bench(args.model, workload, config, baseline=args.baseline, baseline_batch_size=args.baseline_batch_size,
          out=out, seed=args.seed, trace=args.trace, profile=args.profile)
    print(f"results: {out}")
    return 0


COMMANDS = [
    ("sweep", "run a grid of engine settings on one workload; write results and an HTML report",
     add_sweep_arguments, run_sweep),
    ("bench", "one workload, one config: throughput and latency against the naive baseline and the physical limit",
     add_bench_arguments, run_bench),
]

# The first command a new user runs (the README's); its logic is all in demo.py.
from .demo import add_demo_arguments, run_demo_command  # noqa: E402

COMMANDS.insert(0, ("demo", "a small sweep on the shipped model on the CPU: the recommendation, the table and "
                    "report.html in under two minutes", add_demo_arguments, run_demo_command))


def _loadtest_arguments(p):  # the command lives in workbench/loadtest_cli.py (issue 21)
    from .loadtest_cli import add_arguments

    add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _loadtest_run(args) -> int:
    from .loadtest_cli import run

    return run(args)


COMMANDS.append(("loadtest", "replay a workload against an OpenAI-compatible endpoint (or servers started per grid "
                 "point) over streaming HTTP", _loadtest_arguments, _loadtest_run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="paged-workbench: profile paged LLM "
                                     "inference from the command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv=None) -> int:
    """Run a command. Exit status: 0 every point ok, 1 some failed (or an unexpected error), 2 bad arguments
    or config values (one line on stderr; --debug shows the traceback), 130 interrupted."""
    args = build_parser().parse_args(argv)
    if not args.debug:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        logging.getLogger("workbench").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        bad_input = isinstance(e, (ValueError, OSError)) or type(e).__name__ == "StoreLockedError"
        print(f"error: {e}", file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
