"""The host's per-step shortcuts (issue 17) against the definitions they replace: internal fragmentation summed over
all block tables at once (workloads mixing prefix sharing, parallel sampling, beam search, speculative decoding and
preemption), Request.add_output_token, and InputBuffers.upload's packed copies. (The runner's all-decode input path
is checked every step by test_runner_inputs.py, the trim check's shape test by test_runner_profile.py.)"""
import numpy as np
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.sampling import BeamSearchParams


def _fragmentation_by_definition(eng) -> float:
    """(allocated token slots - computed tokens) over the running requests, / (used blocks x block size)."""
    bs, kv = eng.config.block_size, eng.kv
    wasted = sum(len(kv.block_ids(r.request_id)) * bs - r.num_computed_tokens for r in eng.scheduler.running)
    used = kv.num_used_blocks
    return wasted / (used * bs) if used else 0.0


def _check_every_step(eng, seen):
    original = eng._record_step

    def record(*args, **kwargs):
        expected = _fragmentation_by_definition(eng)
        original(*args, **kwargs)
        assert eng.last_step_stats().internal_fragmentation == pytest.approx(expected, abs=1e-12)
        seen["steps"] += 1
        seen["shortcut"] += len(eng.kv.req_to_block_ids) == len(eng.scheduler.running)

    eng._record_step = record


@pytest.mark.parametrize("num_blocks", [24, 200])  # 24: requests preempt each other
def test_internal_fragmentation_matches_its_definition_every_step(num_blocks):
    cfg = EngineConfig(device="cpu", block_size=4, max_model_len=64, num_gpu_blocks=num_blocks, max_num_seqs=8,
                       max_num_batched_tokens=32)
    llm = LLM.random("tiny", cfg, dtype=torch.float32, seed=0)
    eng = llm.engine
    seen = {"steps": 0, "shortcut": 0}
    _check_every_step(eng, seen)
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 500, 9).tolist()
    prompts = [shared + rng.integers(3, 500, int(rng.integers(1, 12))).tolist() for _ in range(6)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    llm.generate(prompts, greedy)
    llm.generate(prompts[:3], [SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=i, ignore_eos=True)
                               for i in range(3)])
    llm.beam_search(prompts[:2], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    if num_blocks == 24:
        assert eng.stats().num_preemptions > 0
    assert seen["steps"] > 30 and seen["shortcut"] > 0


def test_internal_fragmentation_with_speculative_decoding():
    cfg = EngineConfig(device="cpu", block_size=4, max_model_len=96, num_gpu_blocks=64, max_num_seqs=4,
                       speculative_method="ngram", num_speculative_tokens=3)
    llm = LLM.random("tiny", cfg, dtype=torch.float32, seed=0)
    seen = {"steps": 0, "shortcut": 0}
    _check_every_step(llm.engine, seen)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 6, [12, 13] * 4]
    llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert seen["steps"] > 5 and seen["shortcut"] > 0


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_add_output_token_is_append_then_check_stop(ignore_eos):
    from engine.request import Request
    rng = np.random.default_rng(3)
    for trial in range(20):
        params = SamplingParams(max_tokens=int(rng.integers(1, 12)), stop_token_ids=(7, 9), ignore_eos=ignore_eos)
        prompt = rng.integers(3, 20, int(rng.integers(1, 6))).tolist()
        max_len = len(prompt) + int(rng.integers(1, 14))
        a, b = (Request("r", prompt, params, 0.0, eos_token_ids=(2,)) for _ in range(2))
        for t in range(20):
            token = int(rng.integers(2, 12))
            a.append_output_token(token, float(t))
            want = a.check_stop(max_len)
            assert b.add_output_token(token, float(t), max_len) == want
            assert (b.all_token_ids, b.output_token_ids, b.metrics) == (a.all_token_ids, a.output_token_ids, a.metrics)
            if want is not None:
                break


def test_upload_brings_every_input_to_the_device_buffers():
    from engine.runner import InputBuffers
    b = InputBuffers(max_tokens=40, max_seqs=6, max_blocks=5, device=torch.device("cpu"), max_work=9)
    rng = np.random.default_rng(0)
    for t, n, cols, decodes in [(40, 6, 5, 6), (1, 1, 1, 1), (17, 3, 2, 2), (6, 6, 4, 0), (40, 2, 5, 2)]:
        for arr in (b.ids_np, b.pos_np, b.slots_np, b.qsl_np, b.lens_np, b.work_np, b.tables_np):
            arr[...] = rng.integers(0, 1000, arr.shape)
        b.lens_np[:2] = b.lens_np[2]  # ties: kept in batch order
        b.upload(t, n, cols, decodes)
        for host, dev, k in ((b.ids, b.ids_dev, t), (b.pos, b.pos_dev, t), (b.slots, b.slots_dev, t),
                             (b.qsl, b.qsl_dev, n + 1), (b.lens, b.lens_dev, n), (b.work, b.work_dev, 9)):
            assert torch.equal(dev[:k], host[:k])
        assert torch.equal(b.tables_dev[:n, :cols], b.tables[:n, :cols])
        # the decode rows' order: longest context first, ties in batch order
        lens = b.lens_np[:decodes].tolist()
        assert b.order_dev[:decodes].tolist() == sorted(range(decodes), key=lambda i: (-lens[i], i))
