"""Figures of where the time goes: each a function of results made by `workbench.profiling`, returning
a plotly Figure. They compute no metric: the numbers come from attribution(), step_roofline() and
kernel_breakdown(); the roofline's roof is drawn with profiling.roofline().
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from . import profiling, schema
from .schema import C

KIND_COLORS = {"prefill": "#F58518", "decode": "#4C78A8", "mixed": "#54A24B"}
PART_COLORS = {"ideal": "#4C78A8", "host": "#E45756", "kernel": "#F58518", "underfill": "#72B7B2",
               "recompute": "#B279A2", "padding": "#9D755D", "profiler": "#BAB0AC"}
PHASE_COLORS = {"schedule": "#4C78A8", "prepare": "#72B7B2", "launch": "#F58518", "sample": "#E45756",
                "output": "#B279A2"}


def waterfall_figure(row, title: str = "Where the time goes") -> go.Figure:
    """One run's measured time built up from the ideal time by each part of the gap (seconds).
    row: the attribution dict (or a results row holding the gap_* columns)."""
    frame = profiling.attribution_frame(row)
    fig = go.Figure(go.Waterfall(
        x=list(frame[C.label]) + ["measured"], y=list(frame["seconds"]) + [float(row[C.gap_measured_s])],
        measure=["absolute"] + ["relative"] * (len(frame) - 1) + ["total"],
        text=[f"{s:.3g} s ({p:.0%})" for s, p in zip(frame["seconds"], frame["share"])] + [
            f"{float(row[C.gap_measured_s]):.3g} s"],
        textposition="outside", connector={"line": {"color": "#999"}}))
    fig.update_layout(title=title, yaxis_title="seconds", showlegend=False)
    return fig


def gap_parts_figure(results: pd.DataFrame, by: str = C.label, title: str = "Which setting closes which part "
                     "of the gap") -> go.Figure:
    """Stacked bars: the parts of the measured time (seconds) of each row of a results table."""
    d = results[results[C.status] == "ok"] if C.status in results else results
    fig = go.Figure()
    for part in profiling.PARTS:
        col = schema.gap(part)
        if col in d:
            fig.add_bar(x=d[by].astype(str), y=d[col], name=profiling.PART_LABELS[part],
                        marker_color=PART_COLORS[part])
    fig.update_layout(title=title, barmode="relative", yaxis_title="seconds", xaxis_title=by)
    return fig


def roofline_figure(steps: pd.DataFrame, rates: dict, title: str = "Each step against the roofline") -> go.Figure:
    """Steps as points, arithmetic intensity (FLOP/byte) against achieved FLOP/s, coloured by step kind,
    under the roofs of the measured matmul rate and copy bandwidth. steps: `profiling.step_roofline`."""
    fig = go.Figure()
    ok = steps[np.isfinite(steps["achieved_flops"]) & (steps["intensity"] > 0)]
    for kind, g in ok.groupby("kind", sort=False):
        fig.add_scatter(x=g["intensity"], y=g["achieved_flops"], mode="markers", name=kind,
                        marker={"color": KIND_COLORS.get(kind), "size": 6, "opacity": 0.7},
                        customdata=np.stack([g["step"], g["efficiency"]], axis=-1),
                        hovertemplate="step %{customdata[0]}<br>%{x:.3g} FLOP/B<br>%{y:.3g} FLOP/s<br>"
                                      "%{customdata[1]:.0%} of roof<extra></extra>")
    ridge = float(profiling.roofline(1, 1, 1, rates)["ridge"])
    lo = min(float(ok["intensity"].min()) if len(ok) else ridge, ridge) / 4
    hi = max(float(ok["intensity"].max()) if len(ok) else ridge, ridge) * 4
    xs = np.geomspace(lo, hi, 64)
    roof = profiling.roofline(xs, np.ones_like(xs), np.ones_like(xs), rates)["roof_flops"]
    fig.add_scatter(x=xs, y=roof, mode="lines", name="roof", line={"color": "black", "dash": "dash"})
    fig.update_layout(title=title, xaxis={"type": "log", "title": "arithmetic intensity (FLOP / byte)"},
                      yaxis={"type": "log", "title": "achieved FLOP/s"})
    return fig


def step_timeline_figure(steps: pd.DataFrame, title: str = "Each step's host phases and device time") -> go.Figure:
    """Per step (x: step index): its host phases stacked (ms) and its device time as a line (ms).
    steps: `metrics.steps_frame` of a run."""
    fig = go.Figure()
    x = np.arange(len(steps))
    for p in profiling.PHASES:
        col = f"{p}_time"
        if col in steps:
            fig.add_bar(x=x, y=steps[col] * 1e3, name=p, marker_color=PHASE_COLORS[p])
    if "device_time" in steps:
        fig.add_scatter(x=x, y=steps["device_time"] * 1e3, mode="lines", name="device time",
                        line={"color": "black"})
    fig.update_layout(title=title, barmode="stack", bargap=0, xaxis_title="step", yaxis_title="ms")
    return fig


def kernel_classes_figure(breakdown: pd.DataFrame, title: str = "Device time by kernel class") -> go.Figure:
    """Deep mode: each class's device time beside its roofline time (ms). breakdown: `profiling.kernel_breakdown`."""
    d = breakdown[breakdown["device_time"] > 0]
    fig = go.Figure()
    fig.add_bar(x=d["class"], y=d["device_time"] * 1e3, name="measured", marker_color="#4C78A8")
    fig.add_bar(x=d["class"], y=d["roofline_time"] * 1e3, name="roofline", marker_color="#BBBBBB")
    fig.update_layout(title=title, barmode="group", yaxis_title="ms")
    return fig
