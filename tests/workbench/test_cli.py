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
               "--save-workload", str(tmp_path / "w.jsonl"), "--title", "<b>cli</b>", "--repeats", "1"])
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
    assert "output throughput (tokens/s)" in printed and str(out) in printed


TINY_ARGS = ["--model", "tiny", "--workload", "fixed", "--num-requests", "2", "--workload-arg", "prompt_len=8",
             "--workload-arg", "output_len=2", "--set", "max_model_len=64", "--device", "cpu", "--no-progress",
             "--no-warmup", "--repeats", "1"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unknown_grid_field_exits_2_with_one_line(tmp_path, capsys):
    rc = main(["sweep", *TINY_ARGS, "--grid", "blok_size=8", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "'blok_size' is not an EngineConfig field" in err and "block_size" in err


def test_every_invalid_grid_value_is_reported_before_anything_runs(tmp_path, capsys, monkeypatch):
    import workbench.point_run

    monkeypatch.setattr(workbench.point_run, "run_point", lambda *a, **k: pytest.fail("a point ran"))
    rc = main(["sweep", *TINY_ARGS, "--grid", "block_size=7,8,12", "--grid", "quantization=none,int3",
               "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "block_size=7 is not allowed" in err and "block_size=12 is not allowed" in err
    assert "quantization='int3' is not allowed" in err and "'int8'" in err  # the allowed values are named
    assert not (tmp_path / "r.jsonl").exists()


def test_bad_base_config_exits_2_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["sweep", *TINY_ARGS, "--set", "block_size=3", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "block_size=3 is not allowed" in _one_line_error(capsys)
    with pytest.raises(ValueError, match="block_size=3"):
        main(["sweep", *TINY_ARGS, "--set", "block_size=3", "--out", str(tmp_path / "r.jsonl"), "--debug"])


@pytest.mark.parametrize("command", ["sweep", "bench"])
def test_zero_requests_is_refused(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--model", "tiny", "--num-requests", "0"])
    assert e.value.code == 2 and "use an integer >= 1" in capsys.readouterr().err


def test_all_failed_sweep_exits_1_and_the_report_leads_with_the_failures(tmp_path, capsys):
    out, html = tmp_path / "r.jsonl", tmp_path / "r.html"
    rc = main(["sweep", *TINY_ARGS, "--set", "num_gpu_blocks=1", "--grid", "block_size=8,16", "--out", str(out),
               "--html", str(html)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED: 2 of 2 points (2 ValueError)" in err
    text = html.read_text()
    body = text[text.index("<body>"):]
    assert body.index("Failed points: 2 of 2") < body.index("Recommendation") < body.index("Figures")
    assert "nothing to recommend" in body and "plotly-graph-div" not in body


def test_some_failed_exits_1_all_ok_exits_0(tmp_path, capsys):
    rc = main(["sweep", *TINY_ARGS, "--grid", "num_gpu_blocks=1,16", "--out", str(tmp_path / "a.jsonl")])
    assert rc == 1 and "FAILED: 1 of 2 points" in capsys.readouterr().err
    assert main(["sweep", *TINY_ARGS, "--grid", "block_size=8", "--out", str(tmp_path / "b.jsonl")]) == 0


def test_duplicate_grid_values_run_once_and_outputs_default_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", *TINY_ARGS, "--grid", "block_size=8,16,8", "--grid", "block_size=16"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "sweep-tiny-fixed.jsonl").read_text().splitlines()]
    assert sorted(r["block_size"] for r in rows) == [8, 16]
    assert (tmp_path / "sweep-tiny-fixed.html").exists()


def test_ctrl_c_says_how_to_resume_and_the_rerun_skips_what_was_saved(tmp_path, capsys, monkeypatch):
    import workbench.point_run

    out = tmp_path / "r.jsonl"
    args = ["sweep", *TINY_ARGS, "--grid", "block_size=8,16,32,64", "--out", str(out)]
    real, calls = workbench.point_run.run_point, []

    def interrupted_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(workbench.point_run, "run_point", interrupted_third)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"saved 2 of 4 points to {out}; rerun the same command to resume" in err and "Traceback" not in err
    calls.clear()
    assert main(args) == 0
    assert len(calls) == 2 and "resuming: skipped 2 of 4 points already in" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 4


def test_output_that_cannot_be_written_is_refused_before_the_first_point(tmp_path, capsys, monkeypatch):
    import workbench.point_run

    monkeypatch.setattr(workbench.point_run, "run_point", lambda *a, **k: pytest.fail("a point ran"))
    (tmp_path / "file").write_text("not a folder")
    rc = main(["sweep", *TINY_ARGS, "--out", str(tmp_path / "file" / "r.jsonl")])
    assert rc == 2 and "cannot write the results file" in _one_line_error(capsys)


@pytest.mark.parametrize("command", ["sweep", "bench"])
def test_unknown_model_exits_2_naming_the_presets(command, tmp_path, capsys):
    rc = main([command, "--model", "nope", "--device", "cpu", "--num-requests", "1", "--out",
               str(tmp_path / ("r.jsonl" if command == "sweep" else "r.json"))])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "'nope' is neither a preset" in err and "tiny" in err
