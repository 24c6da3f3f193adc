"""`python -m workbench demo` on a reduced size: a real CPU sweep of the shipped model, its report and its
words. The recommendation is checked against the results table itself (the row with the highest output
throughput), and self-containment against the report's HTML (no tag loads anything from elsewhere)."""
import re

import pytest

from workbench import demo
from workbench.__main__ import main

# A tag that loads something: <script src=...>, <link href=...>, <img src=...>, <iframe src=...>.
EXTERNAL = re.compile(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", re.IGNORECASE)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(str(out), num_requests=4, repeats=1, block_sizes=[16], progress=False)


def test_demo_report_is_self_contained_and_holds_the_recommendation(small_demo):
    res = small_demo
    assert res.ok, res.results[["label", "status", "error"]]
    assert list(res.results["label"]) == ["bs=16 prefix=on", "bs=16 prefix=off"]
    ok = res.results[res.results["status"] == "ok"]
    best_label = ok.loc[ok["output_throughput"].astype(float).idxmax(), "label"]
    assert res.recommendation["label"].iloc[0] == best_label
    html = open(res.report_path, encoding="utf-8").read()
    assert res.report_path.endswith("report.html")
    assert EXTERNAL.search(html) is None, EXTERNAL.search(html).group(0)
    assert html.count("<script") >= 2 and "plotly" in html  # plotly.js inline, figures drawn from it
    assert best_label in html and re.search(r"Recommend|Best setting", html)
    # 4 requests of a 96-token system prompt (2 distinct) + 16 own tokens: the 2 requests after the first
    # of each prompt find its 96 tokens (6 whole blocks of 16) cached: 2 x 96 of 4 x 112 prompt tokens.
    args = demo.WORKLOAD_ARGS
    assert (args["num_prefixes"], args["prefix_len"], args["suffix_len"]) == (2, 96, 16)
    by_label = res.results.set_index("label")["prefix_cache_hit_rate"].astype(float)
    assert by_label["bs=16 prefix=on"] == pytest.approx(2 * 96 / (4 * 112))
    assert by_label["bs=16 prefix=off"] == 0


def test_demo_words_name_the_pick_and_both_configs(small_demo):
    lines = demo.recommendation_lines(small_demo)
    text = "\n".join(lines)
    label = small_demo.recommendation["label"].iloc[0]
    prefix_on = label.endswith("prefix=on")
    assert lines[0].startswith(f"Recommendation: {label} (best ") and "throughput" in lines[0]
    assert any(line.strip().endswith("throughput" + ": " + label) or f"throughput: {label}" in line for line in lines)
    config = next(line for line in lines if "EngineConfig(" in line)
    serve = next(line for line in lines if "vllm serve" in line)
    assert "EngineConfig(block_size=16" in config and f"enable_prefix_caching={prefix_on}" in config
    assert "vllm serve MODEL --block-size 16" in serve
    assert ("--enable-prefix-caching" if prefix_on else "--no-enable-prefix-caching") in serve
    assert "device" not in config + serve  # a config to take to a GPU, not the demo's CPU
    assert "rerun on your GPU" in text
    steps = "\n".join(demo.next_steps(small_demo))
    assert "report.html" in steps and "jupyter lab" in steps and "notebooks" in steps


def test_demo_command_writes_report_here_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "GRID", {"block_size": [32], "enable_prefix_caching": [True, False]})
    assert main(["demo", "--num-requests", "2", "--repeats", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "report.html").exists()
    assert "Recommendation" in out and "bs=32 prefix=" in out and "jupyter lab" in out
    assert str((tmp_path / "report.html").resolve()) in out


@pytest.mark.parametrize("argv, name", [(["--num-requests", "0"], "num_requests=0"), (["--repeats", "0"], "repeats=0")])
def test_demo_command_bad_argument_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, name):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


def test_gpu_advice_is_empty_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert demo.gpu_advice() == []


def _fake_gpu(monkeypatch, name):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_gpu_advice_names_what_the_planner_fits_and_a_command_the_cli_takes(monkeypatch):
    import shlex

    from engine import EngineConfig
    from workbench import planner
    from workbench.__main__ import build_parser

    target = planner.GPUS["H100-80GB"]
    # The reference: the planner itself, asked about the H100 by name.
    preset = next(p for p in demo.GPU_PRESETS
                  if planner.plan(p, target, EngineConfig(max_model_len=4096, gpu_memory_utilization=0.9)).fits)
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    real_resolve = planner.resolve_gpu
    monkeypatch.setattr(planner, "resolve_gpu", lambda g: target if g == "current" else real_resolve(g))
    text = "\n".join(demo.gpu_advice())
    assert "NVIDIA H100 80GB HBM3" in text and "gpu_memory_utilization" not in text
    assert f"--model {preset} --device cuda" in text and f'MODEL = "{preset}"' in text
    command = next(line for line in text.replace("\\\n", " ").splitlines() if "python -m workbench sweep" in line)
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert args.model == preset and args.device == "cuda" and args.html == "report.html"


@pytest.mark.parametrize("fitting, expected", [
    ({("llama-3.2-1b", 0.9), ("llama-3.2-3b", 0.8)}, ("llama-3.2-1b", 0.9)),  # 0.9 tried for every preset first
    ({("llama-3.2-3b", 0.8), ("llama-3.2-1b", 0.8)}, ("llama-3.2-3b", 0.8)),  # then 0.8, largest preset first
    (set(), None),
])
def test_gpu_advice_prefers_the_default_memory_share_then_the_largest_preset(monkeypatch, fitting, expected):
    import types

    from workbench import planner

    def fake_plan(model, gpu, cfg):
        fits = (model, cfg.gpu_memory_utilization) in fitting
        return types.SimpleNamespace(model=model, fits=fits, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                     reason="ok" if fits else "too small")

    _fake_gpu(monkeypatch, "NVIDIA small")
    monkeypatch.setattr(planner, "plan", fake_plan)
    text = "\n".join(demo.gpu_advice())
    if expected is None:
        assert "fits none of" in text and "too small" in text
        return
    preset, util = expected
    assert f"--model {preset} --device cuda" in text
    assert ("--set gpu_memory_utilization=0.8" in text) == (util == 0.8)


def test_readme_leads_with_the_demo_and_its_screenshots_exist_under_300_kb():
    from pathlib import Path

    root = Path(demo.ROOT)
    readme = (root / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    assert first_block == "pip install torch==2.13.0 -e . && python -m workbench demo"
    images = re.findall(r"!\[[^\]]*\]\((docs/img/[^)]+\.png)\)", readme)
    assert len(images) >= 5  # the recommendation, two report figures, the SweepPanel, the BlockMapExplorer
    for name in images:
        png = root / name
        assert png.exists(), f"{name} is referenced by the README but missing: python scripts/make_screenshots.py"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300 * 1024, name
