"""Every figure (plotly and its matplotlib twin) draws synthetic results and reads columns only."""
import matplotlib.figure
import plotly.graph_objects as go
import pytest

from workbench import figures

RESULT_FIGURES = ["throughput_by_setting", "prefix_hit_rate", "energy_per_token", "latency_percentiles",
                  "fragmentation_by_block_size", "throughput_latency"]


def every_public_figure():
    return sorted(n for n in dir(figures) if not n.startswith("_") and callable(getattr(figures, n))
                  and hasattr(figures, n + "_mpl"))


def test_every_figure_has_a_matplotlib_twin():
    names = every_public_figure()
    assert set(RESULT_FIGURES + ["latency_cdf", "kv_usage_over_time", "gpu_over_time"]) <= set(names)


@pytest.mark.parametrize("name", RESULT_FIGURES)
def test_result_figures_draw_ok_points_only(name, synthetic):
    df = synthetic[0]
    before = df.copy()
    fig = getattr(figures, name)(df)
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1
    xs = {str(x) for trace in fig.data for x in (trace.x if trace.x is not None else [])}
    assert "block_size=64, enable_prefix_caching=True" not in xs  # the failed point
    mpl = getattr(figures, name + "_mpl")(df)
    assert isinstance(mpl, matplotlib.figure.Figure) and mpl.axes
    assert df.equals(before)  # figures never write into the results


def test_latency_percentiles_show_p50_p90_p99(synthetic):
    df = synthetic[0]
    fig = figures.latency_percentiles(df, "tpot")
    assert [t.name for t in fig.data] == ["p50", "p90", "p99"]
    ok = df[df.status == "ok"]
    assert list(fig.data[2].y) == ok["tpot_p99_ms"].tolist()


def test_pareto_front_is_marked(synthetic):
    df = synthetic[0]
    fig = figures.throughput_latency(df)
    front = [t for t in fig.data if t.name == "Pareto front"][0]
    assert 1 <= len(front.x) <= 4 and list(front.x) == sorted(front.x)


def test_fragmentation_per_block_size(synthetic):
    fig = figures.fragmentation_by_block_size(synthetic[0], color="enable_prefix_caching")
    assert len(fig.data) == 2 and all(list(t.x) == [8, 32] for t in fig.data)


def test_cdf_and_time_series(synthetic):
    df, requests, timeseries, telemetry = synthetic
    fig = figures.latency_cdf(df, requests, "ttft")
    assert len(fig.data) == 4 and max(fig.data[0].y) == 1.0
    assert isinstance(figures.latency_cdf_mpl(df, requests, "itl"), matplotlib.figure.Figure)
    fig = figures.kv_usage_over_time(timeseries["p0"])
    assert [t.name for t in fig.data] == ["KV usage", "batch size (running)"]
    fig = figures.gpu_over_time(telemetry["p0"])
    assert [t.name for t in fig.data] == ["GPU utilisation (%)", "power (W)"]
    assert figures.kv_usage_over_time_mpl(timeseries["p0"]).axes
    assert figures.gpu_over_time_mpl(telemetry["p0"]).axes


def test_empty_inputs_give_an_explaining_figure(synthetic):
    df = synthetic[0]
    failed_only = df[df.status != "ok"]
    for name in RESULT_FIGURES:
        fig = getattr(figures, name)(failed_only)
        assert len(fig.data) == 0 and fig.layout.annotations
        assert getattr(figures, name + "_mpl")(failed_only).axes
    fig = figures.gpu_over_time(None)
    assert "no GPU telemetry" in fig.layout.annotations[0].text
    fig = figures.energy_per_token(df.assign(energy_per_output_token_j=float("nan")))
    assert "NVML" in fig.layout.annotations[0].text
