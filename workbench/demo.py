"""``python -m workbench demo``: the workbench's main job, on a laptop CPU, in under two minutes.

A small sweep (KV block size x prefix caching) of the model shipped in data/models/ on a shared-prefix
workload, each point run ``repeats`` times; prints the recommendation and the results table, writes the
self-contained ``report.html`` into the current directory and says how to open it and the notebooks.
With a GPU present it also says which preset and flags to use for a real run there (the demo itself
always runs on the CPU, so that its numbers are comparable from one machine to the next).

Nothing here measures or ranks: the sweep, `workbench.metrics.best_settings` and the report do; this
module picks the demo's settings and words the result for a first-time user.
"""
from __future__ import annotations

import argparse
import inspect
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "data" / "models" / "pystdlib-llama-6m"
NOTEBOOKS = ROOT / "notebooks"

# The demo's sweep: the two settings whose effect the shared-prefix workload shows best. Every request
# starts with one of two 96-token system prompts, so prefix caching can serve about 85% of the prompt
# tokens from the cache, and the block size decides how much of each prompt is cacheable (whole blocks
# only) and how many slots the last block of each request wastes.
GRID = {"block_size": [8, 16, 32], "enable_prefix_caching": [True, False]}
WORKLOAD = "shared-prefix"
WORKLOAD_ARGS = {"num_prefixes": 2, "prefix_len": 96, "suffix_len": 16, "output_len": 16}
# The same KV memory for every block size (a 5% share of the engine's CPU pool budget: about 8,700 token
# slots for this model, room for every request at once), so block sizes are compared at equal memory.
BASE_CONFIG = {"device": "cpu", "max_model_len": 256, "gpu_memory_utilization": 0.05}
NUM_REQUESTS = 32
REPEATS = 3
# What the results table shows (the CLI's sweep table; every column is in the report).
TABLE_COLUMNS = ("label", "status", "output_throughput", "ttft_p99_ms", "tpot_p50_ms", "prefix_cache_hit_rate",
                 "internal_fragmentation_mean")

# A first real run on a GPU: the presets to try, largest first, and the sweep to run with the one that fits.
GPU_PRESETS = ("llama-3.1-8b", "llama-3.2-3b", "llama-3.2-1b")
GPU_GRID = "--grid block_size=16,32 --grid enable_prefix_caching=true,false --grid max_num_batched_tokens=2048,8192"


@dataclass
class DemoResult:
    """What `run_demo` produced: the sweep's results table, the report's path, the recommendation (the rows
    of `metrics.best_settings`, best output throughput first), the wall time and the repeats used."""

    results: "object"
    report_path: str
    recommendation: "object"
    duration_s: float
    repeats: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every point of the sweep ran (no failed point)."""
        return len(self.results) > 0 and bool((self.results["status"] == "ok").all())


def demo_model() -> str:
    """The shipped checkpoint folder, or the random-weight "tiny" preset when it is not there (a
    non-editable install does not carry data/)."""
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "config.json").exists() else "tiny"


def sweep_supports(name: str) -> bool:
    """Whether `workbench.Sweep` takes the keyword ``name`` (``repeats`` arrives with the sweeps issue)."""
    from .sweep import Sweep

    return name in inspect.signature(Sweep).parameters


def build_sweep(num_requests: int = NUM_REQUESTS, repeats: int = REPEATS, block_sizes=None, progress: bool = True):
    """The demo's `Sweep` (not run): the shipped model on the CPU, GRID on a shared-prefix workload.

    block_sizes: replaces GRID's block sizes (tests use fewer). repeats: runs per point, passed on when the
    Sweep takes it (otherwise each point runs once; see DemoResult.notes).
    """
    from engine import EngineConfig

    from .sweep import Sweep

    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests}: the demo needs at least 1 request")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: the demo needs at least 1 run per point")
    grid = dict(GRID, block_size=list(block_sizes)) if block_sizes else dict(GRID)
    kwargs = {"repeats": repeats} if sweep_supports("repeats") else {}
    model = demo_model()
    return Sweep(model, WORKLOAD, grid, EngineConfig(**BASE_CONFIG), num_requests=num_requests,
                 workload_args=WORKLOAD_ARGS, progress=progress, model_name=Path(model).name, **kwargs)


def run_demo(out_dir: str = ".", num_requests: int = NUM_REQUESTS, repeats: int = REPEATS, block_sizes=None,
             progress: bool = True, threads: int | None = None) -> DemoResult:
    """Run the demo sweep and write ``out_dir/report.html``; returns a `DemoResult`.

    threads: torch CPU threads during the sweep (default 1, or OMP_NUM_THREADS when set): the model is
    tiny, and on a machine whose cores are busy OpenMP threads that spin-wait for each other make it
    several times slower, never faster. The previous thread count is restored afterwards.
    """
    import torch

    from . import metrics

    t0 = time.perf_counter()
    sweep = build_sweep(num_requests, repeats, block_sizes, progress)  # checks the arguments; loads nothing yet
    path = os.path.join(out_dir, "report.html")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"out_dir={out_dir!r} is not writable: run the demo in a folder you can write to")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or 1))
    try:
        results = sweep.run()
        sweep.write_report(path, title=f"paged-workbench demo: block size x prefix caching, {sweep.model_name} "
                                       f"on the CPU, {num_requests} shared-prefix requests")
    finally:
        sweep.close()
        torch.set_num_threads(previous)
    notes = [] if sweep_supports("repeats") else [
        f"this workbench's Sweep has no `repeats` yet: each point ran once, not {repeats} times"]
    return DemoResult(results, path, metrics.best_settings(results), time.perf_counter() - t0,
                      repeats if not notes else None, notes)


# --- what the command prints ------------------------------------------------------------------------------

def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def recommendation_lines(result: DemoResult) -> list[str]:
    """The recommendation in words: the best setting per objective, and the throughput pick as an
    EngineConfig line and `vllm serve` flags (the two swept settings)."""
    rec = result.recommendation
    if len(rec) == 0:
        return ["No recommendation: no point of the sweep ran (see the failures below)."]
    first = rec.iloc[0]
    lines = [f"Recommendation: {first['label']} (best {first['objective'].removeprefix('max ')} on this machine's "
             "CPU and this workload)", "Best setting per objective:"]
    base = ("objective", "column", "value", "point_id", "label")
    for r in rec.to_dict("records"):
        # Whatever else best_settings says about its pick (margin, settings equivalent within noise) follows.
        extra = "".join(f"; {k}: {_fmt(v)}" for k, v in r.items() if k not in base and v is not None and v == v)
        lines.append(f"  {r['objective']:<22} {r['label']:<18} ({r['column']} = {_fmt(r['value'])}{extra})")
    best = result.results[result.results["point_id"] == rec["point_id"].iloc[0]].iloc[0]
    fields = {k: getattr(best[k], "item", lambda: best[k])() for k in GRID if k in best}
    if fields:
        args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        flags = []
        if "block_size" in fields:
            flags.append(f"--block-size {int(fields['block_size'])}")
        if "enable_prefix_caching" in fields:
            flags.append("--enable-prefix-caching" if bool(fields["enable_prefix_caching"])
                         else "--no-enable-prefix-caching")
        lines += [f"  as a config:  EngineConfig({args})", f"  in vLLM:      vllm serve MODEL {' '.join(flags)}",
                  "  (a CPU and a 6M-parameter model: rerun on your GPU with your model before you ship it)"]
    return lines


def table_text(results) -> str:
    """The results table as text, one row per point."""
    cols = [c for c in TABLE_COLUMNS if c in results]
    return results[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def gpu_advice() -> list[str]:
    """With a CUDA GPU: the largest of GPU_PRESETS that the memory planner says fits it (at
    gpu_memory_utilization 0.9, else 0.8) and the command for a real sweep on it; with none, an empty
    list. Never raises: advice that cannot be made is left out."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        from engine import EngineConfig

        from .planner import plan

        name, last = torch.cuda.get_device_name(), None
        for util in (0.9, 0.8):
            for preset in GPU_PRESETS:
                try:
                    last = plan(preset, "current", EngineConfig(max_model_len=4096, gpu_memory_utilization=util))
                except ValueError:
                    continue
                if last.fits:
                    break
            if last is not None and last.fits:
                break
        if last is None or not last.fits:
            why = f": {last.reason}" if last is not None else ""
            return [f"A GPU is present ({name}), but the planner fits none of {', '.join(GPU_PRESETS)} on it{why}. "
                    "Pass your own checkpoint folder as --model to `python -m workbench sweep`."]
        util = "" if last.gpu_memory_utilization == 0.9 else f" --set gpu_memory_utilization={last.gpu_memory_utilization}"
        repeats = " --repeats 3" if sweep_supports("repeats") else ""
        return [f"A GPU is present ({name}). This demo ran on the CPU; for a real run on the GPU:",
                f"  python -m workbench sweep --model {last.model} --device cuda --workload shared-prefix "
                f"--num-requests 512 \\\n      {GPU_GRID}{util} --set max_model_len=4096{repeats} "
                "--out results.jsonl --html report.html",
                f"  ({last.model} with random weights, which the planner fits on this GPU; --model also takes "
                "your checkpoint folder)",
                f"  notebooks: in the first (parameters) cell set MODEL = \"{last.model}\", DEVICE = \"cuda\", "
                "GPU = \"current\""]
    except Exception as e:  # noqa: BLE001 - advice is optional; the demo's result is not
        return [f"(no GPU advice: {type(e).__name__}: {e})"]


def next_steps(result: DemoResult) -> list[str]:
    """How to open the report and the notebooks."""
    report = Path(result.report_path).resolve()
    lines = [f"Report: {report}",
             f"  open it in any browser (one file, works offline): python -m webbrowser -t {report.as_uri()}"]
    if NOTEBOOKS.is_dir():
        names = ", ".join(p.name for p in sorted(NOTEBOOKS.glob("*.ipynb")))
        lines += [f"Notebooks ({names}), with the dev extra (JupyterLab):",
                  f"  cd {shlex.quote(str(ROOT))} && pip install -e \".[dev]\" && jupyter lab notebooks/"]
    return lines


# --- the command ---------------------------------------------------------------------------------------

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=NUM_REQUESTS, metavar="N",
                   help="requests per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=REPEATS, metavar="N",
                   help="runs per point, for the noise (default: %(default)s)")
    p.add_argument("--out-dir", default=".", metavar="DIR", help="where report.html goes (default: here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_demo_command(args) -> int:
    """The demo command: 0 when every point ran, 1 when some failed, 2 for a bad argument."""
    print(f"paged-workbench demo: {WORKLOAD} workload, {args.num_requests} requests; grid "
          + " x ".join(f"{k} {v}" for k, v in GRID.items())
          + f"; {args.repeats} runs per point; model {Path(demo_model()).name} on the CPU.", flush=True)
    try:
        result = run_demo(args.out_dir, args.num_requests, args.repeats, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = [""] + recommendation_lines(result) + ["", table_text(result.results), ""]
    if len(result.results) and "status" in result.results:
        for r in result.results[result.results["status"] != "ok"].to_dict("records"):
            out.append(f"FAILED {r['label']}: {r.get('error')}")
    out += [f"{len(result.results)} points in {result.duration_s:.0f} s." + "".join(f" Note: {n}." for n in result.notes),
            ""] + next_steps(result)
    advice = gpu_advice()
    if advice:
        out += [""] + advice
    print("\n".join(out))
    return 0 if result.ok else 1
