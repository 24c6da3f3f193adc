"""A sweep report as one self-contained HTML file (plotly.js inlined once; opens offline).

The report composes `workbench.figures` and `workbench.metrics.best_settings`; it adds no arithmetic.
Every user-supplied string (title, labels, environment, errors) is HTML-escaped.
"""
from __future__ import annotations

import html
import json
import os

import pandas as pd
import plotly.offline

from . import figures, metrics

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; } td, th { border: 1px solid #ddd; padding: 3px 6px; }
th { background: #f4f4f4; } .scroll { overflow-x: auto; max-width: 100%; }
.figure { margin: 1em 0; } .failed { color: #a00; } pre { white-space: pre-wrap; margin: 0; }
"""

# Columns of the results table in the report (all columns are in the results file).
TABLE_COLUMNS = ["label", "status", "workload", "block_size", "max_num_batched_tokens", "max_num_seqs",
                 "enable_prefix_caching", "quantization", "kv_cache_dtype", "attention_backend_used",
                 "request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
                 "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms", "e2e_p99_ms",
                 "kv_usage_mean", "kv_usage_peak", "internal_fragmentation_mean", "prefix_cache_hit_rate",
                 "num_preemptions", "batch_size_mean", "gpu_util_mean", "power_w_mean", "energy_per_output_token_j",
                 "kv_blocks", "duration_s"]


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        cell = f"<pre>{_esc(json.dumps(v, indent=1, default=str))}</pre>" if isinstance(v, (dict, list)) else _esc(v)
        rows.append(f"<tr><th>{_esc(k)}</th><td>{cell}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _table(df: pd.DataFrame, columns=None, float_format="{:.4g}") -> str:
    if columns is not None:
        df = df[[c for c in columns if c in df]]
    return df.to_html(index=False, escape=True, na_rep="", border=0,
                      float_format=lambda v: float_format.format(v))


def report_figures(results: pd.DataFrame, timeseries: dict | None = None, requests: dict | None = None,
                   telemetry: dict | None = None, drilldown: str | None = None) -> dict:
    """The report's figures by id (plotly Figures), in order. ``drilldown``: the point_id whose time
    series are shown (default: the best-throughput point)."""
    figs = {
        "throughput": figures.throughput_by_setting(results),
        "ttft-percentiles": figures.latency_percentiles(results, "ttft"),
        "tpot-percentiles": figures.latency_percentiles(results, "tpot"),
        "throughput-latency": figures.throughput_latency(results),
        "fragmentation": figures.fragmentation_by_block_size(results),
        "prefix-hit-rate": figures.prefix_hit_rate(results),
        "energy-per-token": figures.energy_per_token(results),
    }
    if requests:
        figs["ttft-cdf"] = figures.latency_cdf(results, requests, "ttft")
        figs["tpot-cdf"] = figures.latency_cdf(results, requests, "tpot")
    if drilldown is None:
        best = metrics.best_settings(results, {"throughput": ("output_throughput", "max")})
        drilldown = best["point_id"].iloc[0] if len(best) else None
    if drilldown is not None and (timeseries or telemetry):
        label = results.loc[results["point_id"] == drilldown, "label"]
        name = label.iloc[0] if len(label) else drilldown
        figs["kv-usage-over-time"] = figures.kv_usage_over_time((timeseries or {}).get(drilldown),
                                                                f"KV usage and batch size: {name}")
        figs["gpu-over-time"] = figures.gpu_over_time((telemetry or {}).get(drilldown),
                                                      f"GPU utilisation and power: {name}")
    return figs


def write_report(results: pd.DataFrame, path: str, timeseries: dict | None = None, requests: dict | None = None,
                 telemetry: dict | None = None, environment: dict | None = None,
                 title: str = "paged-workbench sweep report", drilldown: str | None = None) -> str:
    """Write the HTML report of a sweep to ``path`` and return the path.

    results: `Sweep.results`; timeseries / requests / telemetry: the Sweep's per-point dicts (optional,
    for CDFs and the over-time figures); environment: `Sweep.environment` or any dict.
    """
    figs = report_figures(results, timeseries, requests, telemetry, drilldown)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>",
             f"<style>{_CSS}</style>",
             f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>",
             f"<h1>{_esc(title)}</h1>",
             f"<p>Generated {_esc(pd.Timestamp.now(tz='UTC').strftime('%Y-%m-%d %H:%M UTC'))}; "
             f"{int((results.get('status') == 'ok').sum()) if len(results) else 0} of {len(results)} points ok.</p>"]
    if environment:
        parts += ["<h2>Environment</h2>", _kv_table(environment)]
    best = metrics.best_settings(results) if len(results) else pd.DataFrame()
    if len(best):
        parts += ["<h2>Best setting per objective</h2>", _table(best)]
    parts.append("<h2>Figures</h2>")
    for fig_id, fig in figs.items():
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{fig_id}",
                          default_height="450px", default_width="100%")
        parts.append(f"<div class='figure'>{div}</div>")
    if len(results):
        parts += ["<h2>Results</h2>", "<div class='scroll'>", _table(results, TABLE_COLUMNS), "</div>",
                  "<p>Every column, and the per-point time series, are in the results file.</p>"]
    failed = results[results["status"] != "ok"] if "status" in results else results.iloc[0:0]
    if len(failed):
        parts.append(f"<h2 class='failed'>Failed points ({len(failed)})</h2><ul>")
        for _, r in failed.iterrows():
            parts.append(f"<li><b>{_esc(r['label'])}</b> [{_esc(r['status'])}]: <pre>{_esc(r.get('error'))}</pre></li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
