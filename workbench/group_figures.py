"""The figure of a sliding-window model's KV blocks per cache group over one run (engine/kv/groups.py).

A Gemma-style model's layers form KV cache groups sharing one pool of blocks: a full-attention group keeps every
block of a request, a sliding group only the blocks its window still reads. Stacked, the groups' blocks in use
add up to the pool's (num_used_blocks); the gap between the full group's band and a sliding group's is what the
window saves. Like every figure of `workbench.figures` it reads columns made by `workbench.metrics`
(group_blocks_column, from `metrics.steps_frame` or a `workbench.baselines` allocator timeline) and computes nothing.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from . import metrics
from .figures import _empty

TITLE = "KV blocks in use per cache group"
GROUP_COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6"]
ONE_GROUP = ("the model has one KV cache group (no sliding-window layers): every layer keeps every block of a "
             "request, so the KV usage over time is the whole story")


def group_names(groups) -> list[str]:
    """Legend names of KV cache groups: groups is EngineStats.kv_cache_groups (None: full attention, else the
    window) or the kv_cache_group_windows results column ("full, 21, 21"): "group 0 (full attention)", "group 1
    (window 21)"."""
    if isinstance(groups, float) or groups is None:  # NaN: a results row without the column's value
        return []
    if isinstance(groups, str):
        groups = [None if g.strip() == "full" else g.strip() for g in groups.split(",")]
    return [f"group {g} (" + ("full attention" if w is None else f"window {w}") + ")"
            for g, w in enumerate(groups or ())]


def group_blocks_over_time(steps: pd.DataFrame | None, groups=None, num_blocks: int | None = None,
                           title: str = TITLE) -> go.Figure:
    """Blocks of the pool each KV cache group holds (stacked, count) at every engine step of one run: a sweep
    point's time series (x: seconds since the start of the run), a steps frame (x: the step) or the paged rows of
    an allocator timeline (x: its step). groups: the groups' windows or the kv_cache_group_windows column, for the
    legend; num_blocks: the pool's size (C.kv_blocks), drawn as a dashed line. Says why instead for a model with one group."""
    cols = metrics.group_blocks_columns(steps)
    if steps is None or len(steps) == 0 or not cols:
        return _empty(title, ONE_GROUP if steps is not None and len(steps) else "no per-step data for this point")
    if "t" in steps:
        x, x_title = steps["t"], "time since start of run (s)"
    else:
        x = steps["step"] if "step" in steps else pd.Series(range(len(steps)), index=steps.index)
        x_title = "engine step"
    names = group_names(groups)
    fig = go.Figure()
    for g, col in enumerate(cols):
        name = names[g] if g < len(names) else f"group {g}"
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        fig.add_scatter(x=x, y=steps[col], name=name, mode="lines", line_shape="hv", stackgroup="groups",
                        line=dict(width=0.5, color=color),
                        hovertemplate="%{x}<br>%{y:.0f} blocks<extra>" + name + "</extra>")
    if num_blocks is not None and pd.notna(num_blocks) and num_blocks > 0:
        fig.add_hline(y=num_blocks, line_dash="dash", line_color="#444",
                      annotation_text=f"pool: {int(num_blocks):,} blocks", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="KV blocks in use (count, stacked by group)",
                      legend_title_text="KV cache group", hovermode="x unified")
    fig.update_yaxes(rangemode="tozero")
    return fig
