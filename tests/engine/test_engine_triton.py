"""The whole engine on the Triton backend (CPU interpreter) gives the torch backend's greedy tokens,
through chunked prefill, prefix-cache hits and mixed decode + prefill steps."""
import os

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_engine_matches_torch_engine(monkeypatch):
    from engine.kernels import triton_backend
    from engine.kernels.triton_prefill import prefill_attention
    lists = []

    def recording(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args, work=None, **kwargs):
        lists.append(None if work is None else (work.tolist(), query_start_loc.tolist(), seq_lens.tolist()))
        return prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args, work=work,
                                 **kwargs)
    monkeypatch.setattr(triton_backend, "prefill_attention", recording)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 20, 37)]
    prompts.append(prompts[2][:32] + [7, 8])  # 4 blocks of 8 shared with the third prompt
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens, hits = {}, {}
    for backend in ("torch", "triton"):
        llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, block_size=8, num_gpu_blocks=64,
                                              max_num_batched_tokens=24, attention_backend=backend))
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        st = llm.engine.stats()
        assert st.attention_backend == backend
        assert llm.engine.runner.buffers.order_decodes == (backend == "triton")  # only the Triton kernels read it
        hits[backend] = st.prefix_cache_hits
    assert tokens["triton"] == tokens["torch"]
    # Every prefill ran over the runner's work list: each (request, query block) pair once, none past a request.
    assert lists and None not in lists
    block_q = triton_backend.TritonBackend.prefill_block_q(4 // 2, torch.device("cpu"))
    for work, qsl, _ in lists:
        qlens = [b - a for a, b in zip(qsl, qsl[1:])]
        assert sorted((w >> 16, w & 0xFFFF) for w in work) == [(i, j) for i, n in enumerate(qlens)
                                                                for j in range(-(-n // block_q))]
    assert hits["triton"] == hits["torch"] == 32


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
def test_more_requests_than_the_work_list_encodes_run_on_the_kernels_grid():
    prompts = [[3 + i, 40, 41, 42, 43][: 2 + i] for i in range(3)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    tokens = {}
    for backend, seqs in (("torch", 8), ("triton", 1 << 15)):
        llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=32, block_size=8, num_gpu_blocks=16,
                                              max_num_seqs=seqs, max_num_batched_tokens=16, attention_backend=backend))
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert llm.engine.runner.prefill_block_q == 0  # 32768 requests: past what an int32 item encodes
    assert tokens["triton"] == tokens["torch"]
