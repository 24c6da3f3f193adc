"""A sweep report as one self-contained HTML file (plotly.js inlined once; opens offline).

It reads top-down as an answer: what failed (if anything), what to choose per objective with the margin
over the runner-up and the noise, the planner's memory verdict, the chosen config as an `EngineConfig`
line and as `vllm serve` flags; then the figures, each with a caption saying how to read it (a figure
without data is replaced by the sentence saying why); then the results table and the environment.
It composes `workbench.figures`, `workbench.recommend` and `workbench.html_parts`; it adds no arithmetic.
Every user-supplied string (title, labels, environment, errors) is HTML-escaped.
"""
from __future__ import annotations

import os

import pandas as pd
import plotly.offline

from . import figures, group_figures, profile_figures, recommend, schema, sharing_figures
from .html_parts import REPORT_CSS, esc, kv_table, results_table
from .schema import C

CAPTIONS = {
    "throughput": "Output tokens per second of each setting: the median over repeats, the whisker spans the "
                  "fastest and slowest repeat. Bars whose whiskers overlap are not distinguishable on this data.",
    "ttft-percentiles": "Time to first token (arrival to first output token) per setting: p50 is the typical "
                        "request, p99 the slow tail a user notices. Lower is better.",
    "tpot-percentiles": "Time per output token after the first (the decode speed a streaming user sees). Lower "
                        "is better.",
    "throughput-latency": "Each marker is a setting (colour: the grid values); the dashed line joins the Pareto "
                          "front, the settings no other beats on both throughput (up) and TTFT p99 (left).",
    "fragmentation": "Share of the allocated KV slots that hold no token, averaged over engine steps (each "
                     "running request wastes at most its partly filled last block, so larger blocks waste more). "
                     "With prefix caching on the share is higher here although no more slots are wasted: requests "
                     "that share a prefix hold the same physical blocks, so the pool allocates fewer slots for the "
                     "same requests, while each request still has its own partly filled last block; the same "
                     "waste over fewer allocated slots is a larger share.",
    "prefix-hit-rate": "Share of prompt tokens served from the prefix cache instead of being recomputed "
                       "(token-level, as vLLM's prefix_cache_hits / prefix_cache_queries).",
    "sharing": "Left: the most KV blocks each setting held at once (blue) beside the most its sequences' block "
               "tables would have needed without sharing (grey): n parallel samples hold their prompt's blocks "
               "once, beams hold their common history once, requests hold a cached prefix once; the label is the "
               "memory sharing saved. Right: blocks copied on write, when a sequence had to write into a block "
               "it shared (the prompt's last, partly filled block of each fork).",
    "energy-per-token": "Joules per output token from the GPU's energy counter (NVML) over the run; lower is "
                        "better.",
    "nvml": "GPU telemetry of every point, sampled by NVML during its run: mean power, energy per output token, "
            "mean SM clock, peak memory used, peak temperature and mean utilisation.",
    "ttft-cdf": "For each setting, the share of requests (y) whose time to first token is at most x. A curve "
                "further left is faster; the top right shows the tail.",
    "tpot-cdf": "For each setting, the share of requests (y) whose time per output token is at most x.",
    "kv-usage-over-time": "KV blocks in use (left axis) and requests running (right axis) at every engine step of "
                          "the recommended-throughput point: a pool near 100% with preemptions is memory-bound.",
    "gap-parts": "Each setting's measured time split into parts: the trace's absolute limit (all its FLOPs and "
                 "bytes at the measured matmul rate and copy bandwidth), host time the GPU did not hide, kernels "
                 "below their roofline, steps carrying fewer tokens than the budget allows (the tail), preemption "
                 "recompute and CUDA-graph padding. The parts add up to the measured time.",
    "quantization-speedup": "Output throughput of each weight quantization over no quantization at the same "
                            "other settings (a KV cache dtype the sweep varies gets its own lines), by batch "
                            "limit: above the dashed line the mode pays. Memory-bound decode at small batches "
                            "gains from reading fewer weight bytes; large batches are bound by the arithmetic, "
                            "where dequantizing the weights costs.",
    "kv_cache_dtype-speedup": "Output throughput with each KV cache dtype over a KV cache in the model's dtype at "
                              "the same other settings, by batch limit: an fp8 cache holds twice the tokens and "
                              "halves the bytes decode attention reads, which pays where the pool or attention "
                              "limits the batch.",
    "waterfall": "The recommended-throughput point's measured time built up from the ideal time, part by part.",
    "gpu-over-time": "GPU utilisation and power during the run of the recommended-throughput point.",
    "kv-groups-over-time": "A sliding-window model's KV blocks per cache group at every engine step of the "
                           "recommended-throughput point, stacked (their sum is the pool's blocks in use; the dashed "
                           "line is the pool). A full-attention group keeps every block of its requests; a sliding "
                           "group frees the blocks that left its window, so its band stays flat while the full "
                           "group's grows with the context: the difference is the memory the windows save.",
}


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
        "sharing": sharing_figures.sharing_by_setting(results),
        "energy-per-token": figures.energy_per_token(results),
        "nvml": figures.nvml_by_setting(results),
    }
    figs.update({f"{setting}-speedup": fig for setting, fig in figures.speedup_curves(results).items()})
    if C.gap_measured_s in results and results[C.gap_measured_s].notna().any():
        figs["gap-parts"] = profile_figures.gap_parts_figure(results)
    if requests:
        figs["ttft-cdf"] = figures.latency_cdf(results, requests, "ttft")
        figs["tpot-cdf"] = figures.latency_cdf(results, requests, "tpot")
    if drilldown is None:
        recs = recommend.recommendations(results)
        drilldown = next((r[C.point_id] for r in recs if r["column"] == C.output_throughput), None)
    if drilldown is not None and (timeseries or telemetry):
        label = results.loc[results[C.point_id] == drilldown, C.label]
        name = label.iloc[0] if len(label) else drilldown
        figs["kv-usage-over-time"] = figures.kv_usage_over_time((timeseries or {}).get(drilldown),
                                                                f"KV usage and batch size: {name}")
        figs["gpu-over-time"] = figures.gpu_over_time((telemetry or {}).get(drilldown),
                                                      f"GPU utilisation and power: {name}")
        row = results.loc[results[C.point_id] == drilldown]
        first = row.iloc[0] if len(row) else {}
        figs["kv-groups-over-time"] = group_figures.group_blocks_over_time(
            (timeseries or {}).get(drilldown), first.get(C.kv_cache_group_windows), first.get(C.kv_blocks),
            f"KV blocks in use per cache group: {name}")
        if C.gap_measured_s in row and len(row) and pd.notna(row[C.gap_measured_s].iloc[0]):
            figs["waterfall"] = profile_figures.waterfall_figure(row.iloc[0], f"Where the time goes: {name}")
    return figs


def _failures(results: pd.DataFrame) -> list[str]:
    failed = results[results[C.status] != "ok"] if C.status in results else results.iloc[0:0]
    if not len(failed):
        return []
    reasons = failed[C.error].fillna("").map(lambda e: str(e).split("\n")[0][:200])
    counts = (failed[C.status].astype(str) + ": " + reasons).value_counts()
    parts = [f"<h2 class='failed'>Failed points: {len(failed)} of {len(results)}</h2><ul>"]
    parts += [f"<li><b>{n}</b> &times; {esc(reason)}</li>" for reason, n in counts.items()]
    parts.append("</ul><details><summary>every failed point</summary><ul>")
    for _, r in failed.iterrows():
        parts.append(f"<li><b>{esc(r[C.label])}</b> [{esc(r[C.status])}]: <pre>{esc(r.get(C.error))}</pre></li>")
    parts.append("</ul></details>")
    return parts


def _measurement_warnings(results: pd.DataFrame) -> list[str]:
    """Warnings that some points are not comparable with the others: they ran on different GPU models, or
    their measurement contains kernel builds (each stalls the GPU, for seconds on a cold cache: the point reads slow)."""
    ok = results[results[C.status] == "ok"] if C.status in results else results
    warnings = []
    if C.device_name in ok:
        devices = ok[C.device_name].dropna().astype(str)
        if devices.nunique() > 1:
            counts = ", ".join(f"{name} ({n} points)" for name, n in devices.value_counts().items())
            warnings.append(f"These points ran on different GPU models: {counts}. Compare points of one model "
                            f"only; the {C.device_name} and {C.run_host} columns say where each ran.")
    if C.kernel_compiles in ok:
        builds = pd.to_numeric(ok[C.kernel_compiles], errors="coerce").fillna(0)
        slow = ok[builds > 0]
        if len(slow):
            secs = pd.to_numeric(slow[C.kernel_compile_s], errors="coerce").fillna(0) if C.kernel_compile_s in slow \
                else pd.Series(0.0, index=slow.index)
            kernels = slow[C.kernels_built] if C.kernels_built in slow else pd.Series("", index=slow.index)
            names = ", ".join(f"{lab} ({int(b)}, {t:.1f} s{': ' + k if k else ''})" for lab, b, t, k in
                              zip(slow[C.label], builds[builds > 0], secs, kernels.fillna("")))
            warnings.append(f"{len(slow)} point(s) built Triton kernels during the measured run, which stalls "
                            f"the GPU and lowers their throughput: {names}. Rerun them (the kernels are cached "
                            f"now) before comparing.")
    return [f"<p class='failed warning'><b>Warning:</b> {esc(w)}</p>" for w in warnings]


def _recommendation(results: pd.DataFrame, model: str, planner_verdict: str | None) -> list[str]:
    recs = recommend.recommendations(results)
    if not recs:
        return ["<h2>Recommendation</h2><p>No point succeeded, so there is nothing to recommend: see the failures "
                "above.</p>"]
    rows = "".join(f"<tr><th>{esc(r['objective'])}</th><td><b>{esc(r[C.label])}</b></td>"
                   f"<td>{esc(r['value_text'])}</td><td class='verdict'>{esc(r['verdict'])}</td></tr>" for r in recs)
    parts = ["<h2>Recommendation</h2>",
             "<table><tr><th>objective</th><th>choose</th><th>median</th><th>compared with the others</th></tr>"
             f"{rows}</table>"]
    why = {C.request_goodput: "it needs an SLO (slo= / --slo-ttft, --slo-tpot, --slo-e2e)",
           C.energy_per_output_token_j: "it needs a GPU with NVML energy readings"}
    for col, name in schema.OBJECTIVES:
        if col not in {r["column"] for r in recs}:
            parts.append(f"<p class='verdict'>No recommendation for {esc(name)}: "
                         f"{esc(why.get(col, 'no data in these results'))}.</p>")
    best = next((r for r in recs if r["column"] == C.output_throughput), recs[0])
    row = results[results[C.point_id] == best[C.point_id]].iloc[0].to_dict()
    parts += [f"<h3>Chosen config (best {esc(best['objective'])}: {esc(best[C.label])})</h3>",
              f"<code class='block'>{esc(recommend.engine_config_line(row))}</code>",
              "<p>The same settings for vLLM:</p>",
              f"<code class='block'>{esc(recommend.vllm_serve_command(row, model))}</code>"]
    if planner_verdict:
        parts.append(f"<p><b>Memory planner:</b> {esc(planner_verdict)}</p>")
    return parts


def write_report(results: pd.DataFrame, path: str, timeseries: dict | None = None, requests: dict | None = None,
                 telemetry: dict | None = None, environment: dict | None = None,
                 title: str = "paged-workbench sweep report", drilldown: str | None = None,
                 planner_verdict: str | None = None) -> str:
    """Write the HTML report of a sweep to ``path`` and return the path.

    results: `Sweep.results`; timeseries / requests / telemetry: the Sweep's per-point dicts (optional,
    for CDFs and the over-time figures); environment: `Sweep.environment` or any dict; planner_verdict:
    one line from `workbench.recommend.plan_verdict` for the chosen config.
    """
    figs = report_figures(results, timeseries, requests, telemetry, drilldown)
    n_ok = int((results[C.status] == "ok").sum()) if len(results) and C.status in results else 0
    repeats = int(results[C.repeats].max()) if C.repeats in results and len(results) else 1
    model = str((environment or {}).get(C.model, "MODEL"))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{REPORT_CSS}</style>",
             f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p>Generated {esc(pd.Timestamp.now(tz='UTC').strftime('%Y-%m-%d %H:%M UTC'))}; "
             f"{n_ok} of {len(results)} points ok; {repeats} repeat{'s' if repeats != 1 else ''} per point.</p>"]
    parts += _failures(results)
    parts += _measurement_warnings(results)
    parts += _recommendation(results, model, planner_verdict)
    parts.append("<h2>Figures</h2>")
    for fig_id, fig in figs.items():
        why = figures.is_empty(fig)
        heading = fig.layout.title.text or fig_id
        if why:
            parts.append(f'<p class="empty" id="empty-{fig_id}"><b>{esc(heading)}:</b> {esc(why)}.</p>')
            continue
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{fig_id}",
                          default_height=f"{fig.layout.height or 450}px", default_width="100%")
        caption = f"<p class='caption'>{esc(CAPTIONS[fig_id])}</p>" if fig_id in CAPTIONS else ""
        parts.append(f"<div class='figure'>{div}{caption}</div>")
    if len(results):
        nvml = [c for c in schema.NVML_COLUMNS if c in results and pd.to_numeric(results[c], errors="coerce").notna().any()]
        sharing = schema.SAMPLING_COLUMNS + schema.SHARING_COLUMNS if sharing_figures.has_sharing(results) else []
        parts += ["<h2>Results</h2>", "<div class='scroll'>",
                  results_table(results, schema.REPORT_COLUMNS + sharing + nvml),
                  "</div>",
                  "<p>Every column (and each repeat, and the per-point time series) is in the results file.</p>"]
    if environment:
        parts += ["<h2>Environment</h2>", kv_table(environment)]
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
