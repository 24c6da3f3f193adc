"""Every figure draws synthetic results, reads columns only, labels its axes from the schema."""
import plotly.graph_objects as go
import pytest

from workbench import figures, schema

RESULT_FIGURES = ["throughput_by_setting", "prefix_hit_rate", "energy_per_token", "latency_percentiles",
                  "fragmentation_by_block_size", "throughput_latency", "nvml_by_setting"]


def test_one_implementation_per_figure():
    assert not [n for n in dir(figures) if n.endswith("_mpl")]  # no hand-kept matplotlib twins


@pytest.mark.parametrize("name", RESULT_FIGURES)
def test_result_figures_draw_ok_points_only(name, synthetic):
    df = synthetic[0]
    before = df.copy()
    fig = getattr(figures, name)(df)
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1 and not figures.is_empty(fig)
    xs = {str(x) for trace in fig.data for x in (trace.x if trace.x is not None else [])}
    assert "block_size=64, enable_prefix_caching=True" not in xs  # the failed point
    assert df.equals(before)  # figures never write into the results


def _titles(fig):
    lay = fig.layout
    return [a.title.text for a in (lay[k] for k in lay if k.startswith(("xaxis", "yaxis"))) if a.title.text]


@pytest.mark.parametrize("name", RESULT_FIGURES)
def test_every_numeric_axis_title_has_a_unit(name, synthetic):
    fig = getattr(figures, name)(synthetic[0])
    for t in _titles(fig):
        assert t == figures.SETTING_AXIS or "(" in t or t in {c.unit for c in schema.COLUMNS}, t
    assert not any(t in schema.BY_NAME for t in _titles(fig))  # a label, never a raw column name


def test_latency_percentiles_show_p50_p90_p99(synthetic):
    df = synthetic[0]
    fig = figures.latency_percentiles(df, "tpot")
    assert [t.name for t in fig.data] == ["p50", "p90", "p99"]
    ok = df[df.status == "ok"]
    assert list(fig.data[2].y) == ok["tpot_p99_ms"].tolist()
    assert fig.layout.yaxis.title.text == "TPOT (ms)"


def test_pareto_front_is_marked(synthetic):
    df = synthetic[0]
    fig = figures.throughput_latency(df)
    front = [t for t in fig.data if t.name == "Pareto front"][0]
    assert 1 <= len(front.x) <= 4 and list(front.x) == sorted(front.x)


def test_fragmentation_colours_the_other_grid_dimension(synthetic):
    fig = figures.fragmentation_by_block_size(synthetic[0])
    assert len(fig.data) == 2 and all(list(t.x) == [8, 32] for t in fig.data)
    assert {t.name for t in fig.data} == {"prefix=on", "prefix=off"}
    assert fig.layout.legend.title.text == "prefix caching"


def test_repeats_show_as_error_bars(synthetic):
    df = synthetic[0].copy()
    df["output_throughput_min"], df["output_throughput_max"] = df.output_throughput * 0.9, df.output_throughput * 1.2
    fig = figures.throughput_by_setting(df)
    err = [t.error_y for t in fig.data if t.error_y.array is not None]
    assert err and max(err[0].array) > 0


def test_cdf_and_time_series(synthetic):
    df, requests, timeseries, telemetry = synthetic
    fig = figures.latency_cdf(df, requests, "ttft")
    assert len(fig.data) == 4 and max(fig.data[0].y) == 1.0
    fig = figures.kv_usage_over_time(timeseries["p0"])
    assert len(fig.data) == 2 and "share of blocks" in fig.data[0].name
    fig = figures.gpu_over_time(telemetry["p0"])
    assert [t.name for t in fig.data] == ["GPU utilisation (%)", "power (W)"]


def test_wide_latency_spread_uses_a_log_axis(synthetic):
    df, requests, _, _ = synthetic
    wide = {k: v.assign(ttft=v.ttft * ([1] * 10 + [1000] * 10)) for k, v in requests.items()}
    assert figures.latency_cdf(df, wide, "ttft").layout.xaxis.type == "log"
    assert figures.latency_cdf(df, requests, "ttft").layout.xaxis.type != "log"


def test_empty_inputs_give_an_explaining_figure(synthetic):
    df = synthetic[0]
    failed_only = df[df.status != "ok"]
    for name in RESULT_FIGURES:
        fig = getattr(figures, name)(failed_only)
        assert len(fig.data) == 0 and fig.layout.annotations and figures.is_empty(fig)
    fig = figures.gpu_over_time(None)
    assert "no GPU telemetry" in figures.is_empty(fig)
    fig = figures.energy_per_token(df.assign(energy_per_output_token_j=float("nan")))
    assert "NVML" in fig.layout.annotations[0].text
    fig = figures.prefix_hit_rate(df.assign(prefix_cache_hit_rate=0.0))
    assert "no prompt token was served from the prefix cache" in figures.is_empty(fig)


def _sharing_rows(synthetic):
    """The synthetic ok points as n = 1, 2, 4, 4 with hand-set sharing counters."""
    df = synthetic[0]
    ok = df["status"] == "ok"
    used, unshared = [8.0, 12.0, 20.0, 20.0], [8.0, 16.0, 32.0, 32.0]
    df = df.copy()
    df.loc[ok, "n"] = [1, 2, 4, 4]
    df.loc[ok, "num_used_blocks_peak"], df.loc[ok, "num_unshared_blocks_peak"] = used, unshared
    df.loc[ok, "num_saved_blocks_peak"] = [0.0, 6.0, 18.0, 18.0]
    df.loc[ok, "num_cow_copies"] = [0.0, 2.0, 6.0, 6.0]
    df.loc[ok, "sharing_saving"] = [1 - u / s for u, s in zip(used, unshared)]
    return df


def test_sharing_figure_shows_blocks_with_and_without_sharing_and_the_copies(synthetic):
    from workbench.sharing_figures import sharing_by_setting

    df = _sharing_rows(synthetic)
    fig = sharing_by_setting(df)
    assert not figures.is_empty(fig)
    without, with_, cow = fig.data
    assert list(without.y) == [8, 16, 32, 32] and list(with_.y) == [8, 12, 20, 20] and list(cow.y) == [0, 2, 6, 6]
    assert list(with_.text) == ["", "-25%", "-38%", "-38%"]  # 1 - 12/16, 1 - 20/32
    assert "block_size=64, enable_prefix_caching=True" not in set(without.x)  # the failed point
    for t in _titles(fig):
        assert t == figures.SETTING_AXIS or "(" in t, t


def test_sharing_figure_is_one_sentence_without_sharing(synthetic):
    from workbench.sharing_figures import sharing_by_setting

    df = _sharing_rows(synthetic)
    df[["num_saved_blocks_peak", "num_cow_copies"]] = 0.0
    assert "no KV block was shared" in figures.is_empty(sharing_by_setting(df))
    no_columns = synthetic[0].drop(columns=["num_saved_blocks_peak", "num_cow_copies"])
    assert "no KV block was shared" in figures.is_empty(sharing_by_setting(no_columns))
    assert figures.is_empty(sharing_by_setting(df[df.status != "ok"])) == "no successful points to show"


def test_group_blocks_over_time_from_a_sliding_window_models_stats(tiny_sliding_window_llm):
    """A tiny Gemma 2 (groups: full, window 8, window 8; blocks of 4), one 40-token prompt and 10 tokens: the steps
    frame has each group's blocks (adding up to the pool's), the full group holding cdiv(c + 1, 4) at position c, a
    sliding one only the blocks of positions c - 7 .. c; the figure stacks exactly those columns per group."""
    from engine import SamplingParams
    from workbench import group_figures, metrics
    from workbench.schema import C

    llm = tiny_sliding_window_llm()
    prompt = [(7 * i) % 500 + 3 for i in range(40)]
    llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    stats = llm.engine.stats()
    steps = metrics.steps_frame(stats)
    cols = metrics.group_blocks_columns(steps)
    assert cols == ["group0_blocks", "group1_blocks", "group2_blocks"] == [metrics.group_blocks_column(g)
                                                                           for g in range(3)]
    assert (steps[cols].sum(axis=1) == steps["num_used_blocks"]).all()
    assert len(steps) == 10  # the prefill, then 9 decodes (the 10th token needs no step of its own)
    for i in range(1, 9):  # the decode of position c = 40 + i - 1 (the last step frees everything)
        c = 40 + i - 1
        assert steps.loc[i, cols].tolist() == [-(-(c + 1) // 4)] + [c // 4 - (c - 7) // 4 + 1] * 2, c
    summary = metrics.engine_summary(stats)
    assert summary[C.kv_cache_group_windows] == "full, 8, 8"
    fig = group_figures.group_blocks_over_time(steps, summary[C.kv_cache_group_windows], summary[C.kv_blocks])
    assert not figures.is_empty(fig)
    assert [t.name for t in fig.data] == ["group 0 (full attention)", "group 1 (window 8)", "group 2 (window 8)"]
    for trace, col in zip(fig.data, cols):
        assert list(trace.y) == steps[col].tolist() and trace.stackgroup == "groups"
    assert fig.layout.shapes[0].y0 == stats.num_gpu_blocks  # the pool, dashed
    assert fig.layout.xaxis.title.text == "engine step" and "(count" in fig.layout.yaxis.title.text
    assert group_figures.group_names(stats.kv_cache_groups) == [t.name for t in fig.data]
    # The paged allocator of the allocator comparison keeps the same groups: its timeline draws alike.
    from workbench.baselines import replay_allocator
    timeline = replay_allocator([(60, 30)] * 6, "paged", 2048, 128, 16, group_windows=stats.kv_cache_groups)
    fig = group_figures.group_blocks_over_time(timeline, stats.kv_cache_groups)
    assert len(fig.data) == 3 and list(fig.data[1].x) == timeline["step"].tolist()


def test_group_blocks_over_time_says_why_for_a_model_with_one_group(synthetic):
    from workbench import group_figures, metrics

    ts = next(iter(synthetic[2].values()))
    assert metrics.group_blocks_columns(ts) == []
    assert figures.is_empty(group_figures.group_blocks_over_time(ts)) == group_figures.ONE_GROUP
    assert "no per-step data" in figures.is_empty(group_figures.group_blocks_over_time(None))
    assert metrics.kv_cache_groups_text(()) is None


def _quant_sweep():
    """A quantization x max_num_seqs sweep with hand-set throughputs and TPOTs: int4 pays at small batches."""
    import pandas as pd
    tput = {(None, 1): 100.0, (None, 16): 1000.0, (None, 64): 3000.0, ("int4", 1): 190.0, ("int4", 16): 1400.0,
            ("int4", 64): 2400.0, ("int8", 1): 150.0, ("int8", 16): 1300.0, ("int8", 64): 3300.0,
            ("int4", 256): 5000.0}  # no baseline at 256 (below: its bf16 point failed)
    rows = [{"point_id": f"p{i}", "label": f"quant={q} seqs={s}", "workload": "w", "status": "ok",
             "quantization": q, "max_num_seqs": s, "block_size": 16, "output_throughput": t,
             "tpot_p50_ms": 1000.0 / t} for i, ((q, s), t) in enumerate(tput.items())]
    rows.append({"point_id": "pf", "label": "quant=None seqs=256", "workload": "w", "status": "error",
                 "quantization": None, "max_num_seqs": 256, "block_size": 16, "output_throughput": 9e9,
                 "tpot_p50_ms": 1e-9})
    return pd.DataFrame(rows)


def test_speedup_curve_per_mode_over_no_quantization_by_batch_limit():
    from workbench import metrics
    df = _quant_sweep()
    fig = figures.speedup_curve(df)
    assert not figures.is_empty(fig)
    lines = {t.name: dict(zip(t.x, t.y)) for t in fig.data}
    assert set(lines) == {"quant=int4", "quant=int8"}
    assert lines["quant=int4"] == pytest.approx({1: 1.9, 16: 1.4, 64: 0.8})  # 256 has no ok bf16 point
    assert lines["quant=int8"] == pytest.approx({1: 1.5, 16: 1.3, 64: 1.1})
    assert fig.layout.xaxis.type == "log" and "max running requests" in fig.layout.xaxis.title.text
    # A latency is inverted: TPOT 1000 / t ms gives the same ratios.
    sp = metrics.speedup_over(df, "quantization", None, "tpot_p50_ms")
    assert dict(zip(zip(sp.quantization, sp.max_num_seqs), sp.speedup))[("int4", 16)] == pytest.approx(1.4)
    # A stored file has None as NaN: the same partners.
    assert metrics.speedup_over(df.astype({"quantization": object}).fillna(float("nan")), "quantization")[
        "speedup"].tolist() == pytest.approx(sp.speedup.tolist())


def test_speedup_curve_compares_only_points_of_the_same_other_settings():
    import pandas as pd
    df = _quant_sweep()
    other = df.assign(block_size=32, output_throughput=df.output_throughput * 2)
    other.loc[(other.quantization == "int4") & (other.max_num_seqs == 1), "output_throughput"] = 100.0
    both = pd.concat([df, other.assign(point_id=other.point_id + "b")], ignore_index=True)
    lines = {t.name: dict(zip(t.x, t.y)) for t in figures.speedup_curve(both).data}
    assert lines["quant=int4 bs=16"][1] == pytest.approx(1.9) and lines["quant=int4 bs=32"][1] == pytest.approx(0.5)
    assert lines["quant=int8 bs=32"] == pytest.approx({1: 1.5, 16: 1.3, 64: 1.1})


def test_speedup_curve_says_why_it_is_empty(synthetic):
    assert "do not vary the weight quantization" in figures.is_empty(figures.speedup_curve(synthetic[0]))
    df = _quant_sweep()
    quantized = figures.speedup_curve(df[df.quantization.notna()])
    assert "no point has a no quantization point" in figures.is_empty(quantized)


def test_speedup_curve_by_concurrency_and_none_counts_as_a_grid_value():
    df = _quant_sweep().rename(columns={"max_num_seqs": "concurrency"})
    fig = figures.speedup_curve(df)
    assert "concurrency" in fig.layout.xaxis.title.text
    assert "quantization" in figures.varying_settings(df)  # None and NaN (pandas 3 keeps NaN through astype(str))
    assert "quantization" in figures.varying_settings(df.astype({"quantization": "str"}))


def test_speedup_curves_for_each_varied_setting_with_a_baseline():
    import pandas as pd
    df = _quant_sweep()
    kv = df[df.quantization.isna() & (df.status == "ok")].assign(kv_cache_dtype="auto")  # max_num_seqs 1, 16, 64
    fp8 = kv.assign(kv_cache_dtype="fp8", output_throughput=kv.output_throughput * [1.0, 1.25, 2.0],
                    point_id=kv.point_id + "kv")
    curves = figures.speedup_curves(pd.concat([kv, fp8], ignore_index=True))
    assert set(curves) == {"kv_cache_dtype"}
    fig = curves["kv_cache_dtype"]
    assert "over a model-dtype KV cache" in fig.layout.title.text
    assert {t.name: list(t.y) for t in fig.data} == {"kv=fp8": pytest.approx([1.0, 1.25, 2.0])}
    assert set(figures.speedup_curves(df)) == {"quantization"}


def test_speedup_over_names_an_unknown_column():
    from workbench import metrics
    df = _quant_sweep()
    with pytest.raises(KeyError, match="'quantisation' is not a results column"):
        metrics.speedup_over(df, "quantisation")
    with pytest.raises(KeyError, match="'ttft_p50_ms' is not in these results"):
        metrics.speedup_over(df, "quantization", None, "ttft_p50_ms")
