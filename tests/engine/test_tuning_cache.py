"""engine.quant.tuning's choices persist on disk: a later process (simulated by clearing the in-memory tables) uses
a stored choice without timing anything, re-tunes a key whose stored choice is no longer a candidate, and the file
is named by the device, the versions and the kernels' source. The GPU is simulated: tuning.pick's timing is
replaced by fixed times per candidate."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from engine.quant import tuning

CANDIDATES = [dict(kernel="a", block=16), dict(kernel="b", block=32), dict(kernel="c", block=64)]
TIMES = {"a": 3.0, "b": 1.0, "c": 2.0}  # milliseconds: "b" is fastest


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A simulated GPU whose cache file is tmp_path / tuning.json; returns the candidates tuning timed."""
    timed = []
    path = tmp_path / "tuning.json"

    def graph_time(fn, calls):
        fn()
        return TIMES[timed[-1]["kernel"]]

    def launch(cfg, x):
        timed.append(cfg)
        return x * 2.0

    monkeypatch.setattr(tuning, "_graph_time", graph_time)
    monkeypatch.setattr(tuning, "cache_file", lambda device: path)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "_stored", {})
    for table in ("chosen", "timings", "seconds"):
        monkeypatch.setattr(tuning, table, {})
    return SimpleNamespace(path=path, timed=timed,
                           pick=lambda key, cands=CANDIDATES: tuning.pick(key, cands, launch, lambda: [(torch.ones(4),)],
                                                                          torch.device("cuda")))


def _new_process():
    """What a fresh process knows: nothing in memory, only the file."""
    for table in (tuning.chosen, tuning.timings, tuning.seconds, tuning._stored):
        table.clear()


def test_a_tuned_choice_is_stored_and_a_later_process_uses_it_without_timing(gpu):
    key = ("int4", 256, 4096, 4096, 128, torch.bfloat16)
    assert gpu.pick(key) == CANDIDATES[1] and gpu.timed  # timed: a, b, c (and their agreement checks)
    assert json.loads(gpu.path.read_text()) == {repr(key): CANDIDATES[1]}
    _new_process()
    gpu.timed.clear()
    assert gpu.pick(key) == CANDIDATES[1] and gpu.timed == []
    assert tuning.chosen[key] == CANDIDATES[1] and key not in tuning.timings


def test_keys_from_several_processes_merge_and_a_stale_choice_is_tuned_again(gpu):
    first, second = ("fp8", 64, 6144, 4096, torch.bfloat16), ("fp8", 128, 6144, 4096, torch.bfloat16)
    gpu.pick(first)
    _new_process()
    gpu.pick(second)  # another process adds its key to the same file
    assert set(json.loads(gpu.path.read_text())) == {repr(first), repr(second)}
    _new_process()
    gpu.timed.clear()
    others = [dict(kernel="a", block=8), dict(kernel="c", block=64)]  # the stored choice is no longer offered
    assert gpu.pick(first, others) == others[1] and gpu.timed
    assert json.loads(gpu.path.read_text())[repr(first)] == others[1]


def test_an_unreadable_file_counts_as_empty(gpu):
    gpu.path.write_text("{not json")
    key = ("gemv", "norm", 1, 6144, 4096, torch.bfloat16, False, False)
    assert gpu.pick(key) == CANDIDATES[1] and gpu.timed
    assert json.loads(gpu.path.read_text()) == {repr(key): CANDIDATES[1]}


def test_the_file_is_named_by_device_versions_and_kernel_source(monkeypatch, tmp_path):
    import triton
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setenv("ENGINE_TUNING_CACHE", str(tmp_path))
    path = tuning.cache_file(torch.device("cuda"))
    assert path.parent == tmp_path and path.suffix == ".json"
    assert path.name.startswith("NVIDIA_H200-sm90-132sms-torch") and f"-triton{triton.__version__}-" in path.name
    assert path.stem.endswith(tuning._source_hash()) and len(tuning._source_hash()) == 8
    monkeypatch.setenv("ENGINE_TUNING_CACHE", "0")
    assert tuning.cache_file(torch.device("cuda")) is None


def test_no_file_for_a_device_that_cannot_be_described(monkeypatch, tmp_path):
    def no_device(device):
        raise RuntimeError("no CUDA device")
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device)
    monkeypatch.setenv("ENGINE_TUNING_CACHE", str(tmp_path))
    assert tuning.cache_file(torch.device("cuda")) is None


def test_a_candidate_function_is_called_only_while_its_key_is_untuned(gpu):
    """The engine's layers pass their candidates as a function: once a key is chosen, a call (every later layer
    call, each eager step) returns the choice without building the list."""
    built = []

    def cands():
        built.append(1)
        return CANDIDATES

    key = ("int4", 16, 4096, 14336, 128, torch.bfloat16)
    assert gpu.pick(key, cands) == CANDIDATES[1] and len(built) == 1
    assert gpu.pick(key, cands) == CANDIDATES[1] and len(built) == 1
    _new_process()  # the choice read back from the file still checks it is one of the candidates
    assert gpu.pick(key, cands) == CANDIDATES[1] and len(built) == 2
