"""Where the time of a run goes: the gap to the physical limit split into causes, and roofline placement.

Gap-to-limit attribution of a run of measured wall time T (seconds), from the engine's step timeline
(StepStats) and the device rates R (matmul FLOP/s) and BW (copy bytes/s) measured on the same device:

    T = ideal + host + kernel + underfill + recompute + padding (+ profiler)

  ideal      the trace's absolute limit: max(useful FLOPs / R, useful bytes / BW), with the weights read
             once per step of the fewest steps the config allows (tokens / max_num_batched_tokens, and
             no fewer than the longest output, since a request gains one token per step)
  host       T - sum of the steps' device time: host work not hidden behind the device (scheduling,
             input preparation, launches, sampling, output processing, and the time between steps)
  kernel     sum over steps of device time - the step's roofline time (FLOPs and bytes the step ran,
             padding included, at R and BW): kernels below their roofline. Device time spans the forward
             pass from its first to its last device work, so gaps where the device waited for the host to
             launch the next kernel (eager steps) count here; deep mode's "idle" class shows them.
  padding    roofline time of the CUDA-graph padding rows (roofline with them - without them)
  recompute  roofline time of the tokens recomputed after preemptions
  underfill  sum of the steps' roofline time of useful work - ideal: steps that carried fewer tokens
             than the config allows (the tail, a small queue), paying the weight reads more often
  profiler   host seconds deep mode's torch.profiler took to start, stop and read its events (0 without
             deep mode); it would otherwise inflate the host part

Each part is a difference of two sums that the next part starts from, so the parts add up to T by
construction (up to float rounding). The bench's per-step physical limit (`bench.step_limits` summed,
without padding) is ideal + underfill + recompute; the kernel part is also split by step kind
(gap_kernel_{prefill,decode,mixed}_s). FLOPs and bytes per step come from `bench.step_limits`, the
bench's own model of the physical limit; recomputed tokens take their share of a step's attention
work in proportion to its tokens (the engine does not count scores per token kind).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

from . import schema
from .bench import measure_device_rates, step_limits
from .schema import C

PARTS = ("ideal", "host", "kernel", "underfill", "recompute", "padding", "profiler")
PART_LABELS = {"ideal": "ideal (trace's absolute limit)", "host": "host time not hidden",
               "kernel": "kernels below roofline", "underfill": "batch underfill",
               "recompute": "preemption recompute", "padding": "CUDA-graph padding",
               "profiler": "deep-mode profiler overhead"}
PHASES = ("schedule", "prepare", "launch", "sample", "output")
STEP_KINDS = ("prefill", "decode", "mixed")

# Result columns this module makes, to be registered in the workbench's results schema (one home per column).
# The attribution's result columns are defined in the results schema (kind "profile"), with the others.
COLUMNS = [c for c in schema.COLUMNS if c.kind == schema.PROFILE]


# ----- device rates --------------------------------------------------------------------------------

def measure_rates(device="cuda") -> dict:
    """Matmul FLOP/s and copy bandwidth (bytes read + written per s) of `device`: the bench's bf16
    measurement on CUDA; on the CPU a float32 512x512 matmul and a 32 MiB copy (seconds, not minutes)."""
    device = torch.device(device)
    if device.type == "cuda":
        return measure_device_rates(device)
    n, numel = 512, 8 * 1024**2
    a, b = torch.randn(n, n), torch.randn(n, n)
    src, dst = torch.randn(numel), torch.empty(numel)

    def best(fn, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return {"matmul_flops": 2 * n**3 / best(lambda: a @ b),
            "copy_bandwidth": 2 * 4 * numel / best(lambda: dst.copy_(src))}


# ----- per-step work and roofline ---------------------------------------------------------------------

def step_kind(steps: pd.DataFrame) -> pd.Series:
    """"prefill" (no decode token), "decode" (no prefill token) or "mixed", per step."""
    pre, dec = steps["num_prefill_tokens"] > 0, steps["num_decode_tokens"] > 0
    return pd.Series(np.where(pre & dec, "mixed", np.where(pre, "prefill", "decode")), index=steps.index)


def _col(steps, name):
    return steps[name].astype(float) if name in steps else pd.Series(0.0, index=steps.index)


def step_work(steps: pd.DataFrame, spec, weight_bytes: int, kv_bytes_per_token: int, rates: dict,
              padding: bool = True, recompute: bool = True) -> pd.DataFrame:
    """Per step: flops, bytes and their roofline time (`bench.step_limits`), for the tokens the step ran
    with or without its CUDA-graph padding rows and its recomputed tokens."""
    s = pd.DataFrame({k: _col(steps, k) for k in ("num_batched_tokens", "num_sampled_tokens",
                                                    "num_attention_scores", "num_kv_tokens_read")})
    if not recompute:
        redo = _col(steps, "num_recompute_tokens")
        keep = 1.0 - (redo / s["num_batched_tokens"].where(s["num_batched_tokens"] > 0, 1.0)).clip(0, 1)
        s["num_batched_tokens"] -= redo
        s["num_attention_scores"] *= keep
        s["num_kv_tokens_read"] *= keep
    if padding:  # a padding row decodes one dummy token against itself, and its logits are computed
        pad = _col(steps, "num_padding_tokens")
        for k in s:
            s[k] += pad
    return step_limits(s, spec, weight_bytes, kv_bytes_per_token, rates)


def device_times(steps: pd.DataFrame) -> pd.Series:
    """Seconds of device work per step: the CUDA-event time, or (where a runner gave none) the step's
    time minus its host time."""
    fallback = _col(steps, "duration") - _col(steps, "host_time")
    return _col(steps, "device_time").fillna(fallback) if "device_time" in steps else fallback


def roofline(flops, bytes_, seconds, rates: dict) -> dict:
    """Roofline placement of work of `flops` FLOPs moving `bytes_` bytes done in `seconds`: arithmetic
    intensity (FLOP/byte), achieved FLOP/s, the roof at that intensity (min(R, intensity x BW)),
    the ridge intensity R / BW, bound ("compute" | "memory"), limit_time (max(flops/R, bytes/BW), s)
    and efficiency = achieved / roof = limit_time / seconds. Works on scalars and arrays."""
    R, BW = rates["matmul_flops"], rates["copy_bandwidth"]
    flops, bytes_, seconds = (np.asarray(x, dtype=float) for x in (flops, bytes_, seconds))
    intensity = flops / bytes_
    roof = np.minimum(R, intensity * BW)
    limit = np.maximum(flops / R, bytes_ / BW)
    out = {"intensity": intensity, "achieved_flops": flops / seconds, "roof_flops": roof, "ridge": R / BW,
           "bound": np.where(intensity >= R / BW, "compute", "memory"), "limit_time": limit,
           "efficiency": limit / seconds}
    return {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in out.items()}


def step_roofline(steps: pd.DataFrame, spec, weight_bytes: int, kv_bytes_per_token: int, rates: dict) -> pd.DataFrame:
    """One row per step: kind, flops, bytes, device_time and its roofline placement (see `roofline`)."""
    work = step_work(steps, spec, weight_bytes, kv_bytes_per_token, rates)
    dev = device_times(steps)
    place = roofline(work["flops"], work["bytes"], dev, rates)
    out = pd.DataFrame({"step": np.arange(len(steps)), "kind": step_kind(steps).values,
                        "flops": work["flops"].values, "bytes": work["bytes"].values, "device_time": dev.values})
    for k in ("intensity", "achieved_flops", "roof_flops", "bound", "limit_time", "efficiency"):
        out[k] = place[k]
    return out


# ----- attribution ---------------------------------------------------------------------------------

def min_steps(steps: pd.DataFrame, max_num_batched_tokens: int, max_output_len: int = 0) -> int:
    """The fewest steps that could run the useful tokens of these steps under the token budget, and no
    fewer than the longest output (each request gains one token per step)."""
    useful = (_col(steps, "num_batched_tokens") - _col(steps, "num_recompute_tokens")).sum()
    return max(int(math.ceil(useful / max_num_batched_tokens)), int(max_output_len), 1 if len(steps) else 0)


def ideal_time(steps: pd.DataFrame, spec, weight_bytes: int, kv_bytes_per_token: int, rates: dict,
               max_num_batched_tokens: int, max_output_len: int = 0) -> float:
    """The trace's absolute limit (s): its useful FLOPs at the matmul rate or its useful bytes at the copy
    bandwidth, whichever is longer, with the weights read once per step of `min_steps`."""
    useful = step_work(steps, spec, weight_bytes, kv_bytes_per_token, rates, padding=False, recompute=False)
    n = min_steps(steps, max_num_batched_tokens, max_output_len)
    moved = useful["bytes"].sum() - weight_bytes * len(steps) + weight_bytes * n
    return float(max(useful["flops"].sum() / rates["matmul_flops"], moved / rates["copy_bandwidth"]))


def serial_limit_time(steps: pd.DataFrame, spec, weight_bytes: int, kv_bytes_per_token: int, rates: dict) -> float:
    """The steps' useful work (no padding rows, no recompute) with each step's GEMMs and its attention at
    their own rooflines, one after the other (`bench.step_limits`' serial_time), summed (s): what an engine
    that never overlaps the two needs at least on these very steps. Above ideal + underfill by the
    attention of the compute-bound steps, which only running attention beside the GEMMs recovers."""
    work = step_work(steps, spec, weight_bytes, kv_bytes_per_token, rates, padding=False, recompute=False)
    return float(work["serial_time"].sum())


def attribution(steps: pd.DataFrame, duration: float, spec, weight_bytes: int, kv_bytes_per_token: int,
                rates: dict, max_num_batched_tokens: int, max_output_len: int = 0,
                profiler_overhead: float = 0.0) -> dict:
    """The gap-to-limit columns of one run (see the module docstring), in seconds.

    steps: `metrics.steps_frame` of the run; duration: its measured wall time (s); max_output_len: the
    longest output of the trace (tokens); profiler_overhead: deep mode's own host seconds inside the run
    (`KernelProfile.overhead_within`). Also host_<phase>_s (the host phases summed over steps),
    ideal_over_measured and device_busy_share.
    """
    kw = dict(spec=spec, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token, rates=rates)
    per_step = step_work(steps, **kw)["limit_time"]
    with_pad = per_step.sum()
    no_pad = step_work(steps, **kw, padding=False)["limit_time"].sum()
    useful = step_work(steps, **kw, padding=False, recompute=False)["limit_time"].sum()
    ideal = ideal_time(steps, **kw, max_num_batched_tokens=max_num_batched_tokens, max_output_len=max_output_len)
    device = device_times(steps)
    busy = float(device.sum())
    parts = {"ideal": ideal, "host": duration - busy - profiler_overhead, "kernel": busy - with_pad,
             "padding": with_pad - no_pad, "recompute": no_pad - useful, "underfill": useful - ideal,
             "profiler": profiler_overhead}
    out = {C.gap_measured_s: float(duration), **{schema.gap(p): float(parts[p]) for p in PARTS}}
    out[C.gap_attributed_s] = float(sum(parts.values()))
    out[C.ideal_over_measured] = ideal / duration if duration > 0 else math.nan
    out[C.device_busy_share] = busy / duration if duration > 0 else math.nan
    for p in PHASES:
        out[f"host_{p}_s"] = float(_col(steps, f"{p}_time").sum())
    kinds = step_kind(steps) if len(steps) else pd.Series(dtype=str)
    for k in STEP_KINDS:  # the kernel part, split by the kind of step it was lost in
        out[schema.gap_kernel(k)] = float((device - per_step)[kinds == k].sum())
    return out


def attribution_frame(row: dict) -> pd.DataFrame:
    """The parts of one attribution (a dict or results row with the gap_* columns) as rows: part, label,
    seconds, share of measured; in waterfall order."""
    measured = float(row[C.gap_measured_s])
    return pd.DataFrame([{"part": p, C.label: PART_LABELS[p], "seconds": float(row[schema.gap(p)]),
                          "share": float(row[schema.gap(p)]) / measured if measured else math.nan} for p in PARTS])


# ----- kernel classes against their rooflines -----------------------------------------------------------

def kernel_breakdown(profile, steps: pd.DataFrame, spec, weight_bytes: int, kv_bytes_per_token: int,
                     rates: dict) -> pd.DataFrame:
    """Device time per kernel class over the deep-mode window (`engine.profiling.KernelProfile`), each
    beside its own roofline time where the model has one (NaN else), and efficiency = roofline / time.

    Work per class over the window's steps: GEMMs the linear layers and LM head (FLOPs) and their weights
    (bytes); attention its scores and K/V reads, those of the one-token rows (num_decode_kv_tokens_read)
    to attention_decode, the rest to attention_prefill (on the CPU the torch backend's attention ops cannot
    be told apart by kind and all count as attention_prefill); KV writes the K/V of every token; the sampler a float32
    read of each sampled row of logits; norms/rotary/activation reads and writes of the hidden and
    intermediate activations (2 norms + 1 activation per layer).
    """
    from engine.profiling import KERNEL_CLASSES

    w = steps.iloc[profile.first_step:profile.last_step + 1]
    R, BW = rates["matmul_flops"], rates["copy_bandwidth"]
    tokens = _col(w, "num_batched_tokens") + _col(w, "num_padding_tokens")
    sampled = _col(w, "num_sampled_tokens") + _col(w, "num_padding_tokens")
    per_param = weight_bytes / spec.num_params()
    lm_head = spec.vocab_size * spec.hidden_size
    linear = spec.num_params() - spec.vocab_size * spec.hidden_size - (0 if spec.tie_word_embeddings else lm_head)
    attn_width = spec.num_layers * spec.num_heads * spec.head_dim
    pad = _col(w, "num_padding_tokens")  # a padding row attends to its own dummy token
    scores, kv_read = _col(w, "num_attention_scores") + pad, _col(w, "num_kv_tokens_read") + pad
    if "num_decode_kv_tokens_read" in w:  # a one-token row scores each key it reads once
        dec = _col(w, "num_decode_kv_tokens_read") + pad
        dec_scores, dec_kv = dec, dec
    else:  # older step records: all attention of pure-decode steps is decode, that of the others prefill
        decode_only = _col(w, "num_prefill_tokens") == 0
        dec_scores, dec_kv = scores.where(decode_only, 0.0), kv_read.where(decode_only, 0.0)
    act = per_param * spec.num_layers * (8 * spec.hidden_size + 3 * spec.intermediate_size)
    work = {  # class -> (flops, bytes)
        "gemm": ((2 * linear * tokens + 2 * lm_head * sampled).sum(), per_param * (linear + lm_head) * len(w)),
        "attention_decode": (4 * attn_width * dec_scores.sum(), kv_bytes_per_token * dec_kv.sum()),
        "attention_prefill": (4 * attn_width * (scores - dec_scores).sum(),
                              kv_bytes_per_token * (kv_read - dec_kv).sum()),
        "kv_write": (0.0, kv_bytes_per_token * tokens.sum()),
        "sampler": (0.0, 4.0 * spec.vocab_size * sampled.sum()),
        "norm_rotary_act": (0.0, act * tokens.sum()),
    }
    times = profile.by_class()
    rows = []
    for cls in list(KERNEL_CLASSES) + ["idle"]:
        flops, moved = work.get(cls, (math.nan, math.nan))
        limit = max(flops / R, moved / BW) if cls in work else math.nan
        t = times.get(cls, 0.0)
        rows.append({"class": cls, "device_time": t, "share": t / profile.window if profile.window else math.nan,
                     "flops": flops, "bytes": moved, "roofline_time": limit,
                     "efficiency": limit / t if t > 0 and cls in work else math.nan})
    return pd.DataFrame(rows)


# ----- one run, end to end (bench, notebook) --------------------------------------------------------------

KERNEL_WINDOW = (32, 16)  # deep mode: steps [32, 48) of a run, past the first prefill-only steps


def start_deep_mode(engine, profile: str | None, first_step: int = KERNEL_WINDOW[0],
                    num_steps: int = KERNEL_WINDOW[1]) -> None:
    """Arm profile="kernels" on an engine whose counters were just reset (None: nothing)."""
    if profile not in (None, "kernels"):
        raise ValueError(f"profile={profile!r} is not allowed: use None or 'kernels'")
    if profile == "kernels":
        engine.profile_kernels(first_step, num_steps)


def format_attribution(row: dict) -> str:
    """The waterfall as plain text: each part in seconds and as a share of the measured time."""
    frame = attribution_frame(row)
    lines = [f"where the time goes: {row[C.gap_measured_s]:.3f} s measured = sum of the parts "
             f"({row[C.gap_attributed_s]:.3f} s)"]
    for r in frame.itertuples(index=False):
        lines.append(f"  {r.label:34s}{r.seconds:10.3f} s {r.share:8.1%}")
    lines.append("  host phases summed over steps (s): " + ", ".join(f"{p} {row[f'host_{p}_s']:.3f}"
                                                                    for p in PHASES))
    lines.append("  kernels below roofline by step kind (s): " + ", ".join(
        f"{k} {row[schema.gap_kernel(k)]:.3f}" for k in STEP_KINDS if schema.gap_kernel(k) in row))
    return "\n".join(lines)


def format_kernels(breakdown: pd.DataFrame) -> str:
    """The deep-mode table as plain text: device time per class, share of the window, roofline efficiency."""
    lines = [f"{'kernel class':20s}{'time ms':>10s}{'share':>8s}{'roofline ms':>13s}{'efficiency':>12s}"]
    for r in breakdown.itertuples(index=False):
        lines.append(f"{r[0]:20s}{r.device_time * 1e3:10.3f}{r.share:8.1%}{r.roofline_time * 1e3:13.3f}"
                     f"{r.efficiency:12.2f}")
    return "\n".join(lines)


def point_profile(llm, stats, steps: pd.DataFrame, requests: pd.DataFrame, duration: float, rates: dict,
                  trace=None) -> dict:
    """What a bench run or a sweep point adds to its results: {"attribution": gap_* columns, "rates",
    "serial_limit_s" (`serial_limit_time`) and "serial_over_measured", "kernel_breakdown": rows (if deep
    mode ran), "trace": path (if `trace` given)}.

    stats: `llm.engine.stats()` of the run; steps / requests: its `metrics.steps_frame` / `request_frame`;
    duration: its wall time (s). The deep-mode profiler's own host time inside the run is its own part.
    """
    from .trace_export import write_chrome_trace

    max_out = int(requests["num_output_tokens"].max()) if len(requests) else 0
    prof = stats.kernel_profile
    overhead = prof.overhead_within(steps["start"].min(), steps["time"].max()) if prof is not None and len(steps) \
        else 0.0
    att = attribution(steps, duration, llm.spec, stats.weight_bytes, stats.kv_bytes_per_token, rates,
                      llm.config.max_num_batched_tokens, max_out, overhead)
    serial = serial_limit_time(steps, llm.spec, stats.weight_bytes, stats.kv_bytes_per_token, rates)
    out = {"attribution": att, "rates": rates, "serial_limit_s": serial,
           "serial_over_measured": serial / duration if duration > 0 else math.nan}
    if prof is not None and prof.kernels:
        out["kernel_breakdown"] = kernel_breakdown(prof, steps, llm.spec, stats.weight_bytes,
                                                   stats.kv_bytes_per_token, rates).to_dict("records")
    if trace:
        out["trace"] = str(write_chrome_trace(trace, steps, requests, stats.request_events, prof))
    return out


def run_profile(llm, run, rates: dict | None = None, trace=None, echo: bool = True) -> dict:
    """`point_profile` of a finished `bench.RunResult` on `llm`, printed (echo) as the waterfall and the
    deep-mode table. rates None: measured now (the CPU's in well under a second)."""
    stats = run.stats if run.stats is not None else llm.engine.stats()
    out = point_profile(llm, stats, run.steps, run.requests, run.duration, rates or measure_rates(llm.device), trace)
    if echo:
        print(format_attribution(out["attribution"]))
        print(f"serial limit (each step's GEMMs, then its attention, each at its roofline): "
              f"{out['serial_limit_s']:.3f} s, {out['serial_over_measured']:.2f} of the measured time")
        if "kernel_breakdown" in out:
            print(format_kernels(pd.DataFrame(out["kernel_breakdown"])))
        if trace:
            print(f"trace: {out['trace']}")
    return out
