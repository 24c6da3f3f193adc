"""The engine on one GPU (Triton kernels, CUDA graphs for decode) against HF generate on the CPU.

The shipped model in float32: trained weights keep greedy choices far from ties, so the engine's
kernels (tf32 dots) and HF's float32 CPU path pick the same tokens. Chunked prefill, prefix-cache
hits and preemption all happen (a 40-block pool, a 96-token budget, a shared first 48 tokens).
"""
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MODEL = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"
NEW_TOKENS = 24


def test_engine_with_cuda_graphs_matches_hf_greedy():
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, local_files_only=True).eval()
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(4, 4096, (48,), generator=gen).tolist()
    prompts = [shared + torch.randint(4, 4096, (8 + 9 * i,), generator=gen).tolist() for i in range(12)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=3)
            expected.append(out[0, len(p):].tolist())
    cfg = EngineConfig(max_model_len=256, block_size=16, num_gpu_blocks=40, max_num_batched_tokens=96)
    llm = LLM.from_pretrained(MODEL, cfg, dtype=torch.float32)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats.cuda_graphs and any(s.cuda_graph for s in stats.steps)
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert max(s.num_prefill_tokens for s in stats.steps) == 96
    assert [o.token_ids for o in outs] == expected
