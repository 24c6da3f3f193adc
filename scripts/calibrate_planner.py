"""Calibrate the memory planner (workbench/planner.py) against the engine's own memory profile on this GPU.

For each model (LLM.random presets, bf16) the engine starts once fresh, then is reconfigured over a grid
of (max_num_batched_tokens, max_num_seqs, gpu_memory_utilization); each start's profile step is read
from EngineStats.memory (total, weights, activation peak, non-torch, KV bytes) with the block count.
Exact terms (weights, rotary tables and input buffers, the profile step's own KV blocks) come from the
planner; what is left is fitted:

    forward peak = peak_activation - profile KV = c0 + a * T * hidden + b * T * intermediate   (least squares)
    non_torch, other (base - weights - rotary/buffers)                                          (means)

separately for a fresh start (what a user gets from LLM(...): the planner's default, section "fit") and
for reconfigured engines (section "fit_reconfigured"). Rows, fit and residuals go to one JSON file.
CUDA graphs are off here (they are captured after the pool is sized, so they do not change it).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/calibrate_planner.py [--out data/planner/calibration_h100.json]
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
            "mem_get_info_total": torch.cuda.mem_get_info(dev)[1], "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "command": " ".join([sys.executable, *sys.argv])}


def row(llm, model: str, cfg: EngineConfig, fresh: bool, seconds: float) -> dict:
    """One start of the engine: what it measured, and the planner's exact terms for the same config."""
    st = llm.engine.stats()
    m = st.memory
    _, spec = planner.resolve_model(model)
    base = int(cfg.gpu_memory_utilization * m.total_bytes) - m.peak_activation_bytes - m.non_torch_bytes \
        - m.kv_cache_bytes
    static = planner.static_bytes(spec, cfg)
    prof_kv = planner.profile_kv_bytes(spec, cfg, st.kv_bytes_per_token)
    return {
        "model": model, "fresh": fresh, "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_num_seqs": cfg.max_num_seqs, "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "block_size": cfg.block_size, "max_model_len": cfg.max_model_len,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "total_bytes": m.total_bytes, "weight_bytes": m.weight_bytes, "peak_activation_bytes": m.peak_activation_bytes,
        "non_torch_bytes": m.non_torch_bytes, "kv_cache_bytes": m.kv_cache_bytes, "base_bytes": base,
        "num_gpu_blocks": st.num_gpu_blocks, "kv_bytes_per_token": st.kv_bytes_per_token,
        "planner_weight_bytes": planner.weight_bytes(spec), "planner_static_bytes": static,
        "planner_profile_kv_bytes": prof_kv, "forward_peak_bytes": m.peak_activation_bytes - prof_kv,
        "other_bytes": base - m.weight_bytes - static,
        "engine_rule_blocks": m.kv_cache_bytes // (st.kv_bytes_per_token * cfg.block_size) - 1,
        "attention_backend": st.attention_backend, "start_seconds": seconds,
    }


def fit(rows: list[dict]) -> dict:
    """Least-squares forward-peak coefficients and mean overheads over `rows` (bytes)."""
    t = np.array([r["max_num_batched_tokens"] for r in rows], dtype=float)
    h = np.array([r["hidden_size"] for r in rows], dtype=float)
    i = np.array([r["intermediate_size"] for r in rows], dtype=float)
    y = np.array([r["forward_peak_bytes"] for r in rows], dtype=float)
    a = np.stack([np.ones_like(t), t * h, t * i], axis=1)
    (c0, ch, ci), *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ np.array([c0, ch, ci])
    return {"forward_const_bytes": float(c0), "forward_hidden_bytes": float(ch), "forward_intermediate_bytes": float(ci),
            "non_torch_bytes": int(np.mean([r["non_torch_bytes"] for r in rows])),
            "other_bytes": int(np.mean([r["other_bytes"] for r in rows])),
            "forward_residual_max_bytes": float(np.abs(resid).max()), "num_rows": len(rows)}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/planner/calibration_h100.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure --models[0] into this file
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("calibrate_planner needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.worker:
        rows, failures = measure(args.models[0], args.max_model_len, args.attention_backend)
        Path(args.worker).write_text(json.dumps({"rows": rows, "failures": failures}))
        return 0
    env = environment()
    print(json.dumps(env), flush=True)
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
    fresh = [r for r in rows if r["fresh"]]
    warm = [r for r in rows if not r["fresh"]]
    result = {"environment": env, "rows": rows, "failures": failures}
    if warm:
        result["fit_reconfigured"] = fit(warm)
    if fresh and warm:
        # A fresh start has one profile shape per model: take the reconfigured slopes, and the fresh starts'
        # own constant term and overheads (the first matmul's cuBLAS workspace lands in a fresh peak).
        w = result["fit_reconfigured"]
        offsets = [r["forward_peak_bytes"] - w["forward_hidden_bytes"] * r["max_num_batched_tokens"] * r["hidden_size"]
                   - w["forward_intermediate_bytes"] * r["max_num_batched_tokens"] * r["intermediate_size"]
                   for r in fresh]
        result["fit"] = {**w, "forward_const_bytes": float(np.mean(offsets)),
                         "non_torch_bytes": int(np.mean([r["non_torch_bytes"] for r in fresh])),
                         "other_bytes": int(np.mean([r["other_bytes"] for r in fresh])),
                         "safety_margin_bytes": planner.CALIBRATION_H100.safety_margin_bytes,
                         "num_rows": len(fresh)}
    text = json.dumps(result, indent=1)
    for path in [Path(args.out)] + ([Path(os.environ["OUT"]) / Path(args.out).name] if os.environ.get("OUT") else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(json.dumps({k: result.get(k) for k in ("fit", "fit_reconfigured")}, indent=1), flush=True)
    return 0 if rows and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
