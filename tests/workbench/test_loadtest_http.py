"""Endpoint load tests against the engine's own server (in a thread, or started per point by ServerSweep).

References: the workload's own lengths (exact output tokens with ignore_eos), the server's EngineStats
read after the run, and the number of chunks one request can produce.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx_sse")

from workbench.loadtest_http import run_loadtest  # noqa: E402
from workbench.metrics_scrape import parse_metrics  # noqa: E402
from workbench.workloads import RequestSpec, make_workload  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "data" / "models" / "pystdlib-llama-6m"


@pytest.fixture(scope="module")
def live():
    from engine import LLM, EngineConfig
    from engine.serve.background import BackgroundServer

    cfg = EngineConfig(device="cpu", max_model_len=512, max_num_batched_tokens=512, block_size=16)
    with BackgroundServer(LLM.from_pretrained(MODEL_DIR, cfg), "pystdlib") as srv:
        yield srv


def test_poisson_run_counts_every_request_and_token(live):
    w = make_workload("sharegpt-like", num_requests=12, mean_prompt_len=40, mean_output_len=12, max_len=48,
                      vocab_size=4096, seed=1).with_arrival("poisson", request_rate=20.0, seed=1)
    too_long = RequestSpec("too-long", [9] * 600, 4, arrival_time=0.05)
    w = replace(w, requests=w.requests + (too_long,))
    before = live.engine_call(lambda e: e.stats())
    res = run_loadtest(live.url, "pystdlib", w, scrape_interval=0.1, warmup=False)
    after = live.engine_call(lambda e: e.stats())
    row, req = res.row, res.requests
    assert row["status"] == "ok" and row["num_finished"] == 12 and row["num_failed"] == 1
    assert res.failures[0]["request_id"] == "too-long" and "HTTP 400" in res.failures[0]["error"]
    want = {r.request_id: r.max_tokens for r in w if r.request_id != "too-long"}
    assert dict(zip(req["request_id"], req["num_output_tokens"])) == want
    assert row["total_output_tokens"] == sum(want.values())
    # Our server sends a chunk per token unless it fell behind (then it merges): at most output - 1 gaps,
    # and far more than one per request here.
    assert all(1 <= len(itl) <= n - 1 for itl, n in zip(req["itl"], req["num_output_tokens"]) if n > 1)
    assert sum(map(len, req["itl"])) >= 0.5 * (req["num_output_tokens"] - 1).sum()
    assert (req["ttft"] > 0).all() and (req["ttft"] <= req["e2e"]).all()
    # The scraped counters' increase over the run is the engine's.
    assert row["generation_tokens_scraped"] == after.num_generation_tokens - before.num_generation_tokens \
        == row["total_output_tokens"]
    assert row["prompt_tokens_scraped"] == after.num_prompt_tokens - before.num_prompt_tokens
    assert row["prefix_cache_queries"] == after.prefix_cache_queries - before.prefix_cache_queries
    assert row["kv_blocks"] == after.num_gpu_blocks and row["metrics_scraped"]
    assert len(res.timeseries) >= 2 and {"t", "kv_usage", "num_running"} <= set(res.timeseries)


def test_multi_turn_under_concurrency_hits_the_prefix_cache(live):
    w = make_workload("multi-turn", num_requests=6, num_turns=3, first_prompt_len=40, turn_len=8, output_len=4,
                      vocab_size=4096, seed=2).with_arrival("concurrency", concurrency=2)
    before = live.engine_call(lambda e: e.stats().num_generation_tokens)
    res = run_loadtest(live.url, "pystdlib", w, scrape_interval=0.1)  # with the warm-up: 4 x 4 tokens first
    assert res.row["num_finished"] == len(w) and res.row["num_failed"] == 0
    assert live.engine_call(lambda e: e.stats().num_generation_tokens) - before == res.row["total_output_tokens"] + 16
    assert res.row["prefix_cache_hits"] > 0
    # usage.prompt_tokens_details.cached_tokens, per request, adds up to the scraped counter
    assert res.requests["num_cached_tokens"].sum() == res.row["prefix_cache_hits"]


@pytest.mark.parametrize("token_ids", [False, True])
def test_n_choices_count_every_choice_and_time_the_longest(live, token_ids):
    # 3 requests x n=3 choices x 5 tokens (ignore_eos): 15 output tokens per request, 45 in all, by hand.
    w = make_workload("fixed", num_requests=3, prompt_len=16, output_len=5, vocab_size=4096, seed=4)
    sampling = {"n": 3, "temperature": 1.0, "seed": 7, **({"return_token_ids": True} if token_ids else {})}
    before = live.engine_call(lambda e: e.stats().num_generation_tokens)
    res = run_loadtest(live.url, "pystdlib", w, sampling=sampling, scrape_interval=None, warmup=False)
    row, req = res.row, res.requests
    assert row["status"] == "ok" and row["num_finished"] == 3 and row["n"] == 3 and row["beam_width"] is None
    assert list(req["num_output_tokens"]) == [15, 15, 15] and row["total_output_tokens"] == 45
    assert live.engine_call(lambda e: e.stats().num_generation_tokens) - before == 45
    # ITL and TPOT are one choice's (5 tokens, so at most 4 gaps), not the 15 tokens of all three: TPOT spans
    # from the first to the last chunk of any choice over 4 gaps, so it is at least the longest choice's mean gap.
    assert all(1 <= len(itl) <= 4 for itl in req["itl"])
    assert all(tpot * 4 >= sum(itl) - 1e-9 for tpot, itl in zip(req["tpot"], req["itl"]))
    assert (req["ttft"] > 0).all() and (req["ttft"] + req["tpot"] * 4 <= req["e2e"] + 1e-9).all()
    with pytest.raises(ValueError, match="beam_width=2"):
        run_loadtest(live.url, "pystdlib", w, sampling={"beam_width": 2}, warmup=False)
    with pytest.raises(ValueError, match="n=0"):
        run_loadtest(live.url, "pystdlib", w, sampling={"n": 0}, warmup=False)


def test_n_from_the_cli_and_from_a_server_sweep_grid(live, tmp_path):
    from urllib.parse import urlparse

    from workbench.__main__ import main
    from workbench.server_sweep import ServerSweep

    out = tmp_path / "r.jsonl"
    assert main(["loadtest", "--endpoint", live.url, "--model", "pystdlib", "--workload", "fixed", "--num-requests",
                 "2", "--workload-arg", "prompt_len=16", "--workload-arg", "output_len=3", "--vocab-size", "4096",
                 "--set", "n=2", "--no-warmup", "--scrape-interval", "0", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["n"] == 2 and row["total_output_tokens"] == 2 * 2 * 3  # requests x choices x tokens
    # The grid's n goes into the bodies, not the command: a stand-in command, measured against the live server.
    w = make_workload("fixed", num_requests=2, prompt_len=16, output_len=3, vocab_size=4096)
    port = urlparse(live.url).port
    sweep = ServerSweep("{python} -c 'import time; time.sleep(60)'", "pystdlib", w, grid={"n": [1, 3]},
                        port=port, log_dir=str(tmp_path / "logs"), loadtest={"warmup": False, "scrape_interval": None})
    df = sweep.run()
    assert list(df["status"]) == ["ok", "ok"] and list(df["n"]) == [1, 3]
    assert list(df["total_output_tokens"]) == [2 * 1 * 3, 2 * 3 * 3] and df["point_id"].nunique() == 2
    with pytest.raises(ValueError, match="beam_width=2"):  # refused before any server starts
        ServerSweep("{python} -c pass", "pystdlib", w, grid={"beam_width": [None, 2]}, port=port)


def test_chat_api_with_text_prompts(live):
    from transformers import AutoTokenizer

    from engine.serve.app import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    w = make_workload("fixed", num_requests=4, prompt_len=12, output_len=3, vocab_size=4096, seed=3)
    res = run_loadtest(live.url, "pystdlib", w, api="chat", tokenizer=str(MODEL_DIR), scrape_interval=None,
                       warmup=False)
    assert res.row["num_finished"] == 4 and res.row["total_output_tokens"] == 12
    # the prompt length is the server's: the decoded text in the chat format, re-encoded
    want = {r.request_id: len(chat_prompt_ids(tok, [{"role": "user", "content": tok.decode(
        list(r.prompt_token_ids), skip_special_tokens=True)}])) for r in w}
    assert dict(zip(res.requests["request_id"], res.requests["num_prompt_tokens"])) == want
    with pytest.raises(ValueError, match="tokenizer"):
        run_loadtest(live.url, "pystdlib", w, api="chat")


def test_parse_metrics_reads_vllm_names():
    text = ('# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
            '# TYPE vllm:prefix_cache_hits_total counter\nvllm:prefix_cache_hits_total{model_name="m"} 7\n'
            '# TYPE vllm:gpu_prefix_cache_queries_total counter\n'
            'vllm:gpu_prefix_cache_queries_total{model_name="m"} 9\n')
    assert parse_metrics(text) == {"kv_usage": 0.25, "prefix_cache_hits": 7, "prefix_cache_queries": 9}


def test_cli_writes_results_and_report(live, tmp_path):
    from workbench.__main__ import main

    out, html = tmp_path / "r.jsonl", tmp_path / "r.html"
    code = main(["loadtest", "--endpoint", live.url, "--model", "pystdlib", "--workload", "fixed", "--num-requests",
                 "4", "--workload-arg", "prompt_len=16", "--workload-arg", "output_len=4", "--vocab-size", "4096",
                 "--concurrency", "2", "--out", str(out), "--html", str(html)])
    assert code == 0
    assert '"num_finished": 4' in out.read_text()
    assert "fig-ttft-cdf" in html.read_text()


def test_server_sweep_starts_measures_stops_and_keeps_failed_logs(tmp_path):
    from engine.serve.background import free_port
    from workbench.server_sweep import ServerSweep

    cmd = (f"{{python}} -m engine serve --model {MODEL_DIR} --served-model-name pystdlib --port {{port}} "
           "--device cpu --max-model-len 256 --block-size {block_size} --enable-prefix-caching {prefix}")
    w = make_workload("fixed", num_requests=3, prompt_len=16, output_len=3, vocab_size=4096)
    sweep = ServerSweep(cmd, "pystdlib", w, grid={"block_size": [16, 3]}, fixed={"prefix": False},
                        port=free_port(), startup_timeout=120, out=str(tmp_path / "s.jsonl"),
                        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    df = sweep.run()
    ok, bad = df.iloc[0], df.iloc[1]
    assert ok["status"] == "ok" and ok["num_finished"] == 3 and ok["block_size"] == 16
    assert bad["status"] == "error" and "exited" in bad["error"]
    assert "block_size" in Path(bad["server_log"]).read_text()  # the engine's own message, kept
    assert os.path.exists(sweep.write_report(str(tmp_path / "s.html")))
