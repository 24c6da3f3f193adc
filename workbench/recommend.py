"""What to choose: the recommended setting per objective, worded with its margin and noise, and the
chosen config written as an `EngineConfig(...)` line and as `vllm serve` flags.

The numbers (best, runner-up, margin, overlapping ranges) come from `workbench.metrics.best_settings`;
this module only words them and translates configs.
"""
from __future__ import annotations

import math

import pandas as pd

from . import metrics, schema
from .schema import C

# EngineConfig fields always written out, then any other field that differs from the default.
KEY_FIELDS = [C.block_size, C.max_num_batched_tokens, C.max_num_seqs, C.enable_prefix_caching, C.quantization,
              C.kv_cache_dtype, C.gpu_memory_utilization]
# EngineConfig field -> vLLM `vllm serve` flag (booleans: (flag when True, flag when False)).
VLLM_FLAGS = {C.block_size: "--block-size", C.max_num_batched_tokens: "--max-num-batched-tokens",
              C.max_num_seqs: "--max-num-seqs",
              C.enable_prefix_caching: ("--enable-prefix-caching", "--no-enable-prefix-caching"),
              C.quantization: "--quantization", C.kv_cache_dtype: "--kv-cache-dtype",
              C.gpu_memory_utilization: "--gpu-memory-utilization", C.max_model_len: "--max-model-len",
              C.tensor_parallel_size: "--tensor-parallel-size", C.enforce_eager: ("--enforce-eager", None),
              C.async_scheduling: ("--async-scheduling", "--no-async-scheduling")}


def _value(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and v.is_integer() and not isinstance(v, bool):
        return int(v)
    return v


def config_of(row: dict) -> dict:
    """The EngineConfig fields of a results row."""
    return {k: _value(row[k]) for k in schema.config_columns() if k in row}


def engine_config_line(row: dict) -> str:
    """``EngineConfig(block_size=16, ...)``: the key fields, then every other field off its default."""
    from engine import EngineConfig

    cfg, default = config_of(row), EngineConfig().to_dict()
    names = [k for k in KEY_FIELDS if k in cfg]
    names += [k for k in cfg if k not in names and k not in (C.device, C.seed) and cfg[k] != default.get(k)]
    return "EngineConfig(" + ", ".join(f"{k}={cfg[k]!r}" for k in names) + ")"


def vllm_serve_command(row: dict, model: str = "MODEL") -> str:
    """The equivalent ``vllm serve`` command line (the flags of KEY_FIELDS and any non-default field)."""
    from engine import EngineConfig

    cfg, default = config_of(row), EngineConfig().to_dict()
    parts = [f"vllm serve {model}"]
    for k, flag in VLLM_FLAGS.items():
        if k not in cfg or (k not in KEY_FIELDS and cfg[k] == default.get(k)):
            continue
        v = cfg[k]
        if isinstance(flag, tuple):
            chosen = flag[0] if v else flag[1]
            if chosen:
                parts.append(chosen)
        elif v is not None and not (k == C.kv_cache_dtype and v == "auto"):
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def recommendations(results: pd.DataFrame) -> list[dict]:
    """One dict per objective with data: the best_settings row plus ``text`` (the verdict in words)."""
    if len(results) == 0:
        return []
    out = []
    for r in metrics.best_settings(results).to_dict("records"):
        col = schema.column(r["column"])
        value = f"{schema.fmt(col.name, r['value'])} {col.unit or ''}".strip()
        noise = (f" (min-max over {r[C.repeats]} repeats: {schema.fmt(col.name, r['low'])}-"
                 f"{schema.fmt(col.name, r['high'])})" if r[C.repeats] > 1 else " (one run: no noise estimate)")
        if r["runner_up"] is None:
            verdict = "the only successful point"
        elif r["ties"]:
            verdict = (f"equivalent within noise to {', '.join(r['ties'])}: their ranges overlap, so any of them "
                       f"is as good; margin over the runner-up {r['runner_up']}: {r['margin']:+.1%}")
        else:
            verdict = (f"{r['margin']:+.1%} better than the runner-up {r['runner_up']} "
                       f"({schema.fmt(col.name, r['runner_up_value'])}), outside the noise")
        out.append({**r, "value_text": value + noise, "verdict": verdict})
    return out


def plan_verdict(model, gpu, row: dict) -> str:
    """The memory planner's verdict for a row's config on ``gpu``, in one line ("n/a: why" without one)."""
    try:
        from engine import EngineConfig

        from .planner import plan

        cfg = EngineConfig(**{k: v for k, v in config_of(row).items() if v is not None or k == C.quantization})
        p = plan(model, gpu, cfg)
        d = p.to_dict()
        return f"{d.get('verdict')} on {d.get('gpu')}: {d.get('reason')}"
    except Exception as e:  # noqa: BLE001 - no plan is not a reason to fail the report
        return f"n/a ({type(e).__name__}: {e})"
