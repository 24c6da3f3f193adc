"""Figures of the memory planner's table (`workbench.planner.plan_table`): each a function of the table
returning a plotly Figure, with a matplotlib twin (same name + ``_mpl``) for static output.

They read the table's columns and compute nothing; bytes are shown in GiB. To be merged into
workbench/figures.py (kept apart while that file is being edited).
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

GIB = 2**30
VERDICT_MARK = {"fits": "", "num_gpu_blocks does not fit": "B", "weights do not fit": "W",
                "max_model_len needs more KV than is left": "L", "not allowed": "x"}
BREAKDOWN = [("weight_bytes", "weights", "#4C78A8"), ("activation_peak_bytes", "activation peak", "#F58518"),
             ("other_bytes", "other (context, buffers, CUDA graphs, margin, a draft model)", "#B279A2"),
             ("kv_cache_bytes", "KV cache", "#54A24B"),
             ("headroom_bytes", "outside the budget", "#BAB0AC")]


def _groups(table: pd.DataFrame, facet: str):
    return list(table.groupby(facet, sort=False)) if facet in table else [("", table)]


def _empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text="no plans to show", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


def _empty_mpl(title: str) -> MplFigure:
    fig = MplFigure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "no plans to show", ha="center", va="center")
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def kv_tokens_by_gpu(table: pd.DataFrame, color: str = "quantization", facet: str = "model") -> go.Figure:
    """KV tokens available (kv_tokens) per GPU, one bar per ``color`` value (quantization mode), one panel per
    ``facet`` value (model). Expects one row per (facet, gpu, color): filter the table first. A config that
    does not fit shows 0 tokens and its verdict on hover; bars are marked W / L / B / x by verdict
    (VERDICT_MARK)."""
    title = "KV tokens available per GPU and quantization mode"
    if len(table) == 0:
        return _empty(title)
    panels = _groups(table, facet)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[str(n) for n, _ in panels], shared_yaxes=True)
    seen = set()
    for col, (_, d) in enumerate(panels, start=1):
        for name, g in d.groupby(color, sort=False, dropna=False):
            fig.add_bar(x=g["gpu"], y=g["kv_tokens"], name=str(name), legendgroup=str(name),
                        showlegend=str(name) not in seen, text=g["verdict"].map(VERDICT_MARK).fillna(""),
                        customdata=list(zip(g["verdict"], g["max_concurrent_requests"].fillna(0).astype(int))),
                        hovertemplate="%{x}<br>%{y:,} KV tokens<br>%{customdata[1]} requests of max_model_len"
                                      "<br>%{customdata[0]}", row=1, col=col)
            seen.add(str(name))
    fig.update_layout(title=title, barmode="group", legend_title=color, yaxis_title="KV tokens")
    return fig


def kv_tokens_by_gpu_mpl(table: pd.DataFrame, color: str = "quantization", facet: str = "model") -> MplFigure:
    title = "KV tokens available per GPU and quantization mode"
    if len(table) == 0:
        return _empty_mpl(title)
    panels = _groups(table, facet)
    fig = MplFigure(figsize=(4.5 * len(panels) + 1, 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (panel, d) in zip(axes, panels):
        gpus = list(dict.fromkeys(d["gpu"]))
        groups = list(d.groupby(color, sort=False, dropna=False))
        width = 0.8 / max(len(groups), 1)
        for i, (name, g) in enumerate(groups):
            pos = [gpus.index(x) - 0.4 + width * (i + 0.5) for x in g["gpu"]]
            bars = ax.bar(pos, g["kv_tokens"], width=width, label=str(name))
            ax.bar_label(bars, labels=list(g["verdict"].map(VERDICT_MARK).fillna("")), fontsize=8)
        ax.set_xticks(range(len(gpus)), gpus, rotation=30, ha="right", fontsize=8)
        ax.set_title(str(panel))
    axes[0].set_ylabel("KV tokens")
    axes[-1].legend(title=color, fontsize=8)
    fig.suptitle(title)
    return fig


def memory_breakdown(table: pd.DataFrame, by: str = "gpu") -> go.Figure:
    """Where each plan's GPU memory goes, stacked (GiB): weights, activation peak, other, KV cache, and what lies
    outside the engine's budget. One bar per row, labelled by ``by``; rows whose KV is negative show it below 0."""
    title = "GPU memory per plan"
    if len(table) == 0:
        return _empty(title)
    fig = go.Figure()
    labels = table[by].astype(str)
    for column, name, colour in BREAKDOWN:
        fig.add_bar(x=labels, y=table[column] / GIB, name=name, marker_color=colour,
                    hovertemplate="%{x}<br>" + name + ": %{y:.2f} GiB")
    fig.update_layout(title=title, barmode="relative", yaxis_title="GiB", xaxis_title=by)
    return fig


def memory_breakdown_mpl(table: pd.DataFrame, by: str = "gpu") -> MplFigure:
    title = "GPU memory per plan"
    if len(table) == 0:
        return _empty_mpl(title)
    fig = MplFigure(figsize=(max(6, 0.7 * len(table) + 3), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = range(len(table))
    up, down = [0.0] * len(table), [0.0] * len(table)
    for column, name, colour in BREAKDOWN:
        values = list(table[column] / GIB)
        bottoms = [d if v < 0 else u for v, u, d in zip(values, up, down)]
        ax.bar(x, values, bottom=bottoms, label=name, color=colour)
        up = [u + max(v, 0) for u, v in zip(up, values)]
        down = [d + min(v, 0) for d, v in zip(down, values)]
    ax.set_xticks(list(x), list(table[by].astype(str)), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
