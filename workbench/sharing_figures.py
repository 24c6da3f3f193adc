"""The figure of KV block sharing per setting (parallel sampling, beam search, prefix-cache hits).

Like every figure of `workbench.figures` it reads results columns made by `workbench.metrics.sharing_summary`
and computes nothing: the peak of blocks a setting held against the peak its block tables would have needed
without sharing (the saving written over the bars), and the blocks copied on write.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import schema
from .figures import SETTING_AXIS, _empty, _error, _ok
from .schema import C

COLORS = {C.num_unshared_blocks_peak: "#BAB0AC", C.num_used_blocks_peak: "#4C78A8", C.num_cow_copies: "#E45756"}
TITLE = "KV blocks saved by sharing, and copies on write"


def has_sharing(df: pd.DataFrame) -> bool:
    """True when an ok row saved a block by sharing or copied one on write."""
    d = _ok(df)
    return any(c in d and (pd.to_numeric(d[c], errors="coerce").fillna(0) > 0).any()
               for c in (C.num_saved_blocks_peak, C.num_cow_copies))


def sharing_by_setting(df: pd.DataFrame, by: str = C.label) -> go.Figure:
    """Per setting: peak KV blocks without sharing beside the peak with it (the saving, sharing_saving, written
    on the bar), and the blocks copied on write (right). Says why instead when no point shared a block."""
    d = _ok(df)
    if len(d) == 0:
        return _empty(TITLE)
    if not has_sharing(d):
        return _empty(TITLE, "no KV block was shared in any point: sweep n (parallel sampling) or beam_width (beam "
                             "search), or use a workload whose prompts share a prefix with prefix caching on")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                        subplot_titles=["KV blocks at the peak", "KV blocks copied on write"])
    x = d[by].astype(str)
    for col, name in ((C.num_unshared_blocks_peak, "without sharing (block-table entries)"),
                      (C.num_used_blocks_peak, "with sharing (blocks in use)")):
        text = d[C.sharing_saving].map(lambda v: "" if pd.isna(v) or v <= 0 else f"-{v:.0%}") \
            if col == C.num_used_blocks_peak else None
        fig.add_bar(x=x, y=d[col], name=name, marker_color=COLORS[col], error_y=_error(d, col), text=text,
                    textposition="outside", hovertemplate="%{x}<br>%{y:.0f} blocks<extra>" + name + "</extra>",
                    row=1, col=1)
    fig.add_bar(x=x, y=d[C.num_cow_copies], name=schema.column(C.num_cow_copies).label, showlegend=False,
                marker_color=COLORS[C.num_cow_copies], error_y=_error(d, C.num_cow_copies), row=1, col=2)
    unit = schema.column(C.num_used_blocks_peak).unit
    fig.update_yaxes(title_text=f"KV blocks ({unit})", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text=f"copies ({schema.column(C.num_cow_copies).unit})", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title_text=SETTING_AXIS)
    fig.update_layout(title=TITLE, barmode="group", legend_title_text="peak KV blocks")
    return fig


def allocator_sharing(summary: pd.DataFrame, title: str = "Peak KV blocks with and without sharing") -> go.Figure:
    """Per case of `workbench.sharing_baselines.compare_sharing` (one sequence, n parallel samples, a beam
    search): the peak blocks of the Orca Oracle allocator, of paged blocks without sharing and of the paged
    allocator with sharing (its saving written on the bar)."""
    from .sharing_baselines import ALLOCATOR_LABELS

    if summary is None or len(summary) == 0:
        return _empty(title, "no cases to show")
    fig = go.Figure()
    colors = {"contiguous": "#F58518", "unshared": COLORS[C.num_unshared_blocks_peak],
              "shared": COLORS[C.num_used_blocks_peak]}
    for key, name in ALLOCATOR_LABELS.items():
        text = summary["saving"].map(lambda v: f"-{v:.0%}" if v > 0 else "") if key == "shared" else None
        fig.add_bar(x=summary[C.label], y=summary[key], name=name, marker_color=colors[key], text=text,
                    textposition="outside", hovertemplate="%{x}<br>%{y:.0f} blocks<extra>" + name + "</extra>")
    unit = schema.column(C.num_used_blocks_peak).unit
    fig.update_layout(title=title, barmode="group", yaxis_title=f"KV blocks at the peak ({unit})",
                      xaxis_title="sequences per request", legend_title_text="allocator")
    return fig
