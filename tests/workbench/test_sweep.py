"""The grid runner on the CPU with the tiny preset: columns, failures, resume, replay of arrivals."""
import json
import math
import os

import pandas as pd
import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine
from workbench import Sweep, make_workload, metrics, replay
from workbench.trace_replay import warm_up

SHARED = dict(num_prefixes=2, prefix_len=64, suffix_len=16, output_len=8)
BASE = EngineConfig(max_model_len=256, num_gpu_blocks=256, device="cpu")
TINY = dict(prompt_len=16, output_len=4)  # for tests that only count points

REQUIRED_COLUMNS = (
    ["point_id", "label", "model", "workload", "workload_id", "status", "error", "point_duration_s", "duration_s"]
    + list(EngineConfig().to_dict())
    + ["request_throughput", "output_throughput", "total_token_throughput", "request_goodput", "slo_attainment"]
    + [f"{m}_{s}_ms" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p90", "p99")]
    + ["kv_usage_mean", "kv_usage_peak", "internal_fragmentation_mean", "prefix_cache_hit_rate",
       "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "batch_size_mean", "batch_size_max",
       "batched_tokens_mean", "gpu_util_mean", "gpu_util_peak", "power_w_mean", "power_w_peak",
       "mem_used_peak_bytes", "energy_j", "energy_per_output_token_j", "weight_bytes", "kv_bytes_per_token",
       "kv_blocks", "attention_backend_used", "cuda_graphs", "on_pareto_front", "n", "beam_width",
       "num_used_blocks_peak", "num_unshared_blocks_peak", "num_saved_blocks_peak", "num_shared_blocks_peak",
       "num_cow_copies", "sharing_saving"])


@pytest.fixture(scope="module")
def sweep_2x2x2(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "results.parquet")
    sweep = Sweep(model="tiny", workload="shared-prefix", num_requests=12, workload_args=SHARED,
                  grid={"block_size": [8, 32], "enable_prefix_caching": [True, False],
                        "max_num_batched_tokens": [128, 512]},
                  base_config=BASE, slo={"ttft": 5.0, "tpot": 1.0}, out=out, progress=False)
    sweep.run()
    return sweep


def test_sweep_table_has_every_column_with_plausible_values(sweep_2x2x2):
    df = sweep_2x2x2.results
    assert len(df) == 8 and (df["status"] == "ok").all(), df[["label", "error"]]
    missing = [c for c in REQUIRED_COLUMNS if c not in df]
    assert not missing
    assert df["point_id"].is_unique
    assert (df["num_finished"] == 12).all() and (df["total_output_tokens"] == 12 * 8).all()
    for col in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s", "tpot_p50_ms",
                "weight_bytes", "kv_bytes_per_token"):
        assert (df[col] > 0).all(), col
    assert (df["total_token_throughput"] > df["output_throughput"]).all()
    for m in ("ttft", "tpot", "itl", "e2e"):
        p50, p90, p99 = (df[f"{m}_{p}_ms"] for p in ("p50", "p90", "p99"))
        assert (p50 <= p90 + 1e-9).all() and (p90 <= p99 + 1e-9).all()
    assert (df["e2e_p50_ms"] >= df["ttft_p50_ms"]).all()
    assert df["slo_attainment"].between(0, 1).all() and (df["request_goodput"] <= df["request_throughput"] + 1e-9).all()
    assert ((df["kv_usage_mean"] > 0) & (df["kv_usage_mean"] <= df["kv_usage_peak"]) & (df["kv_usage_peak"] <= 1)).all()
    assert ((df["batch_size_mean"] > 0) & (df["batch_size_max"] <= 12)).all()
    assert (df["kv_blocks"] == 256).all() and (df["attention_backend_used"] == "torch").all()
    assert (df["device_name"] == "cpu").all() and (df["energy_source"] == "none").all()
    assert df["gpu_util_mean"].isna().all() and df["energy_per_output_token_j"].isna().all()
    assert df["on_pareto_front"].any()


def test_prefix_cache_hit_rate_and_fragmentation(sweep_2x2x2):
    df = sweep_2x2x2.results
    off, on = df[~df["enable_prefix_caching"]], df[df["enable_prefix_caching"]]
    assert (off["prefix_cache_hit_rate"] == 0).all()
    assert (on["prefix_cache_hit_rate"] > 0.3).all()  # 2 shared 64-token prefixes of 80-token prompts
    for _, g in df.groupby(["enable_prefix_caching", "max_num_batched_tokens"]):
        frag = g.set_index("block_size")["internal_fragmentation_mean"]
        assert frag[32] > frag[8]


def test_prefix_caching_shows_as_shared_blocks_and_nothing_is_copied(sweep_2x2x2):
    df = sweep_2x2x2.results
    off, on = df[~df["enable_prefix_caching"]], df[df["enable_prefix_caching"]]
    assert (off["num_saved_blocks_peak"] == 0).all() and (off["sharing_saving"] == 0).all()
    assert (on["num_saved_blocks_peak"] > 0).all() and (on["num_shared_blocks_peak"] > 0).all()
    assert (on["num_used_blocks_peak"] < on["num_unshared_blocks_peak"]).all()
    assert (df["num_cow_copies"] == 0).all() and (df["n"] == 1).all() and df["beam_width"].isna().all()


def test_time_series_and_requests_are_kept_per_point(sweep_2x2x2):
    for pid in sweep_2x2x2.results["point_id"]:
        ts = sweep_2x2x2.timeseries[pid]
        assert {"t", "kv_usage", "num_running", "num_waiting", "num_batched_tokens"} <= set(ts)
        assert ts["t"].is_monotonic_increasing and (ts["t"] >= 0).all()
        req = sweep_2x2x2.requests[pid]
        assert len(req) == 12 and req["ttft"].notna().all()
    side = sweep_2x2x2.sidecar_dir
    assert len([f for f in os.listdir(side) if f.endswith(".steps.parquet")]) == 8
    runs = pd.read_parquet(sweep_2x2x2.out)  # one row per run: 8 points x 3 repeats (the default)
    assert len(runs) == 24 and sorted(runs.groupby("point_id")["repeat"].apply(sorted).tolist()) == [[0, 1, 2]] * 8
    df = sweep_2x2x2.results
    assert (df["repeats"] == 3).all()
    assert ((df["output_throughput_min"] <= df["output_throughput"])
            & (df["output_throughput"] <= df["output_throughput_max"])).all()
    for pid, g in runs.groupby("point_id"):
        assert df.set_index("point_id").loc[pid, "output_throughput"] == pytest.approx(g["output_throughput"].median())
    # Rounds are interleaved: every point's repeat 0 ran before any repeat 1, and the middle round ran in
    # reverse order, so every setting ran early and late alike.
    t = runs.sort_values("timestamp")
    assert t["repeat"].is_monotonic_increasing
    order = [list(g["point_id"]) for _, g in t.groupby("repeat", sort=True)]
    assert order[1] == order[0][::-1] and order[2] == order[0]


def test_report_of_a_real_sweep(sweep_2x2x2, tmp_path):
    path = sweep_2x2x2.write_report(str(tmp_path / "report.html"), title="tiny 2x2x2")
    text = open(path, encoding="utf-8").read()
    assert 'id="fig-kv-usage-over-time"' in text and 'id="fig-ttft-cdf"' in text
    assert "shared-prefix" in text and "torch" in text


def test_points_sharing_a_quantization_are_adjacent():
    sweep = Sweep(model="tiny", workload="fixed", num_requests=2, workload_args=TINY, base_config=BASE,
                  grid={"block_size": [8, 16], "quantization": [None, "int8"]}, progress=False)
    assert [p.config.quantization for p in sweep.points] == [None, None, "int8", "int8"]
    assert [p.config.block_size for p in sweep.points] == [8, 16, 8, 16]


def test_bad_grid_is_refused_before_running():
    with pytest.raises(ValueError, match="not an EngineConfig field"):
        Sweep(model="tiny", workload="fixed", grid={"blocksize": [8]}, base_config=BASE)
    with pytest.raises(ValueError, match="block_size"):
        Sweep(model="tiny", workload="fixed", grid={"block_size": [7]}, base_config=BASE)
    with pytest.raises(ValueError, match="vocabulary"):
        Sweep(model="tiny", workload=make_workload("fixed", vocab_size=32000), base_config=BASE)


def test_failing_points_are_recorded_and_the_others_complete(monkeypatch):
    loads = []
    real_random = LLM.random.__func__
    monkeypatch.setattr(LLM, "random", classmethod(lambda cls, *a, **k: loads.append(1) or real_random(cls, *a, **k)))
    # num_gpu_blocks=2 cannot hold one 256-token request: fails at load (first point) and at reconfigure.
    sweep = Sweep(model="tiny", workload="fixed", num_requests=4, workload_args=TINY, base_config=BASE,
                  grid={"num_gpu_blocks": [2, 64, 3, 32]}, progress=False, repeats=1)
    df = sweep.run()
    assert df["status"].tolist() == ["error", "ok", "error", "ok"]
    assert df["error"][0].startswith("ValueError") and "max_model_len" in df["error"][0]
    assert math.isnan(df["output_throughput"][0]) and df["output_throughput"][1] > 0
    assert len(loads) == 2  # the failed first load, then weights loaded once for every later point


def test_errors_and_oom_mid_run_leave_the_engine_usable(monkeypatch):
    real_step = LLMEngine.step

    def step(self):
        if self.num_steps_for_test > 2:
            if self.config.block_size == 16:
                raise RuntimeError("boom")
            if self.config.block_size == 32:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.num_steps_for_test += 1
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "num_steps_for_test", 0, raising=False)
    monkeypatch.setattr(LLMEngine, "step", step)
    llm = LLM.random("tiny", BASE)
    sweep = Sweep(model=llm, model_name="tiny-instance", workload="fixed", num_requests=4, workload_args=TINY,
                  base_config=BASE, grid={"block_size": [16, 32, 8]}, warmup=False, progress=False, repeats=1)
    df = sweep.run()
    assert df["status"].tolist() == ["error", "oom", "ok"]
    assert df["error"][0] == "RuntimeError: boom" and "out of memory" in df["error"][1]
    assert df["model"][0] == "tiny-instance" and not llm.engine.has_unfinished_requests()


def test_workload_longer_than_max_model_len_fails_its_point():
    sweep = Sweep(model="tiny", workload="fixed", num_requests=2, workload_args=dict(prompt_len=100, output_len=8),
                  base_config=BASE, grid={"max_model_len": [64, 128]}, progress=False, warmup=False, repeats=1)
    df = sweep.run()
    assert df["status"].tolist() == ["error", "ok"] and "over max_model_len=64" in df["error"][0]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_interrupted_sweep_resumes_without_redoing_points(tmp_path, ext):
    out = str(tmp_path / f"results.{ext}")
    kwargs = dict(model="tiny", workload="fixed", num_requests=4, workload_args=TINY, base_config=BASE,
                  grid={"block_size": [8, 16], "enable_prefix_caching": [True, False]}, out=out, progress=False,
                  repeats=1)
    done = []

    def interrupt_after_two(row):
        done.append(row["point_id"])
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Sweep(**kwargs, on_point=interrupt_after_two).run()
    from workbench.store import ResultsStore

    with ResultsStore(out) as store:
        first = {pid: rec for (pid, _), rec in store.records.items()}
    assert list(first) == done

    ran = []
    sweep = Sweep(**kwargs, on_point=lambda row: ran.append(row["point_id"]))
    df = sweep.run()
    assert len(ran) == 2 and not set(ran) & set(done)
    assert len(df) == 4 and (df["status"] == "ok").all()
    assert df.set_index("point_id").loc[done, "timestamp"].tolist() == [first[p]["timestamp"] for p in done]
    assert set(sweep.timeseries) == set(df["point_id"])  # resumed points' series come back from disk
    assert all(isinstance(x, list) for x in sweep.requests[done[0]]["itl"])

    # A wider grid on the same file runs only the new points; a third run runs nothing.
    ran.clear()
    Sweep(**{**kwargs, "grid": {"block_size": [8, 16, 32], "enable_prefix_caching": [True, False]}},
          on_point=lambda row: ran.append(row)).run()
    assert len(ran) == 2 and {r["block_size"] for r in ran} == {32}
    ran.clear()
    Sweep(**kwargs, on_point=lambda row: ran.append(row)).run()
    assert ran == []
    if ext == "jsonl":
        with open(out) as f:
            assert len([json.loads(line) for line in f]) == 6


def test_replay_closed_loop_keeps_concurrency_in_flight():
    llm = LLM.random("tiny", BASE)
    w = make_workload("fixed", num_requests=6, prompt_len=8, output_len=6, vocab_size=512,
                      arrival="concurrency", concurrency=2)
    run = replay(llm.engine, w)
    steps = metrics.steps_frame(llm.engine.stats())
    assert len(run.outputs) == 6 and (steps["num_running"] + steps["num_waiting"]).max() <= 2
    assert (steps["num_running"] == 2).any()


def test_replay_honours_poisson_arrivals_and_turn_dependencies():
    llm = LLM.random("tiny", BASE)
    w = make_workload("fixed", num_requests=5, prompt_len=8, output_len=2, vocab_size=512,
                      arrival="poisson", request_rate=40.0, seed=3)
    run = replay(llm.engine, w)
    by_id = {o.request_id: o for o in run.outputs}
    for r in w:
        m = by_id[r.request_id].metrics
        assert m.arrival_time == pytest.approx(run.start + r.arrival_time)
        assert m.first_scheduled_time >= m.arrival_time
    w = make_workload("multi-turn", num_requests=6, num_turns=3, first_prompt_len=32, turn_len=8, output_len=4,
                      think_time=0.01, vocab_size=512)
    llm.engine.reset_stats()
    run = replay(llm.engine, w)
    by_id = {o.request_id: o for o in run.outputs}
    for r in w:
        if r.depends_on:
            assert by_id[r.request_id].metrics.arrival_time >= by_id[r.depends_on].metrics.finished_time + 0.01
    assert llm.engine.stats().prefix_cache_hits > 0  # each turn reuses the previous turn's prompt


def test_warm_up_runs_prefills_behind_one_and_two_decodes_and_leaves_clean_counters(monkeypatch):
    llm = LLM.random("tiny", BASE)
    seen, reset = [], llm.engine.reset_stats
    monkeypatch.setattr(llm.engine, "reset_stats", lambda: (seen.append(llm.engine.stats()), reset()))
    warm_up(llm.engine, BASE)
    mixed = {s.num_decode_tokens for s in seen[0].steps if s.num_prefill_tokens}
    assert mixed == {0, 1, 2}
    st = llm.engine.stats()
    assert st.num_steps == 0 and st.prefix_cache_queries == 0 and not llm.engine.has_unfinished_requests()


def test_measure_overhead_runs_with_a_sampler(install_fake_nvml):
    install_fake_nvml()
    from workbench.telemetry import measure_overhead

    llm = LLM.random("tiny", BASE)
    w = make_workload("fixed", num_requests=4, prompt_len=8, output_len=4, vocab_size=512)
    r = measure_overhead(llm, w, interval=0.01, repeats=2)
    assert len(r["runs"]["on"]) == 2 and r["throughput_off"] > 0 and math.isfinite(r["overhead_pct"])
    assert r["range_on"] == [min(r["runs"]["on"]), max(r["runs"]["on"])] and isinstance(r["within_noise"], bool)


def test_gpu_telemetry_flows_into_rows_and_time_series(install_fake_nvml, tmp_path):
    install_fake_nvml()
    sweep = Sweep(model="tiny", workload="fixed", num_requests=4, workload_args=dict(prompt_len=16, output_len=16),
                  base_config=BASE.replace(device=None), grid={"block_size": [16]}, telemetry_interval=0.01,
                  progress=False, out=str(tmp_path / "r.parquet"), repeats=1)
    df = sweep.run()
    row = df.iloc[0]
    assert row["status"] == "ok" and row["gpu_util_mean"] == 87 and row["power_w_peak"] == 250
    assert row["energy_source"] == "counter" and row["energy_j"] > 0
    assert row["energy_per_output_token_j"] == pytest.approx(row["energy_j"] / 64)
    ts = sweep.timeseries[row["point_id"]]
    assert ts["gpu_util_pct"].notna().any() and "power_w" in ts
    assert sweep.environment["gpu"] == "NVIDIA H100 80GB HBM3"
    assert os.path.exists(os.path.join(sweep.sidecar_dir, f"{row['point_id']}.telemetry.parquet"))
    sweep.close()
