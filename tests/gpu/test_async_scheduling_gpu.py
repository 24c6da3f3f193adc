"""Async scheduling on CUDA (the default there): the device-side token feed into CUDA-graph decode steps, pinned
non-blocking token copies, stops found one step late. Outputs equal synchronous steps' (greedy and seeded
sampling), and the engine ends with every block free and nothing in flight."""
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MODEL = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"


def prompts():
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(4, 4096, (40,), generator=gen).tolist()
    return [shared + torch.randint(4, 4096, (5 + 11 * i,), generator=gen).tolist() for i in range(10)]


def run(llm, params):
    outs = llm.generate(prompts(), params)
    st = llm.engine.stats()
    assert st.num_free_blocks == st.num_gpu_blocks and not llm.engine._inflight
    return outs, st


def test_async_is_the_cuda_default_and_matches_synchronous_steps():
    cfg = EngineConfig(max_model_len=256, block_size=16, num_gpu_blocks=36, max_num_batched_tokens=96)
    llm = LLM.from_pretrained(MODEL, cfg, dtype=torch.float32)
    assert llm.engine.async_scheduling
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref, _ = run(llm, greedy)
    stops = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[o.token_ids[3 + i % 7]])
             for i, o in enumerate(ref)]
    sampled = [SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=i) for i in range(len(ref))]
    results = {}
    for mode in (True, False):
        llm.engine.set_async_scheduling(mode)
        results[mode] = [run(llm, p) for p in (greedy, stops, sampled)]
    for (a, st_a), (s, st_s) in zip(results[True], results[False]):
        assert [o.token_ids for o in a] == [o.token_ids for o in s]
        assert [o.finish_reason for o in a] == [o.finish_reason for o in s]
        assert st_a.async_scheduling and not st_s.async_scheduling
        assert any(x.cuda_graph for x in st_a.steps) and all(x.async_scheduling for x in st_a.steps)
        assert all(0 <= x.hidden_host_time <= x.host_time + 1e-9 for x in st_a.steps)
    assert [o.token_ids for o in results[True][0][0]] == [o.token_ids for o in ref]
    assert results[True][0][1].num_preemptions > 0 and results[True][0][1].prefix_cache_hits > 0
    assert sum(x.num_discarded_tokens for x in results[True][1][1].steps) > 0
