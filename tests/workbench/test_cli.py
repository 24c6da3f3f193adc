"""python -m workbench: argument parsing, --help, and an end-to-end CPU sweep."""
import json
import subprocess
import sys

import pytest

from workbench.__main__ import build_parser, main, parse_assignment, parse_value


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("none", None), ("null", None),
                                         ("16", 16), ("0.9", 0.9), ("1e-3", 1e-3), ("int8", "int8"),
                                         ("auto", "auto")])
def test_values_are_parsed_to_python_types(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_grid_assignments():
    assert parse_assignment("block_size=8,16,32", many=True) == ("block_size", [8, 16, 32])
    assert parse_assignment("enable-prefix-caching=true,false", many=True) == ("enable_prefix_caching", [True, False])
    assert parse_assignment("quantization=none,int8", many=True) == ("quantization", [None, "int8"])
    with pytest.raises(Exception):
        parse_assignment("block_size")


def test_help_documents_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    out = subprocess.run([sys.executable, "-m", "workbench", "sweep", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for opt in ("--model", "--workload", "--grid", "--num-requests", "--out", "--html", "--device", "--slo-ttft"):
        assert opt in out.stdout


def test_bench_help_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--workload", "--num-requests", "--baseline", "--baseline-batch-size", "--set", "--out"):
        assert option in text


def test_sweep_command_end_to_end(tmp_path, capsys):
    out, html = tmp_path / "r.jsonl", tmp_path / "r.html"
    rc = main(["sweep", "--model", "tiny", "--workload", "shared-prefix", "--num-requests", "6",
               "--workload-arg", "prefix_len=32", "--workload-arg", "suffix_len=8", "--workload-arg", "output_len=4",
               "--grid", "block_size=8,16", "--grid", "enable_prefix_caching=true,false",
               "--set", "max_model_len=128", "--set", "num_gpu_blocks=64", "--device", "cpu",
               "--slo-ttft", "2", "--out", str(out), "--html", str(html), "--no-progress", "--no-warmup",
               "--save-workload", str(tmp_path / "w.jsonl"), "--title", "<b>cli</b>"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["block_size"], r["enable_prefix_caching"]) for r in rows} == {(8, True), (8, False), (16, True),
                                                                              (16, False)}
    assert all(r["slo_ttft_s"] == 2 and r["max_model_len"] == 128 and r["device"] == "cpu" for r in rows)
    text = html.read_text()
    assert "&lt;b&gt;cli&lt;/b&gt;" in text and 'id="fig-throughput"' in text
    assert (tmp_path / "w.jsonl").exists()
    printed = capsys.readouterr().out
    assert "output_throughput" in printed and str(out) in printed


def test_sweep_command_rejects_unknown_grid_field(tmp_path):
    with pytest.raises(ValueError, match="EngineConfig fields"):
        main(["sweep", "--model", "tiny", "--workload", "fixed", "--grid", "blok_size=8", "--device", "cpu",
              "--no-progress"])
