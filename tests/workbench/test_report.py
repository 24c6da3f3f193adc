"""The self-contained HTML report: plotly.js once, every figure, escaped user strings."""
import re

import plotly.offline

from workbench import figures
from workbench.report import report_figures, write_report

HOSTILE = "<script>alert('x')</script>"  # as in conftest.synthetic_results(hostile=True)


def test_report_is_self_contained(tmp_path, synthetic):
    df, requests, timeseries, telemetry = synthetic
    path = write_report(df, str(tmp_path / "r" / "report.html"), timeseries, requests, telemetry,
                        environment={"gpu": "NVIDIA H100", "torch": "2.x", "workloads": [{"name": "shared-prefix"}]},
                        title="My sweep")
    text = open(path, encoding="utf-8").read()
    js = plotly.offline.get_plotlyjs()
    assert text.count(js) == 1
    assert not re.search(r"<script[^>]*\ssrc=", text)  # nothing fetched from the network
    figs = report_figures(df, timeseries, requests, telemetry)
    assert {"throughput", "ttft-percentiles", "throughput-latency", "fragmentation", "prefix-hit-rate",
            "energy-per-token", "ttft-cdf", "kv-usage-over-time", "gpu-over-time"} <= set(figs)
    for fig_id, fig in figs.items():
        assert text.count(f'id="fig-{fig_id}"') == (0 if figures.is_empty(fig) else 1)
    assert "Environment" in text and "NVIDIA H100" in text
    assert "Failed points: 1 of 5" in text and "the KV cache has 2 blocks" in text
    # The answer comes first: failures, then the recommendation, then the figures.
    assert text.index("Failed points") < text.index("Recommendation") < text.index("Figures")
    ok = df[df.status == "ok"]
    best = ok.loc[ok.output_throughput.idxmax()]
    rec = text[text.index("Recommendation"):text.index("Figures")]
    for objective in ("throughput", "TTFT p99", "goodput under the SLO", "energy per token"):
        assert f"<th>{objective}</th>" in rec
    assert f"EngineConfig(block_size={best.block_size}, " in rec
    assert f"vllm serve MODEL --block-size {best.block_size}" in rec
    flag = "--enable-prefix-caching" if best.enable_prefix_caching else "--no-enable-prefix-caching"
    assert flag in rec and "one run: no noise estimate" in rec
    table = text[text.index("<h2>Results"):]
    for column in ("power (mean) (W)", "energy per output token (J/token)", "SM clock (mean) (MHz)",
                   "GPU memory used (peak) (bytes)", "temperature (peak) (°C)", "GPU utilisation (mean) (%)"):
        assert f"<th>{column}</th>" in table  # NVML of every point, not of one
    assert "<title>My sweep</title>" in text


def test_user_strings_are_escaped(tmp_path, synthetic_hostile):
    df, requests, timeseries, telemetry = synthetic_hostile
    path = write_report(df, str(tmp_path / "report.html"), timeseries, requests, telemetry,
                        environment={"model": HOSTILE}, title=HOSTILE)
    text = open(path, encoding="utf-8").read()
    assert HOSTILE not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    # Script tags are only plotly.js and the figures' own.
    n_figures = len([f for f in report_figures(df, timeseries, requests, telemetry).values()
                     if not figures.is_empty(f)])
    assert len(re.findall(r"<script", text)) == 1 + n_figures


def test_report_without_time_series_or_successes(tmp_path, synthetic):
    df = synthetic[0]
    path = write_report(df[df.status != "ok"], str(tmp_path / "report.html"))
    text = open(path, encoding="utf-8").read()
    assert "0 of 1 points ok" in text and "Failed points: 1 of 1" in text
    assert "nothing to recommend" in text
    assert "plotly-graph-div" not in text  # every figure is replaced by the sentence saying why
    assert "no successful points to show" in text


def test_figure_without_data_is_one_sentence(tmp_path, synthetic):
    df = synthetic[0].assign(prefix_cache_hit_rate=0.0)
    text = open(write_report(df, str(tmp_path / "r.html")), encoding="utf-8").read()
    assert 'id="fig-prefix-hit-rate"' not in text and 'id="empty-prefix-hit-rate"' in text
    assert "no prompt token was served from the prefix cache" in text
    assert 'id="fig-fragmentation"' in text and "fewer allocated slots" in text  # caption explains prefix caching


def test_sharing_figure_and_columns_only_when_the_sweep_shared_blocks(tmp_path, synthetic):
    df = synthetic[0].assign(num_saved_blocks_peak=0.0)  # no sharing (the synthetic prefix-cache hits share blocks)
    text = open(write_report(df, str(tmp_path / "plain.html")), encoding="utf-8").read()
    assert 'id="empty-sharing"' in text and "no KV block was shared" in text
    assert "KV blocks saved by sharing (peak)" not in text
    ok = df["status"] == "ok"
    shared = df.copy()
    shared.loc[ok, "n"] = [1, 2, 4, 4]
    shared.loc[ok, "num_used_blocks_peak"], shared.loc[ok, "num_unshared_blocks_peak"] = 20.0, 32.0
    shared.loc[ok, "num_saved_blocks_peak"], shared.loc[ok, "num_cow_copies"] = 18.0, 6.0
    shared.loc[ok, "sharing_saving"] = 0.375
    text = open(write_report(shared, str(tmp_path / "shared.html")), encoding="utf-8").read()
    assert 'id="fig-sharing"' in text and "n parallel samples hold their prompt" in text  # the figure and its caption
    table = text[text.index("<h2>Results"):]
    for column in ("completions per request (parallel sampling) (count)", "KV blocks saved by sharing (peak) (count)",
                   "KV memory saved by sharing (peak blocks) (share of the blocks needed without sharing)"):
        assert f"<th>{column}</th>" in table
    assert "37.5%" in table


def test_warns_about_points_not_comparable_with_the_others(tmp_path, synthetic):
    df = synthetic[0]
    assert (df.loc[df.status == "ok", "kernel_compiles"] == 0).all()  # from the stats: no build in these runs
    text = open(write_report(df, str(tmp_path / "same.html")), encoding="utf-8").read()
    assert "warning'" not in text
    ok = df.index[df.status == "ok"]
    mixed = df.copy()
    mixed.loc[ok[0], "device_name"] = "NVIDIA H100 80GB HBM3"
    mixed.loc[ok[1], ["kernel_compiles", "kernel_compile_s", "kernels_built"]] = [3, 1.25, "_prefill_kernel x3"]
    text = open(write_report(mixed, str(tmp_path / "mixed.html")), encoding="utf-8").read()
    assert "ran on different GPU models: cpu (3 points), NVIDIA H100 80GB HBM3 (1 points)" in text
    assert text.count("warning'") == 2 and "1 point(s) built Triton kernels during the measured run" in text
    assert f"{df.loc[ok[1], 'label']} (3, 1.2 s: _prefill_kernel x3)" in text
    assert "<th>kernel builds during the run (count)</th>" in text and "<th>device name</th>" in text


def test_kv_groups_figure_for_a_sliding_window_model_and_a_sentence_otherwise(tmp_path, synthetic,
                                                                              tiny_sliding_window_llm):
    """A sweep over a tiny sliding-window model (3 KV cache groups) puts the per-group blocks over time of its
    drill-down point in the report, the groups in the results; a model with one group gets the sentence why."""
    from workbench import Sweep, group_figures, metrics
    from workbench.schema import C

    df, requests, timeseries, telemetry = synthetic
    text = open(write_report(df, str(tmp_path / "plain.html"), timeseries, requests, telemetry),
                encoding="utf-8").read()
    assert 'id="empty-kv-groups-over-time"' in text and "the model has one KV cache group" in text

    llm = tiny_sliding_window_llm(max_num_batched_tokens=32)
    sweep = Sweep(llm, "fixed", grid={"block_size": [4, 8]}, model_name="tiny-gemma2-window8", num_requests=3,
                  workload_args=dict(prompt_len=40, output_len=6), progress=False, warmup=False,
                  base_config=llm.config)
    results = sweep.run()
    assert (results[C.status] == "ok").all() and list(results[C.kv_cache_group_windows]) == ["full, 8, 8"] * 2
    pid = results[C.point_id].iloc[0]
    ts = sweep.timeseries[pid]
    cols = metrics.group_blocks_columns(ts)
    assert len(cols) == 3 and (ts[cols].sum(axis=1) == ts["num_used_blocks"]).all() and ts[cols[0]].max() > 0
    figs = report_figures(results, sweep.timeseries, sweep.requests, sweep.telemetry, drilldown=pid)
    fig = figs["kv-groups-over-time"]
    assert [t.name for t in fig.data] == group_figures.group_names((None, 8, 8))
    assert [list(t.y) for t in fig.data] == [ts[c].tolist() for c in cols]
    path = write_report(results, str(tmp_path / "groups.html"), sweep.timeseries, sweep.requests, sweep.telemetry,
                        drilldown=pid)
    text = open(path, encoding="utf-8").read()
    assert 'id="fig-kv-groups-over-time"' in text and "the memory the windows save" in text


def test_quantization_sweep_report_shows_the_speedup_curve(tmp_path, synthetic):
    import pandas as pd
    df = synthetic[0]
    int4 = df.assign(quantization="int4", point_id=df.point_id + "q", output_throughput=df.output_throughput * 1.5)
    both = pd.concat([df, int4], ignore_index=True)
    fig = report_figures(both)["quantization-speedup"]
    assert [y for t in fig.data for y in t.y] == [1.5] * 4  # the 4 ok points, each against its bf16 twin
    text = open(write_report(both, str(tmp_path / "q.html")), encoding="utf-8").read()
    assert 'id="fig-quantization-speedup"' in text and "dequantizing the weights" in text
    assert "quantization-speedup" not in report_figures(df)
