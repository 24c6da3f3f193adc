"""Check the memory planner against the engine on this machine's GPU, in one run (issue 7's targets).

1. Block count: for llama-3.2-3b and llama-3.1-8b (LLM.random, bf16 weights) at max_num_batched_tokens
   2048 / 8192 / 16384 and gpu_memory_utilization 0.5 / 0.7 / 0.9, with quantization None and "int8",
   plan(...).num_gpu_blocks is within 5% of the engine's num_gpu_blocks.
2. No OOM: every config the planner calls "fits" survives engine.loadtest.load_test (requests of
   max_model_len until the KV pool is full and preemption starts) without a CUDA out-of-memory error.
3. Start-up errors: configs the planner says do not fit (llama-3.1-70b bf16 on one GPU; max_model_len=131072
   at the memory share that leaves about 32k tokens of KV) fail when the engine starts, with its ValueError;
   and the verdict agrees with the engine's on both sides of the boundary (0.9x and 1.1x the planned tokens).

Each model runs in its own process (a fresh CUDA context, as a user's first LLM(...) gets). The engine
starts fresh for the first config and is reconfigured for the others. Load tests share a time budget;
one that runs out of time says so (stop_reason "time limit"). Results go to
data/benchmarks/planner_h100.json and, when set, $OUT/planner_h100.json.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/planner_check.py [--calibration FILE] [--budget-s 360]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, EngineConfig  # noqa: E402
from engine.loadtest import load_test  # noqa: E402
from workbench import planner  # noqa: E402

MODELS = ("llama-3.2-3b", "llama-3.1-8b")
BUDGETS = (2048, 8192, 16384)
SHARES = (0.5, 0.7, 0.9)
QUANTIZATIONS = (None, "int8")
TOLERANCE = 0.05


def environment(command: list[str]) -> dict:
    if not torch.cuda.is_available():
        return {"device_name": "cpu", "torch": torch.__version__, "python": platform.python_version(),
                "command": " ".join(command)}
    import triton
    dev = torch.cuda.current_device()
    return {"device_name": torch.cuda.get_device_name(dev),
            "total_memory": torch.cuda.get_device_properties(dev).total_memory,
            "mem_get_info_total": torch.cuda.mem_get_info(dev)[1], "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
            "command": " ".join(command)}


def gpu_for_planner() -> str:
    """The planner's table entry for this GPU when it has one (the prediction is made from the table), else
    "current"; "cpu" without CUDA (a dry run of this script against the engine's CPU pool)."""
    if not torch.cuda.is_available():
        return "cpu"
    return "H100-80GB" if "H100" in torch.cuda.get_device_name() else "current"


class Worker:
    """One model's checks in this process; rows are appended to a JSON file as they come."""

    def __init__(self, model: str, args, calibration: planner.Calibration, out: Path):
        self.model, self.args, self.cal, self.out = model, args, calibration, out
        self.gpu = gpu_for_planner()
        self.deadline = time.perf_counter() + args.worker_budget_s
        self.llm = None
        self.rows: list[dict] = []

    def save(self) -> None:
        self.out.write_text(json.dumps(self.rows))

    def start(self, cfg: EngineConfig) -> tuple[str | None, float]:
        """Start the engine for cfg (fresh or by reconfigure); returns (error or None, seconds)."""
        t = time.perf_counter()
        try:
            if self.llm is None:
                self.llm = LLM.random(self.model, cfg, dtype=torch.bfloat16)
            else:
                self.llm.reconfigure(cfg)
            return None, time.perf_counter() - t
        except (ValueError, NotImplementedError, torch.cuda.OutOfMemoryError) as exc:
            return f"{type(exc).__name__}: {exc}", time.perf_counter() - t

    def check(self, cfg: EngineConfig, kind: str, load_tests_left: int) -> dict:
        p = planner.plan(self.model, self.gpu, cfg, dtype="bfloat16", calibration=self.cal)
        row = {"kind": kind, "model": self.model, "quantization": cfg.quantization or "none",
               "max_num_batched_tokens": cfg.max_num_batched_tokens, "max_model_len": cfg.max_model_len,
               "gpu_memory_utilization": cfg.gpu_memory_utilization, "planner_gpu": self.gpu,
               "planner_verdict": p.verdict, "planner_reason": p.reason, "planner_blocks": p.num_gpu_blocks,
               "planner_weight_bytes": p.weight_bytes, "planner_activation_peak_bytes": p.activation_peak_bytes,
               "planner_kv_cache_bytes": p.kv_cache_bytes, "fresh_start": self.llm is None}
        error, seconds = self.start(cfg)
        row.update(start_error=error, start_seconds=seconds, engine_started=error is None)
        if error is None:
            st = self.llm.engine.stats()
            m = st.memory  # None on the CPU
            row.update(engine_blocks=st.num_gpu_blocks, engine_weight_bytes=st.weight_bytes,
                       engine_peak_activation_bytes=getattr(m, "peak_activation_bytes", None),
                       engine_non_torch_bytes=getattr(m, "non_torch_bytes", None),
                       engine_kv_cache_bytes=getattr(m, "kv_cache_bytes", None),
                       total_bytes=getattr(m, "total_bytes", None),
                       attention_backend=st.attention_backend, cuda_graphs=st.cuda_graphs,
                       block_rel_error=(p.num_gpu_blocks - st.num_gpu_blocks) / st.num_gpu_blocks)
            row.update(matching_calibration_blocks(row, self.gpu))
            left = self.deadline - time.perf_counter()
            if p.fits and left > 5:
                limit = min(self.args.load_test_cap_s, 0.8 * left / max(load_tests_left, 1))
                row["load_test"] = load_test(self.llm, time_limit=limit)
            elif p.fits:
                row["load_test"] = None
                row["load_test_skipped"] = "out of time budget"
        self.rows.append(row)
        self.save()
        summary = {k: row.get(k) for k in ("kind", "quantization", "max_num_batched_tokens", "gpu_memory_utilization",
                                           "max_model_len", "planner_verdict", "planner_blocks", "engine_blocks",
                                           "block_rel_error", "start_error")}
        lt = row.get("load_test") or {}
        summary.update({k: lt.get(k) for k in ("stop_reason", "num_preemptions", "max_kv_usage", "oom",
                                                "over_budget_bytes", "seconds")})
        print(json.dumps(summary), flush=True)
        return row

    def run(self) -> None:
        a = self.args
        base = dict(max_model_len=a.max_model_len, attention_backend=a.attention_backend)
        grid = [(T, u) for T in a.budgets for u in a.shares]
        quants = [None if q == "none" else q for q in a.quantizations]
        tests_left = len(grid) * len(quants) + (1 if a.boundary else 0)
        for i, q in enumerate(quants):
            for T, u in grid:
                self.check(EngineConfig(max_num_batched_tokens=T, gpu_memory_utilization=u, quantization=q, **base),
                           "grid", tests_left)
                tests_left -= 1
                if self.rows[-1]["start_error"] and "NotImplementedError" in self.rows[-1]["start_error"]:
                    break  # this quantization is not implemented in the engine yet: recorded once
            if i == 0 and a.boundary:
                self.boundary(base, tests_left)

    def boundary(self, base: dict, tests_left: int) -> None:
        """Start-up errors, and the verdict on both sides of the max_model_len boundary, at the smallest memory
        share that leaves about 32k tokens of KV (so the load test of the side that fits stays short)."""
        longest = planner.resolve_model(self.model)[1].max_position_embeddings
        share = next(u / 100 for u in range(5, 100) if planner.plan(
            self.model, self.gpu, EngineConfig(gpu_memory_utilization=u / 100, **base), dtype="bfloat16",
            calibration=self.cal).kv_tokens >= min(32768, longest // 2))
        at = planner.plan(self.model, self.gpu, EngineConfig(gpu_memory_utilization=share, **base),
                          dtype="bfloat16", calibration=self.cal)
        for kind, length in (("max_model_len too long", longest),
                             ("boundary x0.9", min(int(at.kv_tokens * 0.9), longest)),
                             ("boundary x1.1", min(int(at.kv_tokens * 1.1), longest))):
            self.check(EngineConfig(gpu_memory_utilization=share, max_model_len=length,
                                    attention_backend=self.args.attention_backend), kind, tests_left)


def matching_calibration_blocks(row: dict, gpu: str) -> dict:
    """The planner's blocks with the calibration of how this engine was started: a fresh LLM(...) gets
    CALIBRATION_H100_FRESH, a reconfigured one CALIBRATION_H100_RECONFIGURED (the default takes the larger)."""
    cal = planner.CALIBRATION_H100_FRESH if row["fresh_start"] else planner.CALIBRATION_H100_RECONFIGURED
    cfg = EngineConfig(max_num_batched_tokens=row["max_num_batched_tokens"], max_model_len=row["max_model_len"],
                       gpu_memory_utilization=row["gpu_memory_utilization"],
                       quantization=None if row["quantization"] == "none" else row["quantization"])
    blocks = planner.plan(row["model"], gpu, cfg, dtype="bfloat16", calibration=cal).num_gpu_blocks
    return {"matching_calibration_blocks": blocks,
            "matching_calibration_rel_error": (blocks - row["engine_blocks"]) / row["engine_blocks"]}


def replan(path: str, out: str) -> int:
    """Recompute the planner's side of a recorded result with the current planner and calibration (no GPU):
    the engine's numbers stay as measured; the planner's numbers as run are kept as as_run_*."""
    result = json.loads(Path(path).read_text())
    for r in result["rows"]:
        cfg = EngineConfig(**{k: r[k] for k in ("max_num_batched_tokens", "gpu_memory_utilization", "max_model_len")
                              if r.get(k) is not None},
                           quantization=None if r["quantization"] == "none" else r["quantization"])
        p = planner.plan(r["model"], r.get("planner_gpu", "H100-80GB"), cfg, dtype="bfloat16")
        for k, v in (("planner_verdict", p.verdict), ("planner_reason", p.reason), ("planner_blocks", p.num_gpu_blocks),
                     ("planner_weight_bytes", p.weight_bytes), ("planner_activation_peak_bytes",
                                                                p.activation_peak_bytes),
                     ("planner_kv_cache_bytes", p.kv_cache_bytes)):
            if k in r:
                r.setdefault("as_run_" + k, r[k])
            r[k] = v
        if r.get("engine_blocks"):
            r.setdefault("as_run_block_rel_error", r.get("block_rel_error"))
            r["block_rel_error"] = (p.num_gpu_blocks - r["engine_blocks"]) / r["engine_blocks"]
            r.update(matching_calibration_blocks(r, r.get("planner_gpu", "H100-80GB")))
    result["as_run_calibration_terms"] = result.pop("calibration_terms", None)
    result["calibration_terms"] = {k: getattr(planner.CALIBRATION_H100, k)
                                   for k in planner.Calibration.__dataclass_fields__}
    result["calibration"] = planner.CALIBRATION_H100.source
    result.setdefault("as_run_summary", result.get("summary"))
    result["summary"] = summarize(result["rows"])
    result["replan_command"] = " ".join([sys.executable, *sys.argv])
    Path(out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["summary"], indent=1))
    return 0


def check_70b(args, calibration: planner.Calibration) -> dict:
    """llama-3.1-70b bf16 on one GPU: the planner says the weights do not fit; the engine must refuse at start."""
    cfg = EngineConfig(attention_backend=args.attention_backend)
    p = planner.plan("llama-3.1-70b", gpu_for_planner(), cfg, dtype="bfloat16", calibration=calibration)
    before = torch.cuda.memory_allocated()
    try:
        LLM.random("llama-3.1-70b", cfg, dtype=torch.bfloat16)
        error = None
    except (ValueError, torch.cuda.OutOfMemoryError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"kind": "70b on one GPU", "model": "llama-3.1-70b", "quantization": "none", "planner_verdict": p.verdict,
            "planner_reason": p.reason, "start_error": error, "engine_started": error is None,
            "allocated_before_bytes": before, "allocated_after_bytes": torch.cuda.memory_allocated()}


def summarize(rows: list[dict]) -> dict:
    grid = [r for r in rows if r["kind"] == "grid" and r.get("engine_started")]
    errors = {}
    for q in sorted({r["quantization"] for r in grid}):
        e = [abs(r["block_rel_error"]) for r in grid if r["quantization"] == q]
        m = [abs(r["matching_calibration_rel_error"]) for r in grid if r["quantization"] == q
             and r.get("matching_calibration_rel_error") is not None]
        errors[q] = {"configs": len(e), "max_abs_rel_error": max(e), "within_5pct": sum(x <= TOLERANCE for x in e),
                     "max_abs_rel_error_matching_calibration": max(m) if m else None}
    tests = [r for r in rows if r.get("load_test")]
    fits_failed_start = [r for r in rows if r.get("planner_verdict") == "fits" and not r.get("engine_started")]
    not_fits = [r for r in rows if r.get("planner_verdict") not in (None, "fits")]
    return {
        "block_count": errors,
        "block_count_met": bool(errors) and all(v["max_abs_rel_error"] <= TOLERANCE for v in errors.values()),
        "load_tests": len(tests), "load_tests_oom": sum(bool(r["load_test"]["oom"]) for r in tests),
        "load_tests_error": sum(bool(r["load_test"]["error"]) for r in tests),
        "load_tests_reached_preemption": sum(r["load_test"]["stop_reason"] == "preemption" for r in tests),
        "load_tests_lost_requests": sum(r["load_test"]["num_lost"] for r in tests),
        "max_over_budget_bytes": max((r["load_test"].get("over_budget_bytes", 0) for r in tests), default=None),
        "fits_but_engine_refused": len(fits_failed_start),
        "does_not_fit": [{"kind": r["kind"], "model": r["model"], "verdict": r["planner_verdict"],
                          "engine_error_at_start": bool(r.get("start_error")) and "ValueError" in r["start_error"]}
                         for r in not_fits],
        "no_oom_met": bool(tests) and not any(r["load_test"]["oom"] for r in tests),
        # None: no config in this run was expected to fail
        "start_errors_met": all(bool(r.get("start_error")) and "ValueError" in r["start_error"] for r in not_fits)
        if not_fits else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", help="calibration JSON (default: the planner's committed constants)")
    ap.add_argument("--out", default="data/benchmarks/planner_h100.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--budget-s", type=float, default=360.0, help="time budget of all workers together (seconds)")
    ap.add_argument("--load-test-cap-s", type=float, default=20.0, help="most seconds one load test may run")
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS), help="max_num_batched_tokens values")
    ap.add_argument("--shares", nargs="+", type=float, default=list(SHARES), help="gpu_memory_utilization values")
    ap.add_argument("--quantizations", nargs="+", default=[q or "none" for q in QUANTIZATIONS])
    ap.add_argument("--no-boundary", dest="boundary", action="store_false",
                    help="skip the start-up error cases (max_model_len boundary, 70B)")
    ap.add_argument("--replan", help="recompute the planner's numbers of this result file with the current planner "
                                     "(no GPU) and write it to --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--first", action="store_true", help=argparse.SUPPRESS)  # this worker also checks the 70B
    ap.add_argument("--worker-budget-s", type=float, default=180.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replan:
        return replan(args.replan, args.out)
    cal = planner.CALIBRATION_H100
    if args.calibration:
        try:
            cal = planner.Calibration.from_json(args.calibration)
        except (OSError, KeyError) as exc:  # the calibration run failed: check the committed constants instead
            print(f"calibration {args.calibration} unusable ({exc!r}); using the planner's constants", flush=True)
            args.calibration = None
    if args.worker:
        w = Worker(args.models[0], args, cal, Path(args.worker))
        try:
            w.run()
        finally:
            if args.first and args.boundary and torch.cuda.is_available():
                w.rows.append(check_70b(args, cal))
            w.save()
        return 0
    command = [sys.executable, *sys.argv]
    rows, crashed = [], []
    start = time.perf_counter()
    for i, model in enumerate(args.models):
        budget = (args.budget_s - (time.perf_counter() - start)) / (len(args.models) - i)
        part = Path(tempfile.mkdtemp()) / "rows.json"
        cmd = [sys.executable, __file__, "--worker", str(part), "--models", model, "--worker-budget-s", f"{budget:.0f}",
               "--max-model-len", str(args.max_model_len), "--attention-backend", args.attention_backend,
               "--load-test-cap-s", str(args.load_test_cap_s), "--budgets", *map(str, args.budgets),
               "--shares", *map(str, args.shares), "--quantizations", *args.quantizations]
        cmd += (["--calibration", args.calibration] if args.calibration else []) + ([] if args.boundary else
                                                                                    ["--no-boundary"])
        if i == 0:
            cmd += ["--first"]
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            crashed.append({"model": model, "returncode": rc})
        if part.exists():
            rows += json.loads(part.read_text())
    result = {"environment": environment(command), "calibration": cal.source if not args.calibration else
              args.calibration,
              "calibration_terms": {k: getattr(cal, k) for k in planner.Calibration.__dataclass_fields__},
              "tolerance": TOLERANCE, "crashed_workers": crashed, "summary": summarize(rows), "rows": rows,
              "seconds": time.perf_counter() - start}
    text = json.dumps(result, indent=1, default=str)
    for path in [Path(args.out)] + ([Path(os.environ["OUT"]) / Path(args.out).name] if os.environ.get("OUT") else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(json.dumps(result["summary"], indent=1), flush=True)
    s = result["summary"]
    return 0 if s["block_count_met"] and s["no_oom_met"] and s["start_errors_met"] is not False and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())
