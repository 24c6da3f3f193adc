"""Every derived number of the workbench, computed in one place.

The engine counts (engine/stats.py: per-request timings, per-step KV usage, prefix-cache queries);
this module turns those counts into the numbers a results row holds: percentiles, throughput, goodput,
hit rate, energy per token. Figures, widgets and the report only read the columns made here.

Definitions follow vLLM's benchmark where one exists (see DESIGN.md):
TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1);
ITL = gaps between consecutive tokens (pooled over all requests); E2E = finish - arrival;
throughput = tokens / wall time of the run; goodput = requests/s that met every SLO.
Latency columns are in milliseconds (``*_ms``), throughputs per second, energy in joules.
"""
from __future__ import annotations

import collections

import math
from dataclasses import asdict, is_dataclass

import numpy as np
import pandas as pd

from . import schema
from .schema import C

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
SLO_KEYS = ("ttft", "tpot", "e2e")  # seconds

REQUEST_COLUMNS = ["request_id", "arrival_time", "first_scheduled_time", "first_token_time", "finished_time",
                   "queue_time", "ttft", "tpot", "e2e", "itl", "num_prompt_tokens", "num_output_tokens",
                   "num_cached_tokens", "finish_reason"]


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _num(x) -> float:
    """A float, NaN for None."""
    return math.nan if x is None else float(x)


# --- per-request ----------------------------------------------------------------------------------

def request_frame(outputs) -> pd.DataFrame:
    """One row per finished request from RequestOutput objects: timings (s), token counts, itl (list, s).

    queue_time = first_scheduled_time - arrival_time (s). num_output_tokens: the tokens of every completion
    the request returns (n for parallel sampling, beam_width beams for beam search), as vLLM's throughput
    benchmark counts them; TTFT, TPOT and ITL are those of its (first) sequence.
    """
    rows = []
    for o in outputs:
        m = o.metrics
        arrival, sched = _num(_get(m, "arrival_time")), _num(_get(m, "first_scheduled_time"))
        rows.append({
            "request_id": o.request_id, "arrival_time": arrival, "first_scheduled_time": sched,
            "first_token_time": _num(_get(m, "first_token_time")), "finished_time": _num(_get(m, "finished_time")),
            "queue_time": sched - arrival,
            "ttft": _num(_get(m, "ttft")), "tpot": _num(_get(m, "tpot")), "e2e": _num(_get(m, "e2e")),
            "itl": [float(x) for x in (_get(m, "itl") or [])],
            "num_prompt_tokens": int(_get(m, "num_prompt_tokens", len(o.prompt_token_ids))),
            "num_output_tokens": _output_tokens(o, m),
            "num_cached_tokens": int(_get(m, "num_cached_tokens", 0) or 0),
            "finish_reason": o.finish_reason,
        })
    return pd.DataFrame(rows, columns=REQUEST_COLUMNS)


def _output_tokens(o, m) -> int:
    completions = _get(o, "outputs") or []
    if len(completions) > 1:
        return sum(len(_get(c, "token_ids") or []) for c in completions)
    return int(_get(m, "num_output_tokens", len(o.token_ids)))


def percentiles(values, ps=PERCENTILES) -> dict:
    """{"mean": ..., "p50": ..., ...} of the finite values (NaN when there are none); numpy's linear method."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in ps}}
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in ps}}


def latency_summary(requests: pd.DataFrame) -> dict:
    """``{ttft,tpot,itl,e2e}_{mean,p50,p90,p99}_ms``; ITL pools the gaps of all requests (as vLLM)."""
    out = {}
    for name in LATENCIES:
        if name == "itl":
            values = [g for gaps in requests["itl"] for g in gaps] if len(requests) else []
        else:
            values = requests[name] if len(requests) else []
        for stat, v in percentiles(values).items():
            out[f"{name}_{stat}_ms"] = v * 1e3
    return out


def throughput(requests: pd.DataFrame, duration: float) -> dict:
    """request_throughput (req/s), output_throughput and total_token_throughput (tokens/s) over ``duration`` s."""
    n_out = int(requests["num_output_tokens"].sum()) if len(requests) else 0
    n_in = int(requests["num_prompt_tokens"].sum()) if len(requests) else 0
    ok = duration > 0
    return {
        C.num_finished: len(requests), C.total_prompt_tokens: n_in, C.total_output_tokens: n_out,
        C.request_throughput: len(requests) / duration if ok else math.nan,
        C.output_throughput: n_out / duration if ok else math.nan,
        C.total_token_throughput: (n_in + n_out) / duration if ok else math.nan,
    }


def slo_met(requests: pd.DataFrame, slo: dict | None) -> pd.Series:
    """Per request: True when every SLO in ``slo`` (keys ttft/tpot/e2e, seconds) is met.

    A request with one output token has no TPOT and meets any TPOT SLO (vLLM does the same).
    """
    slo = dict(slo or {})
    unknown = set(slo) - set(SLO_KEYS)
    if unknown:
        raise ValueError(f"slo keys {sorted(unknown)} are unknown: use {list(SLO_KEYS)} (seconds)")
    met = pd.Series(True, index=requests.index)
    for key, limit in slo.items():
        if limit is None:
            continue
        v = requests[key].astype(float)
        met &= (v <= float(limit)) | (v.isna() & (key == "tpot"))
    return met


def goodput(requests: pd.DataFrame, duration: float, slo: dict | None) -> dict:
    """request_goodput: requests/s that met the SLO; slo_attainment: their share of finished requests.

    Without an SLO both are NaN (goodput would just repeat request_throughput).
    """
    if not slo or not any(v is not None for v in slo.values()):
        return {C.request_goodput: math.nan, C.slo_attainment: math.nan}
    good = int(slo_met(requests, slo).sum())
    return {C.request_goodput: good / duration if duration > 0 else math.nan,
            C.slo_attainment: good / len(requests) if len(requests) else math.nan}


# --- per-step and engine counters --------------------------------------------------------------------

def group_blocks_column(group: int) -> str:
    """The per-step column of one KV cache group's blocks in use (steps frames and the allocator timelines of
    `workbench.baselines`): group_blocks_column(1) -> "group1_blocks"."""
    return f"group{int(group)}_blocks"


def group_blocks_columns(frame: pd.DataFrame | None) -> list[str]:
    """The group_blocks_column columns ``frame`` has, in group order ([] for a model with one KV cache group)."""
    if frame is None:
        return []
    cols, g = [], 0
    while group_blocks_column(g) in frame:
        cols.append(group_blocks_column(g))
        g += 1
    return cols


def kv_cache_groups_text(windows) -> str | None:
    """The KV cache groups of a sliding-window model as text, one entry per group ("full" or its window in
    tokens): "full, 1024, 1024"; None for a model with one table (EngineStats.kv_cache_groups empty)."""
    windows = tuple(windows or ())
    return ", ".join("full" if w is None else str(int(w)) for w in windows) if windows else None


def steps_frame(stats) -> pd.DataFrame:
    """The per-step counters (engine.stats.StepStats) of an EngineStats as a DataFrame, one row per step.

    A sliding-window model (EngineStats.kv_cache_groups not empty) also gets one column per KV cache group,
    group_blocks_column(g): blocks of the pool group g's tables held after the step (they add up to num_used_blocks).
    """
    from engine import StepStats

    steps = _get(stats, "steps", []) or []
    df = pd.DataFrame([asdict(s) if is_dataclass(s) else dict(s) for s in steps],
                      columns=list(StepStats.__dataclass_fields__) if not steps else None)
    num_groups = len(_get(stats, "kv_cache_groups", ()) or ())
    if num_groups and "group_used_blocks" in df:
        # A step without one count per group (none recorded) reads as unknown, never as 0 blocks.
        used = [tuple(u) if u is not None and len(u) == num_groups else (math.nan,) * num_groups
                for u in df["group_used_blocks"]]
        for g in range(num_groups):
            df[group_blocks_column(g)] = [u[g] for u in used]
    return df


def step_summary(steps: pd.DataFrame) -> dict:
    """KV usage (mean over steps, peak), internal fragmentation (mean over steps that hold KV blocks),
    batch size = requests running in a step (mean, p50, max), batched tokens per step (mean, max)."""
    def col(name):
        return steps[name].astype(float) if name in steps else pd.Series(dtype=float)

    kv, running, batched = col("kv_usage"), col("num_running"), col("num_batched_tokens")
    frag, host = col("internal_fragmentation"), col("host_time")
    if "num_used_blocks" in steps:
        frag = frag[steps["num_used_blocks"].astype(float) > 0]
    nan = math.nan
    return {
        C.kv_usage_mean: float(kv.mean()) if len(kv) else nan, C.kv_usage_peak: float(kv.max()) if len(kv) else nan,
        C.internal_fragmentation_mean: float(frag.mean()) if len(frag) else nan,
        C.batch_size_mean: float(running.mean()) if len(running) else nan,
        C.batch_size_p50: float(running.median()) if len(running) else nan,
        C.batch_size_max: float(running.max()) if len(running) else nan,
        C.batched_tokens_mean: float(batched.mean()) if len(batched) else nan,
        C.batched_tokens_max: float(batched.max()) if len(batched) else nan,
        C.host_time_p50_ms: float(host.median() * 1e3) if len(host) else nan,
    }


def sharing_saving(used_peak: float, unshared_peak: float) -> float:
    """1 - used peak / unshared peak: the share of KV blocks sharing saved (nan without any block)."""
    return 1.0 - used_peak / unshared_peak if unshared_peak > 0 else math.nan


def sharing_summary(steps: pd.DataFrame) -> dict:
    """KV block sharing over the steps (engine StepStats counters), in blocks: the peak of blocks in use, of
    block-table entries (used + saved: what an allocator without sharing would hold at that step), of blocks
    saved and of blocks held by two or more sequences; sharing_saving = 1 - used peak / unshared peak (the
    share of the pool sharing spares; NaN when no step held a block)."""
    def peak(series) -> float:
        return float(series.max()) if len(series) else math.nan

    def col(name):
        return steps[name].astype(float) if name in steps else pd.Series(dtype=float)

    used, saved, shared = col("num_used_blocks"), col("num_saved_blocks"), col("num_shared_blocks")
    unshared = used + saved if len(saved) else pd.Series(dtype=float)
    used_peak, unshared_peak = peak(used), peak(unshared)
    return {C.num_used_blocks_peak: used_peak, C.num_unshared_blocks_peak: unshared_peak,
            C.num_saved_blocks_peak: peak(saved), C.num_shared_blocks_peak: peak(shared),
            C.sharing_saving: sharing_saving(used_peak, unshared_peak)}


class _Counters:
    """An EngineStats (or a dict with its fields) read by attribute; a missing counter reads as None."""

    def __init__(self, stats):
        self._stats = stats

    def __getattr__(self, name):
        return _get(self._stats, name)


def engine_summary(stats) -> dict:
    """Counters of an EngineStats, and the token-level prefix-cache hit rate (hits / queries; 0 without queries).

    attention_backend_used is the backend that ran (the config's attention_backend may say "auto").
    """
    st = _Counters(stats)
    spec = st.spec_decode  # engine.stats.SpecDecodeStats with speculative decoding on, else None
    queries, hits = int(st.prefix_cache_queries or 0), int(st.prefix_cache_hits or 0)
    blocks, block_size = st.num_gpu_blocks, st.block_size
    return {
        C.prefix_cache_queries: queries, C.prefix_cache_hits: hits,
        C.prefix_cache_hit_rate: hits / queries if queries else 0.0,
        C.num_preemptions: int(st.num_preemptions or 0), C.num_steps: int(st.num_steps or 0),
        # a sliding-window model's block holds one KV cache group (1/len(groups) of the layers): tokens of every layer
        C.kv_blocks: blocks, C.kv_capacity_tokens: blocks * block_size // max(len(st.kv_cache_groups or ()), 1)
        if blocks and block_size else None,
        C.kv_cache_group_windows: kv_cache_groups_text(st.kv_cache_groups),
        C.weight_bytes: st.weight_bytes, C.kv_bytes_per_token: st.kv_bytes_per_token,
        C.attention_backend_used: st.attention_backend, C.cuda_graphs: st.cuda_graphs,
        C.device_name: st.device_name,
        C.expert_imbalance: st.expert_imbalance,  # MoE models (engine.stats.expert_imbalance); else None
        C.num_cow_copies: int(st.num_cow_copies or 0),  # parallel sampling / beam search
        C.spec_acceptance_rate: spec.per_token_acceptance if spec is not None else None,
        C.spec_mean_accepted_length: spec.mean_accepted_length if spec is not None else None,
        C.kernel_compiles: len(st.kernel_compiles or ()),
        C.kernel_compile_s: sum(_get(e, "seconds") for e in st.kernel_compiles or ()),
        C.kernels_built: ", ".join(f"{name} x{n}" for name, n in
                                   collections.Counter(_get(e, "kernel") for e in st.kernel_compiles or ()).items()),
    }


# --- telemetry ---------------------------------------------------------------------------------------

TELEMETRY_COLUMNS = ["time", "gpu_util_pct", "mem_used_bytes", "power_w", "sm_clock_mhz", "temperature_c", "energy_j"]


def telemetry_summary(samples: pd.DataFrame) -> dict:
    """Means and peaks of NVML samples, and energy_j over the sampled window.

    Energy is the difference of the total-energy counter (energy_source="counter") or, where the GPU
    has no counter, the trapezoid integral of power over time ("power"); NaN without samples.
    """
    nan = math.nan
    if samples is None or len(samples) == 0:
        return {C.gpu_util_mean: nan, C.gpu_util_peak: nan, C.power_w_mean: nan, C.power_w_peak: nan,
                C.mem_used_peak_bytes: nan, C.sm_clock_mhz_mean: nan, C.temperature_c_peak: nan,
                C.energy_j: nan, C.energy_source: "none", C.num_telemetry_samples: 0}

    def stat(name, how):
        v = samples[name].astype(float).dropna() if name in samples else pd.Series(dtype=float)
        return float(getattr(v, how)()) if len(v) else nan

    energy, source = nan, "none"
    e = samples["energy_j"].astype(float).dropna() if "energy_j" in samples else pd.Series(dtype=float)
    if len(e) >= 2:
        energy, source = float(e.iloc[-1] - e.iloc[0]), "counter"
    elif "power_w" in samples and samples["power_w"].notna().sum() >= 2:
        s = samples[["time", "power_w"]].dropna()
        energy, source = float(np.trapezoid(s["power_w"], s["time"])), "power"
    return {C.gpu_util_mean: stat("gpu_util_pct", "mean"), C.gpu_util_peak: stat("gpu_util_pct", "max"),
            C.power_w_mean: stat("power_w", "mean"), C.power_w_peak: stat("power_w", "max"),
            C.mem_used_peak_bytes: stat("mem_used_bytes", "max"), C.sm_clock_mhz_mean: stat("sm_clock_mhz", "mean"),
            C.temperature_c_peak: stat("temperature_c", "max"), C.energy_j: energy, C.energy_source: source,
            C.num_telemetry_samples: len(samples)}


# --- one results row ------------------------------------------------------------------------------

def point_metrics(requests: pd.DataFrame, steps: pd.DataFrame, stats, telemetry: dict | None,
                  duration: float, slo: dict | None = None) -> dict:
    """The metric columns of one sweep point (see the module docstring for units).

    requests: `request_frame` of the run; steps: `steps_frame`; stats: the EngineStats after the run;
    telemetry: `telemetry_summary` of the run (or None); duration: wall time of the run in seconds.
    """
    row = {C.duration_s: duration}
    row.update(throughput(requests, duration))
    row.update(goodput(requests, duration, slo))
    row.update(latency_summary(requests))
    row.update(step_summary(steps))
    row.update(sharing_summary(steps))
    row.update(engine_summary(stats))
    row.update(telemetry if telemetry is not None else telemetry_summary(None))
    n_out = row[C.total_output_tokens]
    row[C.energy_per_output_token_j] = row[C.energy_j] / n_out if n_out and math.isfinite(row[C.energy_j]) else math.nan
    return row


# --- across rows ------------------------------------------------------------------------------------

def pareto_front(df: pd.DataFrame, x: str, y: str, minimize_x: bool = True, maximize_y: bool = True) -> pd.Series:
    """True for rows no other row beats on both x and y (NaN rows are never on the front)."""
    xs = df[x].astype(float).to_numpy() * (1 if minimize_x else -1)
    ys = df[y].astype(float).to_numpy() * (-1 if maximize_y else 1)  # both now "smaller is better"
    ok = np.isfinite(xs) & np.isfinite(ys)
    front = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        front[i] = not dominated.any()
    return pd.Series(front, index=df.index, name=C.on_pareto_front)


def latency_cdf(requests: dict, metric: str = "ttft", labels: dict | None = None) -> pd.DataFrame:
    """Empirical CDF of one per-request latency: columns point_id, label, value_ms, cdf (in (0, 1]).

    requests: {point_id: request_frame}; metric: ttft | tpot | e2e | itl (itl pools the gaps).
    """
    parts = []
    for pid, frame in requests.items():
        if frame is None or len(frame) == 0:
            continue
        v = [g for gaps in frame["itl"] for g in gaps] if metric == "itl" else frame[metric]
        v = np.sort(np.asarray(v, dtype=float))
        v = v[np.isfinite(v)]
        if v.size:
            parts.append(pd.DataFrame({C.point_id: pid, C.label: (labels or {}).get(pid, pid),
                                       "value_ms": v * 1e3, "cdf": np.arange(1, v.size + 1) / v.size}))
    if not parts:
        return pd.DataFrame(columns=[C.point_id, C.label, "value_ms", "cdf"])
    return pd.concat(parts, ignore_index=True)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per point from one row per repeat (the results file): the schema's "median" columns as the
    median over the point's ok repeats with ``<col>_min`` / ``<col>_max`` beside them, the other columns
    from the point's first repeat. status/error: those of the first failed repeat, "ok" when all were ok;
    repeats: the number of repeats summarised. Points keep their first-seen order."""
    if len(runs) == 0:
        return runs.copy()
    if C.repeat not in runs:
        runs = runs.assign(**{C.repeat: 0})
    # The medians, minima and maxima of every point at once (per point and column, the sweep's results after each
    # run took 41 ms a point: a 100-point sweep of 3 repeats spent about 10 minutes here).
    names = [name for name in schema.median_columns() if name in runs]
    values = runs[names].apply(pd.to_numeric, errors="coerce")
    if C.status in runs:
        values = values.where(runs[C.status] == "ok")  # failed repeats do not count
    by_point = values.groupby(runs[C.point_id], sort=False)
    med, low, high = by_point.median(), by_point.min(), by_point.max()
    stats = dict(zip(med.index, zip(*(f.to_numpy().tolist() for f in (med, low, high)))))
    spreads = [schema.spread(name) for name in names]
    rows = []
    for pid, g in runs.groupby(C.point_id, sort=False):
        g = g.sort_values(C.repeat)
        failed = g[g[C.status] != "ok"] if C.status in g else g.iloc[0:0]
        row = (failed if len(failed) else g).iloc[0].to_dict()
        row.pop(C.repeat, None)
        for name, (lo, hi), *value in zip(names, spreads, *stats[pid]):
            row[name], row[lo], row[hi] = map(float, value)
        row[C.repeats] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def best_settings(df: pd.DataFrame, objectives=None) -> pd.DataFrame:
    """For each objective (default `schema.OBJECTIVES`: [(column, name)]) the ok point that optimizes it,
    in the direction the schema gives, with the noise around it.

    Columns: objective, column, value, low, high (min-max over repeats; value itself without repeats),
    point_id, label, runner_up, runner_up_value, margin (best over runner-up as a relative difference,
    positive = better), ties: labels of the other points whose range overlaps the best one's
    ("equivalent within noise"; empty when none), repeats.
    """
    cols = ["objective", "column", "value", "low", "high", C.point_id, C.label,
            "runner_up", "runner_up_value", "margin", "ties", C.repeats]
    rows = []
    ok = df[df[C.status] == "ok"] if C.status in df else df
    for col, name in (objectives or schema.OBJECTIVES):
        if col not in ok or pd.to_numeric(ok[col], errors="coerce").notna().sum() == 0:
            continue
        v = pd.to_numeric(ok[col], errors="coerce")
        lo_c, hi_c = schema.spread(col) if schema.column(col).agg == schema.MEDIAN else (None, None)
        lo = pd.to_numeric(ok[lo_c], errors="coerce").fillna(v) if lo_c in ok else v
        hi = pd.to_numeric(ok[hi_c], errors="coerce").fillna(v) if hi_c in ok else v
        higher = schema.column(col).better == schema.HIGHER
        order = v.dropna().sort_values(ascending=not higher).index
        i = order[0]
        label = ok[C.label] if C.label in ok else pd.Series(ok.index.astype(str), index=ok.index)
        ties = [str(label[j]) for j in order[1:] if lo[j] <= hi[i] and hi[j] >= lo[i]]
        second = order[1] if len(order) > 1 else None
        margin = math.nan
        if second is not None and v[second] != 0:
            margin = (v[i] - v[second]) / abs(v[second]) * (1 if higher else -1)
        rows.append({"objective": name, "column": col, "value": float(v[i]), "low": float(lo[i]),
                     "high": float(hi[i]), C.point_id: ok.at[i, C.point_id] if C.point_id in ok else i,
                     C.label: str(label[i]), "runner_up": None if second is None else str(label[second]),
                     "runner_up_value": math.nan if second is None else float(v[second]), "margin": margin,
                     "ties": ties, C.repeats: int(ok.at[i, C.repeats]) if C.repeats in ok else 1})
    return pd.DataFrame(rows, columns=cols)


def speedup_over(df: pd.DataFrame, setting: str, baseline=None, metric: str = C.output_throughput) -> pd.DataFrame:
    """Each ok row's ``metric`` against the ok row with ``setting`` == ``baseline`` and the same other settings
    (config, workload and sampling columns): its rows with a column C.speedup, above 1 when the row is better
    (a "lower is better" metric, a latency, is inverted). Baseline rows themselves, and rows with no baseline
    partner, are left out: a quantization sweep over max_num_seqs gives each mode's speed-up over no
    quantization at each batch limit. An unknown ``setting`` or ``metric`` is a KeyError naming it."""
    lower = schema.column(metric).better == schema.LOWER
    for name in (setting, metric):
        if schema.column(name).name not in df:
            raise KeyError(f"{name!r} is not in these results")
    d = df[df[C.status] == schema.OK] if C.status in df else df
    keys = [c.name for c in schema.COLUMNS if c.kind in (schema.CONFIG, schema.WORKLOAD) and c.name in d]
    keys = [c for c in dict.fromkeys(keys + schema.SAMPLING_COLUMNS) if c in d and c != setting]
    key = d[keys].apply(schema.as_text).agg("|".join, axis=1) if keys else pd.Series("", index=d.index)
    is_base = schema.as_text(d[setting]) == ("None" if baseline is None else str(baseline))
    base = pd.to_numeric(d.loc[is_base, metric], errors="coerce").groupby(key[is_base]).median()
    rows = d[~is_base].assign(_key=key[~is_base])
    ref = rows["_key"].map(base)
    value = pd.to_numeric(rows[metric], errors="coerce")
    rows = rows.assign(**{C.speedup: (ref / value) if lower else (value / ref)}).drop(columns="_key")
    return rows[np.isfinite(rows[C.speedup].astype(float))]
