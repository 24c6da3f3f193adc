"""Derived metrics against values computed by hand."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from workbench import metrics


def output(rid, arrival, sched, first, finished, token_times, prompt=10, cached=0):
    n = len(token_times)
    itl = [b - a for a, b in zip(token_times, token_times[1:])]
    m = SimpleNamespace(arrival_time=arrival, first_scheduled_time=sched, first_token_time=first,
                        finished_time=finished, ttft=first - arrival,
                        tpot=(finished - first) / (n - 1) if n > 1 else None, e2e=finished - arrival, itl=itl,
                        num_prompt_tokens=prompt, num_output_tokens=n, num_cached_tokens=cached)
    return SimpleNamespace(request_id=rid, prompt_token_ids=[0] * prompt, token_ids=[1] * n, metrics=m,
                           finish_reason="length", finished=True)


@pytest.fixture
def two_requests():
    # r0: arrives 0, first token 1, tokens at 1, 2, 4 -> ttft 1, tpot (4-1)/2 = 1.5, itl [1, 2], e2e 4
    # r1: arrives 1, first token 2, tokens at 2, 3   -> ttft 1, tpot 1, itl [1], e2e 2
    return metrics.request_frame([output("r0", 0.0, 0.5, 1.0, 4.0, [1.0, 2.0, 4.0], prompt=10, cached=4),
                                  output("r1", 1.0, 1.0, 2.0, 3.0, [2.0, 3.0], prompt=6)])


def test_request_frame(two_requests):
    df = two_requests
    assert list(df.columns) == metrics.REQUEST_COLUMNS
    assert df["queue_time"].tolist() == [0.5, 0.0]
    assert df["tpot"].tolist() == [1.5, 1.0]
    assert df["itl"].tolist() == [[1.0, 2.0], [1.0]]
    assert df["num_cached_tokens"].tolist() == [4, 0]


def test_percentiles_match_numpy_linear_interpolation():
    p = metrics.percentiles([1, 2, 3, 4, float("nan")])
    assert p == {"mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97)}
    assert all(math.isnan(v) for v in metrics.percentiles([]).values())


def test_latency_summary_in_ms(two_requests):
    s = metrics.latency_summary(two_requests)
    assert s["ttft_mean_ms"] == 1000 and s["ttft_p99_ms"] == 1000
    assert s["tpot_mean_ms"] == 1250 and s["tpot_p50_ms"] == 1250
    assert s["itl_mean_ms"] == pytest.approx(4000 / 3)  # pooled gaps [1, 2, 1]
    assert s["itl_p50_ms"] == 1000
    assert s["e2e_mean_ms"] == 3000 and s["e2e_p90_ms"] == pytest.approx(3800)


def test_throughput(two_requests):
    t = metrics.throughput(two_requests, duration=4.0)
    assert t["request_throughput"] == 0.5
    assert t["output_throughput"] == 5 / 4
    assert t["total_token_throughput"] == (16 + 5) / 4


def test_goodput_counts_requests_meeting_every_slo(two_requests):
    assert metrics.goodput(two_requests, 4.0, {"ttft": 1.0, "tpot": 1.2}) == {"request_goodput": 0.25,
                                                                             "slo_attainment": 0.5}
    assert metrics.goodput(two_requests, 4.0, {"ttft": 1.0})["slo_attainment"] == 1.0
    assert metrics.goodput(two_requests, 4.0, {"e2e": 2.5})["request_goodput"] == 0.25
    assert math.isnan(metrics.goodput(two_requests, 4.0, None)["request_goodput"])
    with pytest.raises(ValueError, match="ttft_ms"):
        metrics.goodput(two_requests, 4.0, {"ttft_ms": 100})


def test_one_token_request_meets_a_tpot_slo():
    df = metrics.request_frame([output("r", 0.0, 0.0, 0.1, 0.1, [0.1])])
    assert math.isnan(df["tpot"][0])
    assert metrics.slo_met(df, {"tpot": 0.001}).tolist() == [True]


def test_step_summary():
    steps = pd.DataFrame({"kv_usage": [0.0, 0.5, 1.0], "num_running": [1, 3, 5], "num_batched_tokens": [10, 20, 60],
                          "internal_fragmentation": [0.0, 0.2, 0.4], "num_used_blocks": [0, 4, 8]})
    s = metrics.step_summary(steps)
    assert s["kv_usage_mean"] == 0.5 and s["kv_usage_peak"] == 1.0
    assert s["internal_fragmentation_mean"] == pytest.approx(0.3)  # steps holding no block are left out
    assert (s["batch_size_mean"], s["batch_size_p50"], s["batch_size_max"]) == (3, 3, 5)
    assert (s["batched_tokens_mean"], s["batched_tokens_max"]) == (30, 60)
    assert math.isnan(metrics.step_summary(pd.DataFrame())["kv_usage_mean"])


def test_engine_summary_hit_rate():
    s = metrics.engine_summary({"prefix_cache_queries": 200, "prefix_cache_hits": 50, "num_gpu_blocks": 10,
                                "block_size": 16})
    assert s["prefix_cache_hit_rate"] == 0.25 and s["kv_capacity_tokens"] == 160
    assert metrics.engine_summary({"prefix_cache_queries": 0, "prefix_cache_hits": 0})["prefix_cache_hit_rate"] == 0


def test_telemetry_summary_energy_from_counter_or_power():
    samples = pd.DataFrame({"time": [0.0, 1.0, 2.0], "gpu_util_pct": [50, 100, 60], "power_w": [100, 300, 200],
                            "mem_used_bytes": [1, 5, 2], "sm_clock_mhz": [1000, 2000, 1500],
                            "temperature_c": [50, 70, 60], "energy_j": [1000.0, 1200.0, 1450.0]})
    s = metrics.telemetry_summary(samples)
    assert (s["energy_j"], s["energy_source"]) == (450.0, "counter")
    assert s["gpu_util_mean"] == 70 and s["gpu_util_peak"] == 100 and s["power_w_peak"] == 300
    assert s["mem_used_peak_bytes"] == 5 and s["temperature_c_peak"] == 70
    s = metrics.telemetry_summary(samples.assign(energy_j=float("nan")))
    assert (s["energy_j"], s["energy_source"]) == (200 + 250, "power")  # trapezoid: (100+300)/2 + (300+200)/2
    assert metrics.telemetry_summary(None)["energy_source"] == "none"


def test_point_metrics_energy_per_token(two_requests):
    tel = {**metrics.telemetry_summary(None), "energy_j": 10.0}
    row = metrics.point_metrics(two_requests, pd.DataFrame(), {}, tel, 4.0, None)
    assert row["energy_per_output_token_j"] == 2.0
    assert row["duration_s"] == 4.0


def test_pareto_front():
    df = pd.DataFrame({"lat": [1, 2, 3, 2, float("nan")], "tput": [10, 20, 15, 5, 100]})
    assert metrics.pareto_front(df, "lat", "tput").tolist() == [True, True, False, False, False]


def test_latency_cdf(two_requests):
    cdf = metrics.latency_cdf({"p": two_requests}, "itl", {"p": "label"})
    assert cdf["value_ms"].tolist() == [1000, 1000, 2000]
    assert cdf["cdf"].tolist() == pytest.approx([1 / 3, 2 / 3, 1])
    assert set(cdf["label"]) == {"label"}


def test_best_settings(synthetic):
    df = synthetic[0]
    best = metrics.best_settings(df).set_index("objective")
    ok = df[df.status == "ok"]
    assert best.loc["throughput", "point_id"] == ok.loc[ok.output_throughput.idxmax(), "point_id"]
    assert best.loc["TTFT p99", "value"] == ok.ttft_p99_ms.min()
    assert "p4" not in set(best["point_id"])  # the failed point is never best


def _repeat_rows(values: dict) -> pd.DataFrame:
    """Per-repeat rows: {label: [output_throughput of each repeat]}."""
    return pd.DataFrame([{"point_id": label, "label": label, "repeat": r, "status": "ok", "output_throughput": v,
                          "ttft_p99_ms": 100.0, "block_size": 8}
                         for label, vs in values.items() for r, v in enumerate(vs)])


def test_repeats_are_summarised_as_median_with_min_and_max():
    runs = _repeat_rows({"a": [100.0, 160.0, 110.0], "b": [50.0, 55.0, 52.0]})
    runs.loc[len(runs)] = {"point_id": "c", "label": "c", "repeat": 0, "status": "error", "output_throughput": None,
                           "ttft_p99_ms": None, "block_size": 8}
    # d: a failed repeat's partial figure (999) counts toward no median; the point's status is the failure's
    runs.loc[len(runs)] = {"point_id": "d", "label": "d", "repeat": 1, "status": "error", "output_throughput": 999.0,
                           "ttft_p99_ms": 5.0, "block_size": 8}
    for r, v in ((0, 100.0), (2, 120.0)):
        runs.loc[len(runs)] = {"point_id": "d", "label": "d", "repeat": r, "status": "ok", "output_throughput": v,
                               "ttft_p99_ms": 5.0, "block_size": 8}
    s = metrics.summarise(runs).set_index("label")
    assert list(s.index) == ["a", "b", "c", "d"]  # first-seen order
    assert s.loc["d", "output_throughput"] == 110.0 and s.loc["d", "output_throughput_max"] == 120.0
    assert s.loc["d", "status"] == "error" and s.loc["d", "repeats"] == 3
    assert s.loc["a", "output_throughput"] == 110.0  # the median, not the mean (123.3) nor the last
    assert (s.loc["a", "output_throughput_min"], s.loc["a", "output_throughput_max"]) == (100.0, 160.0)
    assert s.loc["b", "repeats"] == 3 and s.loc["c", "status"] == "error" and s.loc["a", "block_size"] == 8
    assert "repeat" not in s


def test_best_settings_reports_ties_when_ranges_overlap_and_margins():
    s = metrics.summarise(_repeat_rows({"a": [100.0, 120.0, 110.0], "b": [105.0, 115.0, 108.0], "c": [50.0, 52.0, 51.0]}))
    best = metrics.best_settings(s).set_index("objective")
    row = best.loc["throughput"]
    assert row["label"] == "a" and row["ties"] == ["b"]  # b's 105-115 overlaps a's 100-120
    assert row["runner_up"] == "b" and row["margin"] == pytest.approx(110 / 108 - 1)
    assert (row["low"], row["high"]) == (100.0, 120.0)
    s = metrics.summarise(_repeat_rows({"a": [100.0, 120.0, 110.0], "c": [50.0, 52.0, 51.0]}))
    assert metrics.best_settings(s).set_index("objective").loc["throughput", "ties"] == []


def test_engine_stats_prints_a_short_summary_not_every_step():
    from engine import LLM, EngineConfig, SamplingParams

    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, num_gpu_blocks=32))
    llm.generate([[1, 2, 3, 4, 5]] * 3, SamplingParams(max_tokens=30, ignore_eos=True))
    st = llm.engine.stats()
    text = repr(st)
    assert len(st.steps) >= 30 and len(text) < 400 and "StepStats(" not in text
    assert f"{st.num_steps} steps" in text and f"{st.num_generation_tokens} generated" in text
    assert str(st) == text
