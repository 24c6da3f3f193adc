"""Figures of sweep results: each a function of the results that returns a plotly Figure.

Figures read columns made by `workbench.metrics` (through `Sweep`) and never compute a metric;
where a figure needs a derived view (Pareto front, CDF) it asks `workbench.metrics` for it. Axis titles
are the schema's labels with units (`workbench.schema.title`). Where a point was repeated, bars and
markers carry the min-max over repeats as error bars. Colour encodes the grid dimensions that are not
on an axis. Rows whose status is not "ok" are left out of every figure (the report lists them).
A figure with nothing to draw says why in ``fig.layout.meta["empty"]`` (the report prints that sentence
instead of an empty plot) and in an annotation (for widgets).
"""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import metrics, schema
from .schema import C

PERCENTILE_COLORS = {"p50": "#4C78A8", "p90": "#F58518", "p99": "#E45756"}
SETTING_AXIS = "setting (grid point)"


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df[C.status] == "ok"] if C.status in df else df


def _empty(title: str, why: str = "no successful points to show") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, meta={"empty": why})
    return fig


def is_empty(fig: go.Figure) -> str | None:
    """Why ``fig`` has nothing to draw, or None when it has data."""
    meta = fig.layout.meta
    return meta.get("empty") if isinstance(meta, dict) else None


def _has(d: pd.DataFrame, col: str) -> bool:
    return col in d and pd.to_numeric(d[col], errors="coerce").notna().any()


def varying_settings(df: pd.DataFrame, exclude=()) -> list[str]:
    """Config columns (and the workload) whose value differs between the ok rows: the grid dimensions."""
    d = _ok(df)
    cols = [C.workload] + schema.SAMPLING_COLUMNS + schema.config_columns()
    return [c for c in cols if c not in exclude and _varies(d, c)]


def _varies(d: pd.DataFrame, col: str) -> bool:
    """``col`` holds more than one value (None and NaN one value, `schema.as_text`)."""
    return col in d and schema.as_text(d[col]).nunique() > 1


def _groups(d: pd.DataFrame, exclude=()):
    """(legend name, rows) per combination of the varying grid dimensions not in ``exclude``."""
    dims = varying_settings(d, exclude)
    if not dims:
        return [(None, d)], None
    names = d[dims].apply(lambda r: schema_label(dict(zip(dims, r))), axis=1)
    return [(name, d[names == name]) for name in dict.fromkeys(names)], ", ".join(schema.column(c).label for c in dims)


def schema_label(settings: dict) -> str:
    from .grid import point_label

    return point_label(settings)


def _error(d: pd.DataFrame, col: str):
    """Plotly error-bar dict of the min-max over repeats of ``col``, or None without repeats."""
    if schema.BY_NAME.get(col) is None or schema.column(col).agg != schema.MEDIAN:
        return None
    lo, hi = schema.spread(col)
    if lo not in d or hi not in d or not (d[hi] - d[lo]).fillna(0).any():
        return None
    v = d[col].astype(float)
    return dict(type="data", symmetric=False, array=(d[hi] - v).clip(lower=0), arrayminus=(v - d[lo]).clip(lower=0),
                thickness=1.2, width=4, color="#444")


def _bars(df, y, title, by=C.label):
    d = _ok(df)
    if len(d) == 0:
        return _empty(title)
    if not _has(d, y):
        return _empty(title, f"no {schema.column(y).label} in these results")
    fig = go.Figure()
    dims = varying_settings(d)
    # Colour: the first grid dimension, when there are several (with one, the x axis says it already).
    groups, legend = _groups(d, exclude=dims[1:]) if len(dims) > 1 else ([(None, d)], None)
    for name, g in groups:
        fig.add_bar(x=g[by].astype(str), y=g[y], name=str(name) if name else schema.column(y).label,
                    error_y=_error(g, y), hovertemplate="%{x}<br>%{y:.4g}<extra></extra>")
    fig.update_layout(title=title, yaxis_title=schema.title(y), xaxis_title=SETTING_AXIS,
                      showlegend=len(groups) > 1, legend_title_text=legend or "")
    return fig


# --- per setting ----------------------------------------------------------------------------------

def throughput_by_setting(df: pd.DataFrame, metric: str = C.output_throughput, by: str = C.label) -> go.Figure:
    """Throughput per setting (median over repeats, min-max as error bars); ``metric``: a throughput column."""
    return _bars(df, metric, f"{schema.column(metric).label.capitalize()} per setting", by)


def prefix_hit_rate(df: pd.DataFrame, by: str = C.label) -> go.Figure:
    """Token-level prefix-cache hit rate per setting; says so instead when no point had a hit."""
    d = _ok(df)
    title = "Prefix-cache hit rate"
    if len(d) and _has(d, C.prefix_cache_hit_rate) and not (d[C.prefix_cache_hit_rate].fillna(0) > 0).any():
        return _empty(title, "no prompt token was served from the prefix cache in any point (prefix caching off, "
                             "or no shared prefixes in the workload)")
    fig = _bars(df, C.prefix_cache_hit_rate, title, by)
    if not is_empty(fig):
        fig.update_layout(yaxis_tickformat=".0%", yaxis_rangemode="tozero")
    return fig


def energy_per_token(df: pd.DataFrame, by: str = C.label) -> go.Figure:
    """Joules per output token per setting (NVML energy counter; says why without a GPU)."""
    if len(_ok(df)) and not _has(_ok(df), C.energy_per_output_token_j):
        return _empty("Energy per output token", "no GPU energy data (NVML) in these results: the runs were on "
                                                 "the CPU or without telemetry")
    return _bars(df, C.energy_per_output_token_j, "Energy per output token", by)


def nvml_by_setting(df: pd.DataFrame, by: str = C.label) -> go.Figure:
    """Every NVML column (power, energy per token, SM clock, memory used, temperature, utilisation) per
    setting, one small panel each."""
    d = _ok(df)
    cols = [c for c in schema.NVML_COLUMNS if _has(d, c)]
    title = "GPU telemetry per setting (NVML)"
    if not cols:
        return _empty(title, "no GPU telemetry (NVML) in these results: the runs were on the CPU or without telemetry")
    fig = make_subplots(rows=math.ceil(len(cols) / 2), cols=2, subplot_titles=[schema.title(c) for c in cols],
                        vertical_spacing=0.12)
    for i, c in enumerate(cols):
        fig.add_bar(x=d[by].astype(str), y=d[c], error_y=_error(d, c), name=schema.column(c).label,
                    showlegend=False, row=i // 2 + 1, col=i % 2 + 1)
        fig.update_yaxes(title_text=schema.column(c).unit, row=i // 2 + 1, col=i % 2 + 1)
    fig.update_layout(title=title, height=260 * math.ceil(len(cols) / 2) + 80)
    return fig


def latency_percentiles(df: pd.DataFrame, metric: str = "ttft", by: str = C.label) -> go.Figure:
    """p50 / p90 / p99 of one latency (ttft | tpot | itl | e2e, ms) per setting, as grouped bars."""
    d = _ok(df)
    name = schema.column(schema.latency(metric, "p50")).label[:-4]
    title = f"{name} percentiles per setting"
    if len(d) == 0:
        return _empty(title)
    fig = go.Figure()
    for p, c in PERCENTILE_COLORS.items():
        col = schema.latency(metric, p)
        fig.add_bar(x=d[by].astype(str), y=d[col], name=p, marker_color=c, error_y=_error(d, col))
    fig.update_layout(title=title, yaxis_title=f"{name} (ms)", xaxis_title=SETTING_AXIS, barmode="group",
                      legend_title_text="percentile")
    return fig


def fragmentation_by_block_size(df: pd.DataFrame) -> go.Figure:
    """Mean internal fragmentation (share of allocated KV slots holding no token) against block size; one
    line per combination of the other grid dimensions (colour)."""
    d = _ok(df)
    title = "Internal fragmentation per block size"
    if len(d) == 0:
        return _empty(title)
    if not _has(d, C.internal_fragmentation_mean):
        return _empty(title, "no fragmentation data in these results")
    fig = go.Figure()
    groups, legend = _groups(d, exclude=(C.block_size,))
    for name, g in groups:
        g = g.sort_values(C.block_size)
        fig.add_scatter(x=g[C.block_size], y=g[C.internal_fragmentation_mean], name=str(name or "all points"),
                        mode="lines+markers", marker_size=9, error_y=_error(g, C.internal_fragmentation_mean),
                        text=g[C.label], hovertemplate="%{text}<br>block size %{x}<br>fragmentation %{y:.2%}")
    ticks = sorted(d[C.block_size].unique())
    fig.update_layout(title=title, xaxis_title=schema.title(C.block_size),
                      yaxis_title=schema.title(C.internal_fragmentation_mean), yaxis_tickformat=".1%",
                      yaxis_rangemode="tozero", xaxis_type="log" if len(ticks) > 1 else "linear",
                      xaxis_tickvals=ticks, legend_title_text=legend or "", showlegend=len(groups) > 1)
    return fig


def throughput_latency(df: pd.DataFrame, x: str = C.ttft_p99_ms, y: str = C.output_throughput) -> go.Figure:
    """Throughput against a latency, one marker per setting (colour: grid dimensions), the Pareto front
    (low x, high y) joined by a line."""
    d = _ok(df)
    title = f"{schema.column(y).label.capitalize()} against {schema.column(x).label}"
    if len(d) == 0:
        return _empty(title)
    # The sweep marks the front of its default axes in the results; other axes ask metrics for theirs.
    default_axes = (x, y) == (C.ttft_p99_ms, C.output_throughput) and C.on_pareto_front in d
    on_front = d[C.on_pareto_front].fillna(False).astype(bool) if default_axes else metrics.pareto_front(d, x, y)
    front = d[on_front].sort_values(x)
    fig = go.Figure()
    groups, legend = _groups(d)
    for name, g in groups:
        fig.add_scatter(x=g[x], y=g[y], mode="markers", name=str(name or "settings"), text=g[C.label],
                        error_x=_error(g, x), error_y=_error(g, y), marker_size=10,
                        hovertemplate="%{text}<br>%{x:.1f}<br>%{y:.1f}<extra></extra>")
    fig.add_scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto front", text=front[C.label],
                    hovertemplate="%{text}", marker=dict(size=14, symbol="star-open", color="black"), line_dash="dash")
    fig.update_layout(title=title, xaxis_title=schema.title(x), yaxis_title=schema.title(y),
                      legend_title_text=legend or "")
    return fig


BATCH_AXES = (C.max_num_seqs, C.concurrency, C.max_num_batched_tokens)  # a speed-up curve's x: the first varied
# The settings whose values a speed-up curve compares with a baseline value: (baseline, what to call it).
SPEEDUP_BASELINES = {C.quantization: (None, "no quantization"), C.kv_cache_dtype: ("auto", "a model-dtype KV cache")}


def speedup_curve(df: pd.DataFrame, setting: str = C.quantization, baseline=None,
                  metric: str = C.output_throughput) -> go.Figure:
    """``metric`` of each value of ``setting`` over that of ``baseline`` at the same other settings
    (`metrics.speedup_over`; above 1: better), against the first batch limit the sweep varies (max running
    requests, concurrency, token budget); one line per value and combination of the other grid dimensions,
    a dashed line at 1. For a quantization sweep: where each mode pays, by batch size."""
    d = _ok(df)
    known = SPEEDUP_BASELINES.get(setting)
    base = known[1] if known and known[0] == baseline else schema_label({setting: baseline})
    title = f"{schema.column(metric).label.capitalize()} over {base}"
    if len(d) == 0:
        return _empty(title)
    if setting not in varying_settings(d):
        return _empty(title, f"these results do not vary the {schema.column(setting).label}")
    if not _has(d, metric):
        return _empty(title, f"no {schema.column(metric).label} in these results")
    sp = metrics.speedup_over(d, setting, baseline, metric)
    if len(sp) == 0:
        return _empty(title, f"no point has a {base} point with the same other settings to compare with")
    x = next((c for c in BATCH_AXES if _varies(d, c)), None)
    dims = [setting] + varying_settings(d, exclude=(setting, x))
    names = sp[dims].apply(lambda r: schema_label(dict(zip(dims, r))), axis=1)
    fig = go.Figure()
    for name in dict.fromkeys(names):
        g = sp[names == name]
        g = g.sort_values(x) if x else g
        fig.add_scatter(x=g[x] if x else g[C.label].astype(str), y=g[C.speedup], name=name, mode="lines+markers",
                        marker_size=9, text=g[C.label], hovertemplate="%{text}<br>%{y:.3f}x<extra></extra>")
    fig.add_hline(y=1.0, line_dash="dash", line_color="#666", annotation_text=base)
    ticks = sorted(pd.to_numeric(sp[x], errors="coerce").dropna().unique()) if x else []
    wide = len(ticks) > 2 and ticks[0] > 0 and ticks[-1] / ticks[0] > 8
    fig.update_layout(title=title, yaxis_title=f"speed-up over {base} (x, {schema.column(metric).label})",
                      xaxis_title=schema.title(x) if x else SETTING_AXIS, xaxis_type="log" if wide else None,
                      xaxis_tickvals=ticks if wide else None, legend_title_text=", ".join(
                          schema.column(c).label for c in dims))
    return fig


def speedup_curves(df: pd.DataFrame) -> dict:
    """`speedup_curve` for each setting of SPEEDUP_BASELINES the results vary, by setting."""
    varied = varying_settings(df)
    return {s: speedup_curve(df, s, base) for s, (base, _) in SPEEDUP_BASELINES.items() if s in varied}


# --- per request ---------------------------------------------------------------------------------

def latency_cdf(df: pd.DataFrame, requests: dict, metric: str = "ttft") -> go.Figure:
    """CDF of one per-request latency (ttft | tpot | e2e | itl, ms), one line per ok setting; log x when
    the values span more than two decades.

    requests: {point_id: request frame} as kept in `Sweep.requests`.
    """
    d = _ok(df)
    cdf = metrics.latency_cdf({p: requests.get(p) for p in d[C.point_id]} if len(d) else {}, metric,
                              dict(zip(d.get(C.point_id, []), d.get(C.label, []))))
    name = schema.column(schema.latency(metric, "p50")).label[:-4]
    title = f"{name} distribution over requests"
    if len(cdf) == 0:
        return _empty(title, "no per-request data for these points")
    fig = go.Figure()
    for label, g in cdf.groupby(C.label, sort=False):
        fig.add_scatter(x=g["value_ms"], y=g["cdf"], mode="lines", name=str(label), line_shape="hv")
    positive = cdf["value_ms"][cdf["value_ms"] > 0]
    wide = len(positive) and positive.max() / positive.min() > 100
    fig.update_layout(title=title, xaxis_title=f"{name} (ms{', log scale' if wide else ''})",
                      yaxis_title="share of requests (count / total)", yaxis_range=[0, 1.02],
                      xaxis_type="log" if wide else "linear")
    return fig


# --- over time (one point) ----------------------------------------------------------------------------

def _two_axes(ts, left, right, title, why):
    if ts is None or len(ts) == 0 or left[0] not in ts or ts[left[0]].notna().sum() == 0:
        return _empty(title, why)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=ts["t"], y=ts[left[0]], name=left[1], mode="lines", secondary_y=False)
    if right[0] in ts:
        fig.add_scatter(x=ts["t"], y=ts[right[0]], name=right[1], mode="lines", line_shape="hv", secondary_y=True)
    fig.update_layout(title=title, xaxis_title="time since start of run (s)")
    fig.update_yaxes(title_text=left[1], secondary_y=False)
    fig.update_yaxes(title_text=right[1], secondary_y=True, tickmode="auto", showgrid=False, rangemode="tozero")
    return fig


def kv_usage_over_time(timeseries: pd.DataFrame, title: str = "KV usage and batch size") -> go.Figure:
    """KV usage (used / total blocks) and batch size (running requests) per engine step of one point."""
    return _two_axes(timeseries, ("kv_usage", "KV usage (share of blocks)"),
                     ("num_running", "batch size (running requests, count)"), title, "no per-step data for this point")


def gpu_over_time(telemetry: pd.DataFrame, title: str = "GPU utilisation and power") -> go.Figure:
    """GPU utilisation (%) and power (W) from the NVML samples of one point (``Sweep.telemetry[pid]``)."""
    return _two_axes(telemetry, ("gpu_util_pct", "GPU utilisation (%)"), ("power_w", "power (W)"), title,
                     "no GPU telemetry (NVML) for this point: it ran on the CPU or without telemetry")


# --- KV memory: contiguous vs paged allocators, and the block map of one engine step --------------------

MEMORY_PARTS = [("tokens_share", "token states", "#4C78A8"), ("reservation_share", "reservation", "#F58518"),
                ("internal_fragmentation_share", "internal fragmentation", "#E45756"),
                ("external_fragmentation_share", "external fragmentation", "#B279A2"),
                ("free_share", "free", "#D9D9D9")]


def memory_waste(summary: pd.DataFrame, title: str = "Where the KV memory goes") -> go.Figure:
    """The vLLM paper's memory-waste figure: per allocator, the share of the KV pool holding token states,
    reserved for later tokens, lost to internal and external fragmentation, or free, stacked to 100%.
    summary: `workbench.baselines.summarize` (one row per allocator, ``*_share`` columns)."""
    if len(summary) == 0:
        return _empty(title, "no allocators to show")
    fig = go.Figure()
    for column, name, colour in MEMORY_PARTS:
        fig.add_bar(x=summary[C.label], y=summary[column], name=name, marker_color=colour,
                    texttemplate="%{y:.1%}" if column == "tokens_share" else None, textposition="inside",
                    hovertemplate="%{x}<br>" + name + ": %{y:.1%}<extra></extra>")
    fig.update_layout(title=title, barmode="stack", yaxis_tickformat=".0%", yaxis_range=[0, 1],
                      yaxis_title="share of the KV pool", legend_traceorder="reversed")
    return fig


def allocator_batch_size(timeline: pd.DataFrame, title: str = "Requests running at once") -> go.Figure:
    """Requests running per step for each allocator (`workbench.baselines.replay_allocator` rows)."""
    if len(timeline) == 0:
        return _empty(title, "no steps to show")
    fig = go.Figure()
    for label, g in timeline.groupby(C.label, sort=False):
        fig.add_scatter(x=g["step"], y=g["num_running"], mode="lines", name=str(label), line_shape="hv")
    fig.update_layout(title=title, xaxis_title="step (one token per running request)", yaxis_title="requests running")
    return fig


# Requests get solid fills; greens come last, away from the green outline of cached free blocks.
REQUEST_COLORS = ["#FC8D62", "#8DA0CB", "#E78AC3", "#FFD92F", "#80B1D3", "#E5C494", "#BC80BD", "#FB8072",
                  "#BEBADA", "#FDB462", "#FCCDE5", "#FFED6F", "#66C2A5", "#8DD3C7", "#B3DE69", "#A6D854"]
BLOCK_STATES = {  # state: (legend name, fill, outline, text colour)
    "shared": ("shared prefix (ref_count > 1)", "#3C3C3C", "#3C3C3C", "white"),
    "cached": ("free, holds a cached prefix", "#F2F2F2", "#2CA02C", "#555555"),
    "free": ("free", "#F2F2F2", "#D0D0D0", "#AAAAAA"),
}


def block_colors(request_ids) -> dict:
    """{request_id: colour} from REQUEST_COLORS in the given order (cycling past 16 requests)."""
    return {rid: REQUEST_COLORS[i % len(REQUEST_COLORS)] for i, rid in enumerate(dict.fromkeys(request_ids))}


def _block_groups(blocks: pd.DataFrame, colors: dict):
    """(legend name, rows, fill, outline, text colour) per request in ``colors``, then per free/shared state."""
    owned = blocks[blocks["state"] == "owned"]
    for rid, colour in colors.items():
        yield str(rid), owned[owned["owner"] == rid], colour, "white", "#222222"
    for state, (name, fill, line, text) in BLOCK_STATES.items():
        yield name, blocks[blocks["state"] == state], fill, line, text


def block_map(blocks: pd.DataFrame, columns: int = 16, colors: dict | None = None, title: str = "KV blocks",
              cell_px: int = 36) -> go.Figure:
    """The physical KV blocks as a grid (block 0 top left, row by row), each coloured by the request that
    owns it; blocks held by several requests (a shared prefix) dark, free blocks that still hold a cached
    prefix outlined green, other free blocks grey.

    blocks: one row per physical block with block_id, state ("owned" | "shared" | "cached" | "free"),
    owner (request id of an owned block), owners (text: who holds a shared block), ref_count.
    colors: {request_id: colour}, kept fixed across steps (default: `block_colors` of the owners here).
    There is one trace per request in ``colors`` and per state, in that order, even when empty, so a
    FigureWidget can be updated trace by trace from step to step.
    """
    colors = colors if colors is not None else block_colors(blocks.loc[blocks["state"] == "owned", "owner"])
    rows = max(1, -(-len(blocks) // columns))
    # The grid keeps square cells of cell_px at the top of the plot; the legend (one line per request and
    # state, ~20 px each) may need more height than the grid.
    grid_px, top, bottom = rows * cell_px, 50, 10
    plot_px = max(grid_px, 20 * (len(colors) + len(BLOCK_STATES)))
    fig = go.Figure()
    for name, g, fill, line, text in _block_groups(blocks, colors):
        ids = g["block_id"].astype(int)
        fig.add_scatter(x=ids % columns, y=ids // columns, mode="markers+text", name=name, text=ids.astype(str),
                        customdata=list(zip(g["owners"], g["ref_count"])), textfont=dict(size=10, color=text),
                        marker=dict(symbol="square", size=cell_px - 4, color=fill, line=dict(color=line, width=2)),
                        hovertemplate="block %{text}<br>%{customdata[0]}<br>ref_count %{customdata[1]}"
                                      "<extra>" + name + "</extra>")
    fig.update_layout(title=title, width=columns * cell_px + 250, height=plot_px + top + bottom,
                      margin=dict(l=10, r=240, t=top, b=bottom), plot_bgcolor="white", showlegend=True,
                      legend=dict(x=1.02, y=1, xanchor="left", yanchor="top", font_size=11),
                      xaxis=dict(range=[-0.5, columns - 0.5], visible=False, fixedrange=True),
                      yaxis=dict(range=[rows - 0.5, -0.5], visible=False, fixedrange=True,
                                 domain=[1 - grid_px / plot_px, 1]))
    return fig