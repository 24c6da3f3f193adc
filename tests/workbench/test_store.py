"""The results file: locking, atomic appends, a truncated last line, writability, both formats."""
import json
import os

import pandas as pd
import pytest

from workbench import Sweep
from workbench.store import ResultsStore, StoreLockedError
from engine import EngineConfig

BASE = EngineConfig(max_model_len=64, num_gpu_blocks=64, device="cpu")
KW = dict(model="tiny", workload="fixed", num_requests=2, workload_args=dict(prompt_len=8, output_len=2),
          base_config=BASE, progress=False, warmup=False, repeats=1)


def rows(n, start=0):
    return [{"point_id": f"p{i}", "repeat": 0, "status": "ok", "output_throughput": float(i)}
            for i in range(start, start + n)]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_a_second_writer_gets_a_clear_error_and_nothing_is_lost_or_duplicated(tmp_path, ext):
    path = str(tmp_path / f"r.{ext}")
    first = ResultsStore(path).open()
    for r in rows(3):
        first.append(r)
    second = ResultsStore(path)
    with pytest.raises(StoreLockedError, match="being written by another sweep"):
        second.open()
    for r in rows(2, start=3):
        first.append(r)
    first.close()
    with ResultsStore(path) as again:  # the lock is free once the first writer closed
        assert sorted(again.records) == [(f"p{i}", 0) for i in range(5)]
        again.append(rows(1, start=5)[0])
    with ResultsStore(path) as last:
        assert len(last.records) == 6 and len(last.runs()) == 6
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_two_sweeps_on_one_file_the_second_refuses_before_running(tmp_path):
    out = str(tmp_path / "r.parquet")
    holder = ResultsStore(out).open()
    sweep = Sweep(**KW, grid={"block_size": [8, 16]}, out=out)
    with pytest.raises(StoreLockedError):
        sweep.run()
    assert len(sweep.runs) == 0 and not os.path.exists(out)
    holder.close()
    assert len(sweep.run()) == 2 and len(pd.read_parquet(out)) == 2


def test_parquet_temporary_files_are_unique(tmp_path, monkeypatch):
    import tempfile

    names = []
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **k: names.append(real(**k)[1]) or (os.open(names[-1], 0), names[-1]))
    with ResultsStore(str(tmp_path / "r.parquet")) as store:
        for r in rows(3):
            store.append(r)
    assert len(set(names)) == 3 and all(os.path.dirname(n) == str(tmp_path) for n in names)


def test_a_truncated_last_jsonl_line_is_dropped_with_a_warning_and_its_point_reruns(tmp_path, caplog):
    out = tmp_path / "r.jsonl"
    Sweep(**KW, grid={"block_size": [8, 16]}, out=str(out)).run()
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    ran = []
    sweep = Sweep(**KW, grid={"block_size": [8, 16]}, out=str(out), on_point=ran.append)
    df = sweep.run()
    assert "last line is incomplete" in caplog.text
    assert len(ran) == 1 and ran[0]["block_size"] == 16
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and len(df) == 2 and (df["status"] == "ok").all()


def test_a_corrupt_line_in_the_middle_is_an_error_not_a_silent_drop(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"point_id": "a", "repeat": 0}\n{oops\n{"point_id": "b", "repeat": 0}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        ResultsStore(str(out)).open()


def test_unwritable_output_is_found_before_the_first_point(tmp_path):
    (tmp_path / "file").write_text("")
    ran = []
    sweep = Sweep(**KW, grid={"block_size": [8]}, out=str(tmp_path / "file" / "r.jsonl"), on_point=ran.append)
    with pytest.raises(PermissionError, match="cannot write the results file"):
        sweep.run()
    assert ran == [] and sweep.llm is None  # not even the weights were loaded


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_found_before_the_first_point(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            Sweep(**KW, grid={"block_size": [8]}, out=str(folder / "r.jsonl")).run()
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_a_writer_in_another_process_keeps_this_one_out(tmp_path, ext):
    import subprocess
    import sys
    from pathlib import Path

    out = str(tmp_path / f"r.{ext}")
    root = str(Path(__file__).resolve().parents[2])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from workbench.store import ResultsStore\n"
         f"s = ResultsStore({out!r}).open(); s.append({{'point_id': 'other', 'repeat': 0, 'status': 'ok'}})\n"
         "print('locked', flush=True); sys.stdin.readline(); s.close()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root})
    try:
        assert holder.stdout.readline().strip() == "locked"
        sweep = Sweep(**KW, grid={"block_size": [8]}, out=out)
        with pytest.raises(StoreLockedError, match="being written by another sweep"):
            sweep.run()
        assert sweep.llm is None  # refused before loading anything
    finally:
        holder.communicate("done\n", timeout=60)
    df = sweep.run()  # the other writer is gone: its row is kept, this sweep's is added, nothing twice
    with ResultsStore(out) as store:
        assert sorted(pid for pid, _ in store.records) == sorted(["other", df["point_id"][0]])
    if ext == "jsonl":
        assert len(open(out).read().splitlines()) == 2
    else:
        assert len(pd.read_parquet(out)) == 2
