"""Mixture of experts: the fused Triton kernel against its pure-torch reference (CPU interpreter, float32/16),
the routing rules against transformers' routers, the expert-load counters against a hand count, and MoE
layers under tensor parallelism."""
import os

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.kernels.moe_reference import fused_moe_reference, route_topk
from engine.stats import expert_imbalance
from family_models import make_family_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tol(dtype):
    # float32 tl.dot runs in tf32 on a GPU (10-bit mantissa); the interpreter computes in full float32.
    if dtype == torch.float32 and DEVICE == "cpu":
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=3e-3, rtol=3e-3)


def moe_case(t, e, k, h, i, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    weights, ids = route_topk(torch.randn(t, e, generator=g), k, renormalize=True)
    return [a.to(DEVICE) for a in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,e,k,h,i", [
    (1, 8, 2, 64, 48),      # a decode step: one token, two experts
    (3, 16, 8, 32, 40),     # Qwen3-MoE-like top-8, odd intermediate size (masked column tiles)
    (37, 4, 2, 48, 24),     # most experts get several 16-row blocks; hidden not a tile multiple
    (40, 8, 1, 32, 32),     # top-1
])
@pytest.mark.parametrize("path", ["grouped", "gemv", "dedup"])
def test_fused_moe_matches_reference(dtype, t, e, k, h, i, path):
    from engine.kernels.moe import fused_moe
    x, w13, w2, weights, ids = moe_case(t, e, k, h, i, dtype)
    expected = fused_moe_reference(x.float().cpu(), w13.float().cpu(), w2.float().cpu(), weights.cpu(), ids.cpu())
    got = fused_moe(x, w13, w2, weights, ids, path=path)
    torch.testing.assert_close(got.float().cpu(), expected, **tol(dtype))


@needs_triton
@pytest.mark.parametrize("e,k,renormalize", [(8, 2, True), (16, 8, False), (6, 3, True)])
def test_route_topk_kernel_matches_reference(e, k, renormalize):
    from engine.kernels.moe import route_topk_triton
    logits = torch.randn(9, e, generator=torch.Generator().manual_seed(e)).to(DEVICE)
    routing = torch.zeros(9, k, dtype=torch.int64, device=DEVICE)
    weights, ids = route_topk_triton(logits, k, renormalize, routing)
    ref_w, ref_ids = route_topk(logits, k, renormalize)
    assert torch.equal(ids, ref_ids) and torch.equal(routing, ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-6)


@needs_triton
def test_fused_moe_tile_configs_agree():
    """Every tile shape computes the same sums (the decode and the prefill configs, and a narrow one)."""
    from engine.kernels.moe import fused_moe
    x, w13, w2, weights, ids = moe_case(20, 8, 2, 64, 48, torch.float32, seed=3)
    expected = fused_moe_reference(x, w13, w2, weights, ids)
    for cfg in (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)):
        got = fused_moe(x, w13, w2, weights, ids, config={**cfg, "num_warps": 4, "num_stages": 1}, path="grouped")
        torch.testing.assert_close(got, expected, **tol(torch.float32))


def test_moe_align_sorts_pairs_by_expert_in_padded_blocks():
    from engine.kernels.moe import moe_align
    g = torch.Generator().manual_seed(0)
    t, e, k, bm = 29, 6, 2, 4
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    sorted_ids, block_expert = moe_align(ids, e, bm)
    p = t * k
    real = sorted_ids[sorted_ids < p]
    assert sorted(real.tolist()) == list(range(p)), "every pair exactly once"
    flat = ids.flatten()
    for b, expert in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * bm:(b + 1) * bm]
        rows = rows[rows < p]
        if expert < 0:
            assert len(rows) == 0
        else:
            assert (flat[rows.long()] == expert).all(), f"block {b} mixes experts"
    used = block_expert[block_expert >= 0]
    assert (used[1:] >= used[:-1]).all() and len(used) == sum(-(-int(c) // bm) for c in torch.bincount(flat))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_routing_matches_transformers_router(kind):
    model = make_family_model(kind)
    layer = next(l for l in model.model.layers if hasattr(l.mlp, "gate"))
    x = torch.randn(11, model.config.hidden_size)
    with torch.no_grad():
        _, hf_weights, hf_ids = layer.mlp.gate(x)
        logits = x @ layer.mlp.gate.weight.T
    weights, ids = route_topk(logits, model.config.num_experts_per_tok,
                              renormalize=kind == "mixtral" or model.config.norm_topk_prob)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float())


def test_expert_load_counters_match_a_hand_count():
    """One prompt, prefill only: the engine's tokens per expert per layer are the bincount of transformers'
    own top-k choices over the prompt."""
    model = make_family_model("mixtral")
    prompt = torch.randint(3, 512, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        router_logits = model(torch.tensor([prompt]), output_router_logits=True).router_logits
    k, e = model.config.num_experts_per_tok, model.config.num_local_experts
    expected = [torch.bincount(lg.topk(k, dim=-1).indices.flatten(), minlength=e).tolist() for lg in router_logits]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=128, block_size=16,
                                                 max_num_batched_tokens=20))  # three chunks, counted once each
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats.expert_tokens == expected
    assert stats.expert_imbalance == pytest.approx(expert_imbalance(expected))
    assert 1.0 <= stats.expert_imbalance <= e / k
    assert all(s.expert_imbalance is not None for s in stats.steps)
    llm.engine.reset_stats()
    assert llm.engine.stats().expert_tokens is None


def test_dense_models_have_no_expert_counters():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats.expert_tokens is None and stats.expert_imbalance is None
    assert stats.steps[0].expert_imbalance is None


def test_expert_imbalance_definition():
    assert expert_imbalance([[2, 2, 2, 2]]) == 1.0
    assert expert_imbalance([[8, 0, 0, 0], [2, 2, 2, 2]]) == pytest.approx((4.0 + 1.0) / 2)
    assert expert_imbalance([[0, 0]]) is None


@pytest.mark.skipif(not INTERPRET, reason="the whole engine on the Triton backend needs TRITON_INTERPRET=1")
def test_triton_engine_runs_moe_like_the_torch_engine():
    model = make_family_model("qwen3_moe")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 19)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=64, block_size=8,
                                                     max_num_batched_tokens=16, attention_backend=backend))
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.parametrize("kind", ["qwen3_moe", "gemma2"])
def test_tensor_parallel_matches_single_rank(kind):
    """TP=2 (gloo, one spawned worker): experts split over I on both ranks and all-reduced (Qwen3-MoE; Gemma 2's
    sandwich norms, embedding scale, windows and soft-caps under TP too); same greedy tokens."""
    model = make_family_model(kind)
    # A block of a sliding-window model holds one KV cache group's layers (gemma2 here: 3 groups): same bytes.
    blocks = 32 * (3 if kind == "gemma2" else 1)
    cfg = EngineConfig(device="cpu", max_model_len=64, block_size=4, num_gpu_blocks=blocks, max_num_batched_tokens=16)
    prompts = [[7, 8, 9, 10, 11] + [20 + i] * (4 + 3 * i) for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in LLM.from_hf_model(model, cfg).generate(prompts, params)]
    tp = LLM.from_hf_model(model, cfg.replace(tensor_parallel_size=2))
    try:
        assert [o.token_ids for o in tp.generate(prompts, params)] == ref
    finally:
        tp.reconfigure(cfg)


def test_shard_tensor_splits_every_expert():
    from engine.distributed import shard_tensor
    from engine.model.spec import ModelSpec
    spec = ModelSpec.from_hf_config(make_family_model("mixtral").config)
    e, i, h = spec.num_experts, spec.moe_intermediate_size, spec.hidden_size
    w13 = torch.randn(e, 2 * i, h)
    w2 = torch.randn(e, h, i)
    parts = [shard_tensor("layers.0.mlp.w13", w13, spec, r, 2) for r in range(2)]
    assert parts[0].shape == (e, i, h)
    gate = torch.cat([p[:, :i // 2] for p in parts], dim=1)
    up = torch.cat([p[:, i // 2:] for p in parts], dim=1)
    assert torch.equal(gate, w13[:, :i]) and torch.equal(up, w13[:, i:])
    assert torch.equal(torch.cat([shard_tensor("layers.0.mlp.w2", w2, spec, r, 2) for r in range(2)], dim=2), w2)
    assert torch.equal(shard_tensor("layers.0.mlp.gate.weight", w13[0], spec, 1, 2), w13[0])
