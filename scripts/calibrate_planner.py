"""Calibrate the memory planner (workbench/planner.py) against the engine's own memory profile on this GPU.

For each model (LLM.random presets, bf16) the engine starts once fresh, then is reconfigured over a grid
of (max_num_batched_tokens, max_num_seqs, gpu_memory_utilization); each start's profile step is read
from EngineStats.memory (total, weights, activation peak, non-torch, KV bytes) with the block count.
Exact terms (weights, rotary tables and input buffers, the profile step's own KV blocks) come from the
planner; what is left is fitted to the planner's model (workbench.planner.Calibration):

    forward peak = peak_activation - profile KV = c0 + max(T x (a x hidden + b x intermediate),
                                                          S x vocab x l + 2 x (T + S) x hidden)
    non_torch, other (base - weights - rotary/buffers)                     (means)

a, b by least squares over the points where the MLP term is the larger, l over the others, for reconfigured
engines (section "fit_reconfigured"); the fresh starts (what a user gets from LLM(...), section "fit_fresh")
keep those slopes and get their own c0 and overheads; section "fit", the planner's default, takes the larger of
each overhead, so its block count errs low rather than high however the engine was started.
safety_margin_bytes comes from a planner_check run (--margin-from): its largest over_budget_bytes, rounded up
to 512 MiB. The engine counts
device memory of every process as its non-torch memory, so this script keeps CUDA out of its parent process
while the per-model workers run (the first H100 run did not, and its non_torch rows include the parent's
~520 MiB context: data/planner/calibration_h100.json takes non_torch from the planner_check run instead,
--non-torch-from).
CUDA graphs are off here (they are captured after the pool is sized, so they do not change it).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/calibrate_planner.py [--out data/planner/calibration_h100.json]
    PYTHONPATH=. python3 scripts/calibrate_planner.py --refit data/planner/calibration_h100.json \
        --margin-from data/benchmarks/planner_h100.json       # no GPU: the fit again from the recorded rows
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, EngineConfig  # noqa: E402
from workbench import planner  # noqa: E402

MODELS = ("llama-3.2-3b", "llama-3.1-8b")
BUDGETS = (2048, 8192, 16384)
SHARES = (0.5, 0.7, 0.9)
# Extra profile shapes for the fit: other token budgets, and other sequence counts (profile KV blocks).
EXTRA = ((512, 256), (4096, 256), (12288, 256), (32768, 256), (8192, 32), (8192, 1024))


def environment() -> dict:
    import triton
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    return {"device_name": torch.cuda.get_device_name(dev), "total_memory": props.total_memory,
            "mem_get_info_total": torch.cuda.mem_get_info(dev)[1],
            "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "command": " ".join([sys.executable, *sys.argv])}


def row(llm, model: str, cfg: EngineConfig, fresh: bool, seconds: float) -> dict:
    """One start of the engine: what it measured, and the planner's exact terms for the same config."""
    st = llm.engine.stats()
    m = st.memory
    _, spec = planner.resolve_model(model)
    # Since issue 13 the profile holds only a few scratch KV blocks, left out of its peak, and MemoryProfile
    # records what torch held beside the weights (other_bytes) and the graph pool itself.
    base = m.weight_bytes + m.other_bytes
    static = planner.static_bytes(spec, cfg)
    prof_kv = 0
    return {
        "model": model, "fresh": fresh, "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_num_seqs": cfg.max_num_seqs, "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "block_size": cfg.block_size, "max_model_len": cfg.max_model_len,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size,
        "total_bytes": m.total_bytes, "weight_bytes": m.weight_bytes, "peak_activation_bytes": m.peak_activation_bytes,
        "non_torch_bytes": m.non_torch_bytes, "kv_cache_bytes": m.kv_cache_bytes, "base_bytes": base,
        "num_gpu_blocks": st.num_gpu_blocks, "kv_bytes_per_token": st.kv_bytes_per_token,
        "planner_weight_bytes": planner.weight_bytes(spec), "planner_static_bytes": static,
        "planner_profile_kv_bytes": prof_kv, "forward_peak_bytes": m.peak_activation_bytes - prof_kv,
        "other_bytes": base - m.weight_bytes - static,
        "engine_rule_blocks": m.kv_cache_bytes // (st.kv_bytes_per_token * cfg.block_size) - 1,
        "prefill_peak_bytes": m.prefill_peak_bytes, "decode_peak_bytes": m.decode_peak_bytes,
        "graph_pool_bytes": m.graph_pool_bytes, "margin_bytes": m.margin_bytes,
        "attention_backend": st.attention_backend, "start_seconds": seconds,
    }


def _stages(r: dict, a: float, b: float, l: float) -> tuple[float, float]:
    t, h, i = r["max_num_batched_tokens"], r["hidden_size"], r["intermediate_size"]
    s = max(1, min(r["max_num_seqs"], t))
    return t * (a * h + b * i), s * r["vocab_size"] * l + 2 * (t + s) * h


def fit(rows: list[dict]) -> dict:
    """The forward-peak terms (bytes) and mean overheads over `rows`; the MLP / logits split is iterated from
    first principles (8, 6, 6) until it is stable."""
    a, b, l, c0 = 8.0, 6.0, 6.0, 0.0
    for _ in range(5):
        mlp = [r for r in rows if _stages(r, a, b, l)[0] >= _stages(r, a, b, l)[1]]
        head = [r for r in rows if _stages(r, a, b, l)[0] < _stages(r, a, b, l)[1]]
        if len(mlp) >= 3:
            x = np.array([[1.0, r["max_num_batched_tokens"] * r["hidden_size"],
                           r["max_num_batched_tokens"] * r["intermediate_size"]] for r in mlp])
            (c0, a, b), *_ = np.linalg.lstsq(x, np.array([r["forward_peak_bytes"] for r in mlp], float), rcond=None)
        if head:
            l = float(np.mean([(r["forward_peak_bytes"] - c0 - _stages(r, a, b, 0.0)[1])
                               / (max(1, min(r["max_num_seqs"], r["max_num_batched_tokens"])) * r["vocab_size"])
                               for r in head]))
    resid = [r["forward_peak_bytes"] - c0 - max(_stages(r, a, b, l)) for r in rows]
    return {"forward_const_bytes": float(c0), "forward_hidden_bytes": float(a), "forward_intermediate_bytes": float(b),
            "logits_bytes": float(l), "non_torch_bytes": int(np.mean([r["non_torch_bytes"] for r in rows])),
            "other_bytes": int(np.mean([r["other_bytes"] for r in rows])),
            "forward_residual_max_bytes": float(np.abs(resid).max()), "num_rows": len(rows),
            "num_rows_mlp_bound": len(mlp), "num_rows_logits_bound": len(head)}


def fit_all(rows: list[dict], margin: int) -> dict:
    """Sections fit_reconfigured, fit_fresh (a fresh LLM(...)) and fit: the planner's default, the larger of each
    overhead of the two, so that its block count errs low, never high, whichever way the engine was started."""
    fresh = [r for r in rows if r["fresh"]]
    warm = [r for r in rows if not r["fresh"]]
    out = {}
    if warm:
        out["fit_reconfigured"] = {**fit(warm), "safety_margin_bytes": margin}
    if fresh and warm:
        # A fresh start has one profile shape per model: the reconfigured slopes, and the fresh starts' own
        # constant term and overheads (the first matmul's cuBLAS workspace lands in a fresh start's peak).
        w = out["fit_reconfigured"]
        offsets = [r["forward_peak_bytes"] - max(_stages(r, w["forward_hidden_bytes"], w["forward_intermediate_bytes"],
                                                         w["logits_bytes"])) for r in fresh]
        out["fit_fresh"] = {**w, "forward_const_bytes": float(np.mean(offsets)),
                            "non_torch_bytes": int(np.mean([r["non_torch_bytes"] for r in fresh])),
                            "other_bytes": int(np.mean([r["other_bytes"] for r in fresh])), "num_rows": len(fresh)}
        out["fit"] = conservative(out["fit_fresh"], w)
    return out


def conservative(fresh: dict, warm: dict) -> dict:
    """The larger of each overhead term of two fits (same slopes)."""
    return {**warm, **{k: max(fresh[k], warm[k]) for k in ("forward_const_bytes", "non_torch_bytes", "other_bytes")},
            "num_rows": fresh["num_rows"] + warm["num_rows"]}


def non_torch_from(path: str) -> dict:
    """Mean engine non_torch_bytes of a planner_check result: fresh starts, and reconfigured engines."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if r.get("engine_non_torch_bytes")]
    mean = [int(np.mean([r["engine_non_torch_bytes"] for r in rows if r["fresh_start"] is fresh])) for fresh in
            (True, False)]
    return {"fit_fresh": mean[0], "fit_reconfigured": mean[1]}


def margin_from(path: str | None) -> int:
    """The largest over_budget_bytes of a planner_check result, rounded up to 512 MiB (else the planner's)."""
    if not path:
        return 0  # recorded for reference only: the engine's own MEMORY_MARGIN_BYTES is the margin since issue 13
    worst = json.loads(Path(path).read_text())["summary"]["max_over_budget_bytes"]
    return -(-worst // (512 * planner.MiB)) * 512 * planner.MiB


def measure(model: str, max_model_len: int, backend: str) -> tuple[list[dict], list[dict]]:
    """Rows of one model: a fresh start, then reconfigured starts over the grid."""
    rows, failures, llm = [], [], None
    points = [(b, 256, u) for b in BUDGETS for u in SHARES] + [(b, s, 0.9) for b, s in EXTRA]
    for k, (budget, seqs, share) in enumerate(points):
        cfg = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, gpu_memory_utilization=share,
                           max_model_len=max_model_len, enforce_eager=True, attention_backend=backend)
        start = time.perf_counter()
        try:
            if llm is None:
                llm = LLM.random(model, cfg, dtype=torch.bfloat16)
            else:
                llm.reconfigure(cfg)
        except Exception as exc:  # recorded; the fit uses the rows that worked
            failures.append({"model": model, "config": cfg.to_dict(), "error": f"{type(exc).__name__}: {exc}"})
            print("FAILED", failures[-1], flush=True)
            continue
        rows.append(row(llm, model, cfg, k == 0, time.perf_counter() - start))
        print(json.dumps({x: rows[-1][x] for x in (
            "model", "fresh", "max_num_batched_tokens", "max_num_seqs", "gpu_memory_utilization", "num_gpu_blocks",
            "peak_activation_bytes", "forward_peak_bytes", "non_torch_bytes", "other_bytes")}), flush=True)
    return rows, failures


def write(result: dict, out: str) -> None:
    text = json.dumps(result, indent=1)
    for path in [Path(out)] + ([Path(os.environ["OUT"]) / Path(out).name] if os.environ.get("OUT") else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(json.dumps({k: result.get(k) for k in ("fit", "fit_fresh", "fit_reconfigured")}, indent=1), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/planner/calibration_h100.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--refit", help="fit again from the rows of this calibration file (no GPU needed)")
    ap.add_argument("--margin-from", help="a planner_check result whose largest over_budget_bytes sets the margin")
    ap.add_argument("--non-torch-from", help="with --refit: take non_torch_bytes from the engine starts of this "
                                             "planner_check result instead of the calibration rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure --models[0] into this file
    args = ap.parse_args()
    margin = margin_from(args.margin_from)
    if args.refit:
        result = json.loads(Path(args.refit).read_text())
        for r in result["rows"]:  # rows recorded before vocab_size was: every model here has Llama 3's
            r.setdefault("vocab_size", planner.resolve_model(r["model"])[1].vocab_size)
        result.update(fit_all(result["rows"], margin))
        if args.non_torch_from:
            for section, value in non_torch_from(args.non_torch_from).items():
                result[section]["non_torch_bytes"] = value
            result["fit"] = conservative(result["fit_fresh"], result["fit_reconfigured"])
            result["non_torch_source"] = args.non_torch_from
        result["refit_command"] = " ".join([sys.executable, *sys.argv])
        result["safety_margin_source"] = args.margin_from
        write(result, args.out)
        return 0
    if not torch.cuda.is_available():
        print("calibrate_planner needs a CUDA GPU (or --refit FILE)", file=sys.stderr)
        return 2
    if args.worker:
        rows, failures = measure(args.models[0], args.max_model_len, args.attention_backend)
        Path(args.worker).write_text(json.dumps({"rows": rows, "failures": failures}))
        return 0
    # No CUDA in this process until the workers are done: the engine counts every process's device memory as
    # its own non-torch memory, so a context here would inflate theirs (as it did in the first H100 run).
    rows, failures = [], []
    for model in args.models:
        # One process per model, so that each fresh start is a fresh CUDA context, as a user's is.
        part = Path(tempfile.mkdtemp()) / "rows.json"
        cmd = [sys.executable, __file__, "--worker", str(part), "--models", model,
               "--max-model-len", str(args.max_model_len), "--attention-backend", args.attention_backend]
        rc = subprocess.run(cmd).returncode
        if not part.exists():
            failures.append({"model": model, "error": f"worker exited with {rc} and wrote nothing"})
            continue
        got = json.loads(part.read_text())
        rows += got["rows"]
        failures += got["failures"]
    env = environment()
    result = {"environment": env, "rows": rows, "failures": failures, **fit_all(rows, margin),
              "safety_margin_source": args.margin_from}
    write(result, args.out)
    return 0 if rows and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
