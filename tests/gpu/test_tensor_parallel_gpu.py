"""Tensor parallelism through NCCL, one process per GPU, CUDA graphs on every rank (needs 2 or more GPUs).

The reference is the same model at tensor_parallel_size=1 on one GPU. The shipped model is trained, so
its greedy choices are far from ties; float32 keeps the all-reduce's summation order from flipping one.
"""
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 or more CUDA GPUs")

MODEL = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_tp2_matches_tp1_with_cuda_graphs_prefix_hits_and_preemption():
    cfg = EngineConfig(max_model_len=256, block_size=16, num_gpu_blocks=40, max_num_batched_tokens=256)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(4, 4096, (48,), generator=gen).tolist()
    prompts = [shared + torch.randint(4, 4096, (8 + 9 * i,), generator=gen).tolist() for i in range(12)]
    llm = LLM.from_pretrained(MODEL, cfg, dtype=torch.float32)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    llm.reconfigure(cfg.replace(tensor_parallel_size=2))
    assert llm.model is None
    llm.engine.reset_stats()
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    stats = llm.engine.stats()
    assert stats.cuda_graphs and any(s.cuda_graph for s in stats.steps)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    (rank1,) = llm.engine.runner.describe_ranks()
    assert rank1["device"] == "cuda:1" and rank1["env"]["NCCL_NVLS_ENABLE"] == "0"
    # A sweep's next point at the same degree: same worker, new pool and block size, graphs captured again.
    pids = llm.engine.runner.workers.pids
    llm.reconfigure(cfg.replace(tensor_parallel_size=2, block_size=32, num_gpu_blocks=24))
    llm.engine.reset_stats()
    again = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    stats = llm.engine.stats()
    assert llm.engine.runner.workers.pids == pids and any(s.cuda_graph for s in stats.steps)
    (rank1,) = llm.engine.runner.describe_ranks()
    assert rank1["kv_cache_shape"][:2] == (24 + 1, 32)
    llm.reconfigure(cfg)
    assert got == expected
    assert again == expected


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_sliding_window_groups_at_tp2_with_cuda_graphs_match_tp1(kind):
    """A tiny float32 Gemma (window 21: prompts up to 4x longer) keeps its KV cache groups at TP=2: every rank
    replays decode graphs over rank 0's per-group tables; greedy tokens equal TP=1's (or part at a near-tie of
    TP=1's logits), with prefix hits and preemption, and the same per-group blocks step by step."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from family_models import make_family_model

    model = make_family_model(kind)
    spec = LLM.model_spec(model.config)
    groups = LLM.kv_cache_groups(spec.layer_windows, spec.num_layers, 2)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 512, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, 512, (6 + 9 * i,), generator=gen).tolist() for i in range(8)]
    cfg = EngineConfig(max_model_len=160, block_size=16, num_gpu_blocks=8 * len(groups), max_num_batched_tokens=64,
                       max_num_seqs=8, attention_backend="triton", enable_prefix_caching=True)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # long enough to preempt (3-9 times)
    llm = LLM.from_hf_model(model, cfg, dtype=torch.float32)
    expected = [o.token_ids for o in llm.generate(prompts, greedy)]
    ref_steps = [s.group_used_blocks for s in llm.engine.stats().steps]
    llm.reconfigure(cfg.replace(tensor_parallel_size=2))
    llm.engine.reset_stats()
    got = [o.token_ids for o in llm.generate(prompts, greedy)]
    stats = llm.engine.stats()
    (rank1,) = llm.engine.runner.describe_ranks()
    llm.reconfigure(cfg)
    assert stats.kv_cache_groups == tuple(g.sliding_window for g in groups) == rank1["kv_cache_groups"]
    assert stats.cuda_graphs and any(s.cuda_graph for s in stats.steps)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    for prompt, a, b in zip(prompts, got, expected):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                top = llm.prompt_logits(prompt + b[:i])[-1].topk(2).values
                assert top[0] - top[1] < 2e-2, f"{kind}: token {i} differs ({x} vs {y}) without a near-tie"
                break
    if got == expected:
        assert [s.group_used_blocks for s in stats.steps] == ref_steps
