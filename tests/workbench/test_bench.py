"""The bench: physical-limit arithmetic by hand, and the command line end to end on the CPU."""
import json

import pandas as pd
import pytest

from engine.model.presets import preset_config
from engine.model.spec import ModelSpec
from workbench.__main__ import main
from workbench.bench import step_limits


def test_step_limits_by_hand():
    spec = ModelSpec.from_hf_config(preset_config("tiny"))  # hidden 64, inter 128, 2 layers, 4/2 heads x 16, vocab 512
    layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert spec.num_params() == 2 * layer + 2 * 512 * 64 + 64
    steps = pd.DataFrame({"num_batched_tokens": [10], "num_sampled_tokens": [2], "num_attention_scores": [55],
                          "num_kv_tokens_read": [10]})
    rates = {"matmul_flops": 1e9, "copy_bandwidth": 1e6}
    out = step_limits(steps, spec, weight_bytes=1000, kv_bytes_per_token=8, rates=rates).iloc[0]
    linear = 2 * layer + 64  # everything but the embedding and the LM head (norm weights are tiny)
    assert out["flops"] == 2 * linear * 10 + 2 * 512 * 64 * 2 + 4 * (2 * 4 * 16) * 55
    assert out["bytes"] == 1000 + 8 * (10 + 10)
    assert out["limit_time"] == pytest.approx(max(out["flops"] / 1e9, out["bytes"] / 1e6))
    gemm, attn = 2 * linear * 10 + 2 * 512 * 64 * 2, 4 * (2 * 4 * 16) * 55
    assert out["serial_time"] == pytest.approx(max(gemm / 1e9, 1000 / 1e6) + max(attn / 1e9, 8 * 20 / 1e6))


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--workload", "fixed", "--num-requests", "6", "--device", "cpu",
                 "--workload-arg", "prompt_len=20", "--workload-arg", "output_len=5", "--baseline",
                 "--baseline-batch-size", "4", "--set", "max_model_len=128", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "engine / naive (output tok/s)" in printed and "ttft" in printed
    result = json.loads(out.read_text())
    assert result["engine"]["total_output_tokens"] == result["baseline"]["total_output_tokens"] == 30
    assert result["engine"]["num_finished"] == 6 and result["engine_over_baseline"] > 0
    assert result["physical_limit"] is None  # no GPU rates to measure on the CPU
    assert "command" in result["environment"]


def test_bench_takes_a_checkpoint_folder_and_writes_to_the_current_directory(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", folder, "--workload", "fixed", "--num-requests", "2", "--device", "cpu",
                 "--workload-arg", "prompt_len=8", "--workload-arg", "output_len=3", "--set", "max_model_len=64"]) == 0
    result = json.loads((tmp_path / "bench-pystdlib-llama-6m-fixed.json").read_text())
    assert result["engine"]["total_output_tokens"] == 6 and result["model"] == folder


def test_repeated_runs_on_one_engine_start_from_a_cold_prefix_cache():
    """A second run of the same trace on the same engine computes every prompt again (no hits on the first
    run's prompts): each run feeds every prompt token and every output token but the last, by hand."""
    from engine import LLM, EngineConfig
    from workbench.bench import run_engine
    from workbench.workloads import sharegpt_like

    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, block_size=4, max_num_seqs=8,
                                          enable_prefix_caching=True))
    wl = sharegpt_like(num_requests=6, mean_prompt_len=24, mean_output_len=6, max_len=48, vocab_size=llm.vocab_size)
    expected = sum(r.prompt_len + r.max_tokens - 1 for r in wl.requests)
    for _ in range(2):
        run = run_engine(llm, wl)
        assert int(run.steps["num_batched_tokens"].sum()) == expected
        assert run.stats.prefix_cache_hits == 0
