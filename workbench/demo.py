"""``python -m workbench demo``: the workbench's main job, on a laptop CPU, in under two minutes.

A small sweep (KV block size x prefix caching) of the model shipped in data/models/ on a shared-prefix
workload, each point run ``repeats`` times; prints the recommendation and the results table, writes the
self-contained ``report.html`` into the current directory and says how to open it and the notebooks.
With a GPU present it also says which preset and flags to use for a real run there (the demo itself
always runs on the CPU, so that its numbers are comparable from one machine to the next).

Nothing here measures or ranks: the sweep, `workbench.metrics.best_settings` and the report do; this
module picks the demo's settings and words the result for a first-time user. Result columns are named
through the results schema (`_api`), so none is spelled here.
"""
from __future__ import annotations

import argparse
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
GRID = dict(block_size=[8, 16, 32], enable_prefix_caching=[True, False])  # EngineConfig field: values
WORKLOAD = "shared-prefix"
WORKLOAD_ARGS = dict(num_prefixes=2, prefix_len=96, suffix_len=16, output_len=16)
# Otherwise the engine's defaults, so that the recommended config is one to take to a GPU: the KV pool is
# the CPU default (0.9 of the engine's CPU budget; the same memory for every block size, room for every
# request at once), and max_model_len the shipped model's context.
BASE_CONFIG = dict(device="cpu", max_model_len=2048)
NUM_REQUESTS = 32
REPEATS = 3

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
        C = _api()[2]
        return len(self.results) > 0 and bool((self.results[C.status] == "ok").all())


class _SameName:
    """Column names before the results schema existed: ``C.label`` is "label"."""

    def __getattr__(self, name: str) -> str:
        return name


def _api():
    """(schema, recommend, C): the results schema, the recommendation's wording and the column names (the
    sweeps issue, #14). Before that issue: (None, None, names as written), and the fallbacks below.
    Imported on use, so `python -m workbench --help` stays light."""
    try:
        from . import recommend, schema
    except ImportError:
        return None, None, _SameName()
    return schema, recommend, schema.C


def demo_model() -> str:
    """The shipped checkpoint folder, or the random-weight "tiny" preset when it is not there (a
    non-editable install does not carry data/)."""
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "config.json").exists() else "tiny"


def has_repeats() -> bool:
    """Whether the sweep runs each point several times (`Sweep(repeats=N)`, from the sweeps issue, #14)."""
    return _api()[0] is not None


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
    kwargs = dict(repeats=repeats) if has_repeats() else {}
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
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(threads or (int(omp) if omp.isdigit() and int(omp) > 0 else 1))
    try:
        results = sweep.run()
        sweep.write_report(path, title=f"paged-workbench demo: block size x prefix caching, {sweep.model_name} "
                                       f"on the CPU, {num_requests} shared-prefix requests")
    finally:
        sweep.close()
        torch.set_num_threads(previous)
    notes = [] if has_repeats() else [
        f"this workbench's Sweep has no `repeats` yet: each point ran once, not {repeats} times"]
    return DemoResult(results, path, metrics.best_settings(results), time.perf_counter() - t0,
                      repeats if not notes else None, notes)


# --- what the command prints ------------------------------------------------------------------------------

def recommendation_lines(result: DemoResult) -> list[str]:
    """The recommendation in words: the best setting per objective with its margin and noise, and the
    throughput pick as an EngineConfig line and a `vllm serve` command (as the report writes them)."""
    _, recommend, C = _api()
    rec = result.recommendation
    if len(rec) == 0:
        return ["No recommendation: no point of the sweep ran (see the failures below)."]
    first = rec.iloc[0]
    lines = [f"Recommendation: {first[C.label]} (best {first['objective'].removeprefix('max ')} on this "
             "machine's CPU and this workload)", "Best setting per objective:"]
    best = result.results[result.results[C.point_id] == first[C.point_id]].iloc[0]
    if recommend is not None:
        for r in recommend.recommendations(result.results):
            lines.append(f"  {r['objective']}: {r[C.label]}, {r['value_text']}; {r['verdict']}")
        row = best.to_dict()
        config_line, serve = recommend.engine_config_line(row), recommend.vllm_serve_command(row)
    else:  # before the sweeps issue (#14): best_settings' value only, and the two swept settings
        swept = {k: getattr(best[k], "item", lambda k=k: best[k])() for k in GRID if k in best}
        for r in rec.to_dict("records"):
            lines.append(f"  {r['objective']}: {r[C.label]} ({r['column']} = {r['value']:.4g})")
        config_line = "EngineConfig(" + ", ".join(f"{k}={v!r}" for k, v in swept.items()) + ")"
        serve = (f"vllm serve MODEL --block-size {swept[C.block_size]} "
                 + ("--enable-prefix-caching" if swept[C.enable_prefix_caching] else "--no-enable-prefix-caching"))
    return lines + [f"  as a config:  {config_line}", f"  in vLLM:      {serve}",
                    "  (measured on a CPU with a 6M-parameter model: rerun on your GPU with your model before you "
                    "ship it)"]


def table_text(results) -> str:
    """The results table as text, one row per point: the CLI sweep's summary columns."""
    schema, _, C = _api()
    if schema is not None:
        cols = [c for c in schema.SUMMARY_COLUMNS if c in results]
        return results[cols].rename(columns=schema.title).to_string(
            index=False, formatters={schema.title(c): (lambda v, c=c: schema.fmt(c, v)) for c in cols})
    cols = [c for c in (C.label, C.status, C.output_throughput, C.ttft_p99_ms, C.tpot_p99_ms, C.prefix_cache_hit_rate,
                        C.internal_fragmentation_mean) if c in results]
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
        share = last.gpu_memory_utilization
        util = "" if share == 0.9 else f" --set gpu_memory_utilization={share}"
        repeats = " --repeats 3" if has_repeats() else ""
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
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def run_demo_command(args) -> int:
    """The demo command: 0 when every point ran, 1 when some failed, 2 for a bad argument."""
    print(f"paged-workbench demo: {WORKLOAD} workload, {args.num_requests} requests; grid "
          + " x ".join(f"{k} {v}" for k, v in GRID.items())
          + f"; {args.repeats} runs per point; model {Path(demo_model()).name} on the CPU.", flush=True)
    try:
        result = run_demo(args.out_dir, args.num_requests, args.repeats, progress=not args.no_progress)
    except ValueError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = [""] + recommendation_lines(result) + ["", table_text(result.results), ""]
    C = _api()[2]
    if len(result.results) and C.status in result.results:
        for r in result.results[result.results[C.status] != "ok"].to_dict("records"):
            out.append(f"FAILED {r[C.label]}: {r.get(C.error)}")
    notes = "".join(f" Note: {n}." for n in result.notes)
    out += [f"{len(result.results)} points in {result.duration_s:.0f} s.{notes}",
            ""] + next_steps(result)
    advice = gpu_advice()
    if advice:
        out += [""] + advice
    print("\n".join(out))
    return 0 if result.ok else 1
