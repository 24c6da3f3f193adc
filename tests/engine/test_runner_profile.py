"""The worst-case memory profile's decode goes through the sampler's worst case (max_num_seqs rows, a full chunk of
each filter path), and a step past reserved_trim_bytes empties the allocator's
cache. CPU only: the CUDA calls of the profile are replaced by fakes, the forward and the sampler are the real ones."""
import contextlib

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.memory import TRIM_CHECK_INTERVAL, GiB, MiB, reserved_trim_bytes
from engine.sampling import Sampler
from engine.stats import MemoryProfile


def _cpu_llm(max_num_seqs: int) -> LLM:
    return LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, num_gpu_blocks=64, block_size=8,
                                           max_num_seqs=max_num_seqs, max_num_batched_tokens=256))


@pytest.mark.parametrize("max_num_seqs", [8, 70, 200])
def test_profile_decode_runs_the_sampler_over_max_num_seqs_rows_at_its_worst_case(monkeypatch, max_num_seqs):
    """The profile's decode samples max_num_seqs float32 rows with Sampler.profile_params: a full chunk of the sort
    path and a full chunk of the top-k path (as many rows as there are), whose temporaries bound any batch's."""
    import engine.sampling as sampling
    llm = _cpu_llm(max_num_seqs)
    runner = llm.engine.runner
    runner.sampler.chunk_rows = 64  # so that 200 rows need more than a chunk of each path
    calls, draws, sorts = [], [], []
    real_call, real_race, real_sort = Sampler.__call__, sampling.exponential_race, sampling.apply_top_p_sorted

    def spy_call(self, logits, params, generators):
        calls.append((tuple(logits.shape), logits.dtype, list(params)))
        return real_call(self, logits, params, generators)

    def spy_race(x, q):
        draws.append(x.shape[0])
        return real_race(x, q)

    def spy_sort(x, k, p):
        sorts.append(x.shape[0])
        return real_sort(x, k, p)

    def measure_peak(run):  # what _measure_peak does, without the CUDA counters
        runner.allocate_kv_cache(run(prepare=True))
        run(prepare=False)
        return 0

    monkeypatch.setattr(Sampler, "__call__", spy_call)
    monkeypatch.setattr(sampling, "exponential_race", spy_race)
    monkeypatch.setattr(sampling, "apply_top_p_sorted", spy_sort)
    monkeypatch.setattr(runner, "_measure_peak", measure_peak)
    for name, fake in (("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                       ("mem_get_info", lambda *a: (GiB, 2 * GiB)), ("memory_reserved", lambda *a: 0),
                       ("memory_allocated", lambda *a: 0)):
        monkeypatch.setattr(torch.cuda, name, fake)
    runner._profile_cuda_memory()  # the profile's own entry point: prefill, then decode

    assert len(calls) == 1  # the decode (the prefill takes an argmax only)
    shape, dtype, params = calls[0]
    assert shape == (max_num_seqs, llm.spec.vocab_size) == (runner.graph_sizes[-1], llm.spec.vocab_size)
    assert dtype == torch.float32  # what compute_logits gives every step
    assert params == runner.sampler.profile_params(max_num_seqs, llm.spec.vocab_size)
    # One full chunk of each path (the sort path's is sort_rows = 16 rows), or every row there is.
    n_sort = min(max_num_seqs, runner.sampler.sort_rows)
    assert sorts == [n_sort]
    assert draws == [n_sort] + ([min(max_num_seqs - n_sort, 64)] if max_num_seqs > n_sort else [])


def test_reserved_trim_bytes_is_hand_computed():
    # budget 72 GiB - non-torch 600 MiB - activation peak 3 GiB (the margin stays free for what this misses)
    assert reserved_trim_bytes(budget_bytes=72 * GiB, non_torch_bytes=600 * MiB,
                               activation_peak_bytes=3 * GiB) == 69 * GiB - 600 * MiB


def test_a_step_past_reserved_trim_bytes_empties_the_cache(monkeypatch):
    llm = _cpu_llm(8)
    runner = llm.engine.runner
    reserved, emptied = [0], []
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict",
                        lambda device=None: {"reserved_bytes": {"all": {"current": reserved[0]}}})
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved[0])
    freed = [0]  # what empty_cache returns (the cached free blocks)

    def empty_cache():
        emptied.append(reserved[0])
        reserved[0] -= freed[0]

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    runner.memory = MemoryProfile(total_bytes=2 * GiB, weight_bytes=0, peak_activation_bytes=0, non_torch_bytes=0,
                                  kv_cache_bytes=0, reserved_trim_bytes=1000)
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    reserved[0] = 1000  # at the threshold: kept
    llm.generate([[5, 6, 7]], greedy)
    assert emptied == [] and runner.memory.num_reserved_trims == 0
    reserved[0], freed[0] = 1300, 300  # past it: a step of a new shape (a 4-token prefill) trims back to 1000
    llm.generate([[5, 6, 7, 8]], greedy)
    assert emptied == [1300] and runner.memory.num_reserved_trims == 1 and runner.memory.reserved_trim_bytes == 1000
    # A trim that cannot get under the threshold (empty_cache returns 100 of 1300): one trim and a warning naming
    # the excess, then the threshold is what the cache could not return, so the next steps do not trim in vain.
    reserved[0], freed[0] = 1300, 100
    with pytest.warns(RuntimeWarning, match="still reserves 0.00 GiB past .* gpu_memory_utilization"):
        llm.generate([[5, 6, 7, 8, 9]], greedy)
    assert emptied == [1300, 1300] and runner.memory.num_reserved_trims == 2
    assert runner.memory.reserved_trim_bytes == 1200
    reserved[0] = 1201  # growth past the new threshold trims again
    llm.generate([[5, 6, 7, 8, 9, 10]], greedy)
    assert emptied[2:] == [1201] and runner.memory.num_reserved_trims == 3


def test_reserved_bytes_are_read_after_new_step_shapes_and_every_interval(monkeypatch):
    llm = _cpu_llm(8)
    eng, runner = llm.engine, llm.engine.runner
    reserved, reads, emptied = [1000], [], []

    def stats(device=None):
        reads.append(len(eng.stats().steps))
        return {"reserved_bytes": {"all": {"current": reserved[0]}}}

    def empty_cache():  # returns every cached block: back to the threshold
        emptied.append(len(eng.stats().steps))
        reserved[0] = 1000

    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", stats)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved[0])
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    runner.memory = MemoryProfile(total_bytes=2 * GiB, weight_bytes=0, peak_activation_bytes=0, non_torch_bytes=0,
                                  kv_cache_bytes=0, reserved_trim_bytes=1000)
    eng.reset_stats()
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    for _ in range(3):  # a 3-token prefill, then one-row decodes: two shapes, each read once
        eng.step()
    assert reads == [0, 1] and emptied == []
    reserved[0] = 1001  # grown without a new shape: seen TRIM_CHECK_INTERVAL steps after the last read
    while not emptied:
        eng.step()
    assert reads[-2:] == [1, 1 + TRIM_CHECK_INTERVAL] and emptied == [1 + TRIM_CHECK_INTERVAL]
    eng.step()  # after a trim every shape is new: read again (at the threshold now: kept)
    assert reads[-1] == 2 + TRIM_CHECK_INTERVAL and emptied == [1 + TRIM_CHECK_INTERVAL]
    eng.step()  # a shape served since the trim: not read
    assert reads[-1] == 2 + TRIM_CHECK_INTERVAL


def test_every_tuned_step_shape_runs_before_the_profile_measures(monkeypatch):
    """Kernels that tune themselves at the first call of a row count (engine/quant/tuning.py) meet every step shape
    in _tune_kernels, before the profile's first measurement: a prefill of the token budget, then a decode of each
    CUDA-graph batch size, largest first (the order the profile and the capture used to meet them in)."""
    llm = _cpu_llm(70)
    runner = llm.engine.runner
    rows, measured = [], []
    real_forward = runner.model.forward

    def forward(ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return real_forward(ids, *args, **kwargs)

    def measure_peak(run):
        measured.append(len(rows))
        runner.allocate_kv_cache(run(prepare=True))
        run(prepare=False)
        return 0

    monkeypatch.setattr(runner.model, "forward", forward)
    monkeypatch.setattr(runner, "_measure_peak", measure_peak)
    for name, fake in (("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                       ("mem_get_info", lambda *a: (GiB, 2 * GiB)), ("memory_reserved", lambda *a: 0),
                       ("memory_allocated", lambda *a: 0)):
        monkeypatch.setattr(torch.cuda, name, fake)
    runner._profile_cuda_memory()
    sizes = runner.graph_sizes
    assert len(sizes) > 5 and sizes[-1] == 70
    assert rows[:measured[0]] == [256] + sorted(sizes, reverse=True)
    assert rows[measured[0]:] == [256, 70]  # then the profile's prefill and decode
