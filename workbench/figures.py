"""Figures of sweep results: each a function of the results that returns a plotly Figure, and a
matplotlib twin (same name + ``_mpl``) returning a matplotlib Figure for static output.

Figures read columns made by `workbench.metrics` (through `Sweep`) and never compute a metric;
where a figure needs a derived view (Pareto front, CDF) it asks `workbench.metrics` for it.
Rows whose status is not "ok" are left out of every figure (the report lists them).
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from . import metrics

PERCENTILE_COLORS = {"p50": "#4C78A8", "p90": "#F58518", "p99": "#E45756"}


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


def _empty(title: str, why: str = "no successful points to show") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


def _empty_mpl(title: str, why: str = "no successful points to show") -> MplFigure:
    fig = MplFigure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, why, ha="center", va="center")
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def _bars(df, y, title, ytitle, by="label", color=None):
    d = _ok(df)
    if len(d) == 0 or y not in d:
        return _empty(title)
    fig = go.Figure()
    for name, g in (d.groupby(color, sort=False, dropna=False) if color else [(None, d)]):
        fig.add_bar(x=g[by].astype(str), y=g[y], name=str(name) if color else ytitle)
    fig.update_layout(title=title, yaxis_title=ytitle, xaxis_title=by, barmode="group", showlegend=bool(color))
    return fig


def _bars_mpl(df, y, title, ytitle, by="label", color=None):
    d = _ok(df)
    if len(d) == 0 or y not in d:
        return _empty_mpl(title)
    fig = MplFigure(figsize=(max(6, 0.6 * len(d) + 3), 4.5), layout="constrained")
    ax = fig.add_subplot()
    groups = list(d.groupby(color, sort=False, dropna=False)) if color else [(None, d)]
    xs = list(dict.fromkeys(d[by].astype(str)))
    width = 0.8 / len(groups)
    for i, (name, g) in enumerate(groups):
        pos = [xs.index(x) - 0.4 + width * (i + 0.5) for x in g[by].astype(str)]
        ax.bar(pos, g[y], width=width, label=str(name) if color else None)
    ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ytitle)
    if color:
        ax.legend(title=color)
    return fig


# --- per setting ----------------------------------------------------------------------------------

def throughput_by_setting(df: pd.DataFrame, metric: str = "output_throughput", by: str = "label") -> go.Figure:
    """Throughput per setting; ``metric``: output_throughput or total_token_throughput (tokens/s),
    request_throughput or request_goodput (requests/s)."""
    return _bars(df, metric, f"Throughput per setting ({metric})", metric, by)


def throughput_by_setting_mpl(df: pd.DataFrame, metric: str = "output_throughput", by: str = "label") -> MplFigure:
    return _bars_mpl(df, metric, f"Throughput per setting ({metric})", metric, by)


def prefix_hit_rate(df: pd.DataFrame, by: str = "label", color: str = "workload") -> go.Figure:
    """Token-level prefix-cache hit rate per setting, one bar colour per workload."""
    return _bars(df, "prefix_cache_hit_rate", "Prefix-cache hit rate", "hit rate (tokens)", by, color)


def prefix_hit_rate_mpl(df: pd.DataFrame, by: str = "label", color: str = "workload") -> MplFigure:
    return _bars_mpl(df, "prefix_cache_hit_rate", "Prefix-cache hit rate", "hit rate (tokens)", by, color)


def energy_per_token(df: pd.DataFrame, by: str = "label") -> go.Figure:
    """Joules per output token per setting (NVML energy counter; empty without a GPU)."""
    d = _ok(df)
    if "energy_per_output_token_j" not in d or d["energy_per_output_token_j"].notna().sum() == 0:
        return _empty("Energy per output token", "no GPU energy data (NVML) in these results")
    return _bars(df, "energy_per_output_token_j", "Energy per output token", "J / output token", by)


def energy_per_token_mpl(df: pd.DataFrame, by: str = "label") -> MplFigure:
    d = _ok(df)
    if "energy_per_output_token_j" not in d or d["energy_per_output_token_j"].notna().sum() == 0:
        return _empty_mpl("Energy per output token", "no GPU energy data (NVML) in these results")
    return _bars_mpl(df, "energy_per_output_token_j", "Energy per output token", "J / output token", by)


def latency_percentiles(df: pd.DataFrame, metric: str = "ttft", by: str = "label") -> go.Figure:
    """p50 / p90 / p99 of one latency (ttft | tpot | itl | e2e, ms) per setting, as grouped bars."""
    d = _ok(df)
    title = f"{metric.upper()} percentiles"
    if len(d) == 0:
        return _empty(title)
    fig = go.Figure()
    for p, c in PERCENTILE_COLORS.items():
        fig.add_bar(x=d[by].astype(str), y=d[f"{metric}_{p}_ms"], name=p, marker_color=c)
    fig.update_layout(title=title, yaxis_title=f"{metric} (ms)", xaxis_title=by, barmode="group")
    return fig


def latency_percentiles_mpl(df: pd.DataFrame, metric: str = "ttft", by: str = "label") -> MplFigure:
    d = _ok(df)
    title = f"{metric.upper()} percentiles"
    if len(d) == 0:
        return _empty_mpl(title)
    long = pd.concat([pd.DataFrame({by: d[by].astype(str), "value": d[f"{metric}_{p}_ms"], "percentile": p})
                      for p in PERCENTILE_COLORS])
    return _bars_mpl(long.assign(status="ok"), "value", title, f"{metric} (ms)", by, "percentile")


def fragmentation_by_block_size(df: pd.DataFrame, color: str | None = None) -> go.Figure:
    """Mean internal fragmentation (share of allocated KV slots holding no token) against block size;
    one marker per setting, and a line per group when ``color`` names a column (e.g. "enable_prefix_caching")."""
    d = _ok(df)
    title = "Internal fragmentation per block size"
    if len(d) == 0:
        return _empty(title)
    fig = go.Figure()
    for name, g in (d.groupby(color, sort=False, dropna=False) if color else [("all points", d)]):
        g = g.sort_values("block_size")
        fig.add_scatter(x=g["block_size"], y=g["internal_fragmentation_mean"], name=str(name),
                        mode="lines+markers" if color else "markers", marker_size=9,
                        text=g["label"], hovertemplate="%{text}<br>block_size=%{x}<br>fragmentation=%{y:.3f}")
    fig.update_layout(title=title, xaxis_title="block_size (tokens)", yaxis_title="internal fragmentation (mean)",
                      xaxis_type="log", xaxis_tickvals=sorted(d["block_size"].unique()))
    return fig


def fragmentation_by_block_size_mpl(df: pd.DataFrame, color: str | None = None) -> MplFigure:
    d = _ok(df)
    title = "Internal fragmentation per block size"
    if len(d) == 0:
        return _empty_mpl(title)
    fig = MplFigure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, g in (d.groupby(color, sort=False, dropna=False) if color else [("all points", d)]):
        g = g.sort_values("block_size")
        ax.plot(g["block_size"], g["internal_fragmentation_mean"], marker="o", label=str(name),
                linestyle="-" if color else "none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block_size (tokens)")
    ax.set_ylabel("internal fragmentation (mean)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def throughput_latency(df: pd.DataFrame, x: str = "ttft_p99_ms", y: str = "output_throughput") -> go.Figure:
    """Throughput against a latency, one marker per setting, the Pareto front (low x, high y) joined by a line."""
    d = _ok(df)
    title = f"Throughput vs latency ({y} vs {x})"
    if len(d) == 0:
        return _empty(title)
    front = d[metrics.pareto_front(d, x, y)].sort_values(x)
    fig = go.Figure()
    fig.add_scatter(x=d[x], y=d[y], mode="markers", name="settings", text=d["label"],
                    hovertemplate="%{text}<br>" + x + "=%{x:.1f}<br>" + y + "=%{y:.1f}", marker_size=9)
    fig.add_scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto front", text=front["label"],
                    hovertemplate="%{text}", marker=dict(size=13, symbol="star"), line_dash="dash")
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y)
    return fig


def throughput_latency_mpl(df: pd.DataFrame, x: str = "ttft_p99_ms", y: str = "output_throughput") -> MplFigure:
    d = _ok(df)
    title = f"Throughput vs latency ({y} vs {x})"
    if len(d) == 0:
        return _empty_mpl(title)
    front = d[metrics.pareto_front(d, x, y)].sort_values(x)
    fig = MplFigure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(d[x], d[y], label="settings")
    ax.plot(front[x], front[y], "r*--", markersize=12, label="Pareto front")
    for _, r in front.iterrows():
        ax.annotate(str(r["label"]), (r[x], r[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend()
    return fig


# --- per request ---------------------------------------------------------------------------------

def latency_cdf(df: pd.DataFrame, requests: dict, metric: str = "ttft") -> go.Figure:
    """CDF of one per-request latency (ttft | tpot | e2e | itl, ms), one line per ok setting.

    requests: {point_id: request frame} as kept in `Sweep.requests`.
    """
    d = _ok(df)
    cdf = metrics.latency_cdf({p: requests.get(p) for p in d["point_id"]} if len(d) else {}, metric,
                              dict(zip(d.get("point_id", []), d.get("label", []))))
    title = f"{metric.upper()} CDF"
    if len(cdf) == 0:
        return _empty(title, "no per-request data")
    fig = go.Figure()
    for label, g in cdf.groupby("label", sort=False):
        fig.add_scatter(x=g["value_ms"], y=g["cdf"], mode="lines", name=str(label), line_shape="hv")
    fig.update_layout(title=title, xaxis_title=f"{metric} (ms)", yaxis_title="share of requests", yaxis_range=[0, 1.02])
    return fig


def latency_cdf_mpl(df: pd.DataFrame, requests: dict, metric: str = "ttft") -> MplFigure:
    d = _ok(df)
    cdf = metrics.latency_cdf({p: requests.get(p) for p in d["point_id"]} if len(d) else {}, metric,
                              dict(zip(d.get("point_id", []), d.get("label", []))))
    title = f"{metric.upper()} CDF"
    if len(cdf) == 0:
        return _empty_mpl(title, "no per-request data")
    fig = MplFigure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, g in cdf.groupby("label", sort=False):
        ax.step(g["value_ms"], g["cdf"], where="post", label=str(label))
    ax.set_xlabel(f"{metric} (ms)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7)
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


def _two_axes_mpl(ts, left, right, title, why):
    if ts is None or len(ts) == 0 or left[0] not in ts or ts[left[0]].notna().sum() == 0:
        return _empty_mpl(title, why)
    fig = MplFigure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(ts["t"], ts[left[0]], color="C0")
    ax.set_ylabel(left[1], color="C0")
    ax.set_xlabel("time since start of run (s)")
    if right[0] in ts:
        ax2 = ax.twinx()
        ax2.step(ts["t"], ts[right[0]], where="post", color="C1")
        ax2.set_ylabel(right[1], color="C1")
    ax.set_title(title)
    return fig


def kv_usage_over_time(timeseries: pd.DataFrame, title: str = "KV usage and batch size") -> go.Figure:
    """KV usage (used / total blocks) and batch size (running requests) per engine step of one point."""
    return _two_axes(timeseries, ("kv_usage", "KV usage"), ("num_running", "batch size (running)"), title,
                     "no per-step data")


def kv_usage_over_time_mpl(timeseries: pd.DataFrame, title: str = "KV usage and batch size") -> MplFigure:
    return _two_axes_mpl(timeseries, ("kv_usage", "KV usage"), ("num_running", "batch size (running)"), title,
                         "no per-step data")


def gpu_over_time(telemetry: pd.DataFrame, title: str = "GPU utilisation and power") -> go.Figure:
    """GPU utilisation (%) and power (W) from the NVML samples of one point (``Sweep.telemetry[pid]``)."""
    return _two_axes(telemetry, ("gpu_util_pct", "GPU utilisation (%)"), ("power_w", "power (W)"), title,
                     "no GPU telemetry (NVML) for this point")


def gpu_over_time_mpl(telemetry: pd.DataFrame, title: str = "GPU utilisation and power") -> MplFigure:
    return _two_axes_mpl(telemetry, ("gpu_util_pct", "GPU utilisation (%)"), ("power_w", "power (W)"), title,
                         "no GPU telemetry (NVML) for this point")


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
        fig.add_bar(x=summary["label"], y=summary[column], name=name, marker_color=colour,
                    texttemplate="%{y:.1%}" if column == "tokens_share" else None, textposition="inside",
                    hovertemplate="%{x}<br>" + name + ": %{y:.1%}<extra></extra>")
    fig.update_layout(title=title, barmode="stack", yaxis_tickformat=".0%", yaxis_range=[0, 1],
                      yaxis_title="share of the KV pool", legend_traceorder="reversed")
    return fig


def memory_waste_mpl(summary: pd.DataFrame, title: str = "Where the KV memory goes") -> MplFigure:
    if len(summary) == 0:
        return _empty_mpl(title, "no allocators to show")
    fig = MplFigure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    labels, bottom = list(summary["label"]), [0.0] * len(summary)
    for column, name, colour in MEMORY_PARTS:
        values = list(summary[column].fillna(0.0))
        bars = ax.bar(labels, values, bottom=bottom, label=name, color=colour)
        if column == "tokens_share":
            ax.bar_label(bars, labels=[f"{v:.1%}" for v in values], label_type="center", color="white")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("share of the KV pool")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def allocator_batch_size(timeline: pd.DataFrame, title: str = "Requests running at once") -> go.Figure:
    """Requests running per step for each allocator (`workbench.baselines.replay_allocator` rows)."""
    if len(timeline) == 0:
        return _empty(title, "no steps to show")
    fig = go.Figure()
    for label, g in timeline.groupby("label", sort=False):
        fig.add_scatter(x=g["step"], y=g["num_running"], mode="lines", name=str(label), line_shape="hv")
    fig.update_layout(title=title, xaxis_title="step (one token per running request)", yaxis_title="requests running")
    return fig


def allocator_batch_size_mpl(timeline: pd.DataFrame, title: str = "Requests running at once") -> MplFigure:
    if len(timeline) == 0:
        return _empty_mpl(title, "no steps to show")
    fig = MplFigure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, g in timeline.groupby("label", sort=False):
        ax.step(g["step"], g["num_running"], where="post", label=str(label))
    ax.set_xlabel("step (one token per running request)")
    ax.set_ylabel("requests running")
    ax.set_title(title)
    ax.legend(fontsize=8)
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


def block_map_mpl(blocks: pd.DataFrame, columns: int = 16, colors: dict | None = None,
                  title: str = "KV blocks") -> MplFigure:
    from matplotlib.patches import Patch, Rectangle

    colors = colors if colors is not None else block_colors(blocks.loc[blocks["state"] == "owned", "owner"])
    rows = max(1, -(-len(blocks) // columns))
    fig = MplFigure(figsize=(0.35 * columns + 2.8, 0.35 * rows + 0.8), layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for name, g, fill, line, text in _block_groups(blocks, colors):
        for b in g["block_id"].astype(int):
            ax.add_patch(Rectangle((b % columns - 0.45, b // columns - 0.45), 0.9, 0.9, facecolor=fill,
                                   edgecolor=line, linewidth=1.5))
            ax.text(b % columns, b // columns, str(b), ha="center", va="center", fontsize=6, color=text)
        if len(g):
            handles.append(Patch(facecolor=fill, edgecolor=line, label=name))
    ax.set_xlim(-0.5, columns - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig
