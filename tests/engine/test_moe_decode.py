"""The MoE small-batch paths (engine/kernels/moe.py: the decode path's unsorted GEMV kernels over token-expert
pairs, with or without the routing fused; the dedup path's unsorted GEMMs over distinct experts) against the
pure-torch reference under the Triton interpreter, the rule that picks a path, and tiny Mixtral / Qwen3-MoE
models on the Triton backend taking the decode path with HF's greedy tokens."""
import os

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.kernels.moe_reference import fused_moe_reference, route_topk
from family_models import make_family_model
from test_model_families import assert_same_greedy, hf_greedy, make_prompts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need TRITON_INTERPRET=1")


def case(t, e, k, h, i, dtype=torch.float32, seed=0, shared=False):
    """x, w13, w2, routing weights and ids; shared=True: every token picks the same k experts (in a rotated
    order), so each expert is chosen by every token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    weights, ids = route_topk(torch.randn(t, e, generator=g), k, renormalize=True)
    if shared:
        ids = torch.stack([torch.arange(k).roll(j) * (e // k) for j in range(t)])
    return x, w13, w2, weights, ids


def reference(x, w13, w2, weights, ids):
    return fused_moe_reference(x.float(), w13.float(), w2.float(), weights, ids)


@needs_interpreter
@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("e", [8, 20])
def test_decode_path_matches_reference(t, k, e):
    """Hidden 40 and intermediate 24 are no multiple of the 16 x 32 tiles: the N and K edges are masked."""
    from engine.kernels.moe import fused_moe_decode
    x, w13, w2, weights, ids = case(t, e, k, 40, 24, seed=t * 100 + k * 10 + e)
    torch.testing.assert_close(fused_moe_decode(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("t,k", [(5, 2), (3, 8)])
def test_decode_path_with_experts_shared_by_tokens(t, k):
    from engine.kernels.moe import fused_moe_decode
    x, w13, w2, weights, ids = case(t, 16, k, 32, 48, shared=True)
    assert all(set(row.tolist()) == set(ids[0].tolist()) for row in ids)
    torch.testing.assert_close(fused_moe_decode(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("tiles", [
    {"gate_up": (8, 16, 4), "down": (2, 16, 4)},      # K loops of several steps, one-row-pair down tiles
    {"gate_up": (64, 128, 4), "down": (64, 64, 8)},   # one tile wider than N and K (everything masked)
])
def test_decode_path_tiles_agree(tiles):
    from engine.kernels.moe import fused_moe_decode
    x, w13, w2, weights, ids = case(2, 8, 8, 72, 40, seed=7)
    torch.testing.assert_close(fused_moe_decode(x, w13, w2, weights, ids, tiles=tiles),
                               reference(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("t,k,e,renormalize", [(1, 8, 20, True), (2, 2, 8, True), (5, 1, 8, False),
                                               (5, 8, 16, False), (3, 3, 6, True)])
def test_routed_decode_path_routes_as_route_topk(t, k, e, renormalize):
    """The gate_up kernel's fused routing: ids equal route_topk's, weights equal, the output the reference's,
    and routing_out filled. With tied logits (torch.topk leaves the order among equals open) the ids equal
    route_topk_triton's, which takes the lower index first."""
    from engine.kernels.moe import fused_moe_decode_routed, route_topk_triton
    x, w13, w2, _, _ = case(t, e, k, 40, 24, seed=t + e)
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(k))
    ref_w, ref_ids = route_topk(logits, k, renormalize)
    routing = torch.full((t, k), -1, dtype=torch.int64)
    out, weights, ids = fused_moe_decode_routed(x, logits, w13, w2, k, renormalize, routing)
    assert torch.equal(ids, ref_ids) and torch.equal(routing, ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, reference(x, w13, w2, ref_w, ref_ids), atol=1e-5, rtol=1e-5)
    logits[:, 1::3] = logits[:, :1]       # every token has experts with equal logits
    tie_w, tie_ids = route_topk_triton(logits, k, renormalize)
    _, weights, ids = fused_moe_decode_routed(x, logits, w13, w2, k, renormalize)
    assert torch.equal(ids, tie_ids)
    torch.testing.assert_close(weights, tie_w, atol=1e-6, rtol=1e-6)


@needs_interpreter
def test_decode_path_float16_rounds_as_the_reference():
    from engine.kernels.moe import fused_moe_decode
    x, w13, w2, weights, ids = case(2, 8, 2, 64, 48, dtype=torch.float16, seed=5)
    expected = fused_moe_reference(x, w13, w2, weights, ids).float()
    torch.testing.assert_close(fused_moe_decode(x, w13, w2, weights, ids).float(), expected, atol=3e-3, rtol=3e-3)


@needs_interpreter
@pytest.mark.parametrize("t,k,e", [(1, 8, 20), (2, 2, 8), (5, 1, 8), (5, 8, 20), (16, 8, 128), (30, 2, 4)])
def test_dedup_path_matches_reference(t, k, e):
    from engine.kernels.moe import fused_moe
    x, w13, w2, weights, ids = case(t, e, k, 40, 24, seed=t * 7 + e)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, path="dedup"), reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_dedup_path_with_experts_shared_by_tokens_and_its_block_bound():
    from engine.kernels.moe import fused_moe
    x, w13, w2, weights, ids = case(5, 16, 2, 32, 48, shared=True)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, path="dedup"), reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)
    small = dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="BLOCK_M"):
        fused_moe(x, w13, w2, weights, ids, config=small, path="dedup")


def test_path_rule_picks_gemv_dedup_grouped():
    from engine.kernels.moe import DEDUP_MAX_PAIRS, pick_path
    qwen3_expert, mixtral_expert = 3 * 2048 * 768 * 2, 3 * 4096 * 14336 * 2
    assert [pick_path(t, 8, 128, qwen3_expert) for t in (1, 4, 8, 16, 17)] == \
        ["gemv", "gemv", "dedup", "dedup", "grouped"]
    assert [pick_path(t, 2, 8, mixtral_expert) for t in (1, 2, 64, 65)] == ["gemv", "dedup", "dedup", "grouped"]
    assert DEDUP_MAX_PAIRS == 128


def test_path_rule_counts_pairs_and_expert_rereads():
    from engine.kernels.moe import GEMV_MAX_PAIRS, expected_distinct_experts, use_gemv_path
    qwen3_expert, mixtral_expert = 3 * 2048 * 768 * 2, 3 * 4096 * 14336 * 2
    assert expected_distinct_experts(1, 8, 128) == pytest.approx(8)
    assert expected_distinct_experts(2, 2, 8) == pytest.approx(8 * (1 - 0.75 ** 2))   # 3.5 of 4 pairs
    # One token never re-reads an expert: the decode path, whatever the expert size.
    assert use_gemv_path(1, 8, 128, qwen3_expert) and use_gemv_path(1, 2, 8, mixtral_expert)
    # Qwen3-30B-A3B: 32 pairs re-read ~2.9 experts (27 MB) at T = 4; 64 pairs ~12.4 (117 MB) at T = 8.
    assert use_gemv_path(4, 8, 128, qwen3_expert) and not use_gemv_path(8, 8, 128, qwen3_expert)
    # Mixtral: two tokens already re-read half an expert (176 MB) in expectation.
    assert not use_gemv_path(2, 2, 8, mixtral_expert)
    # Above GEMV_MAX_PAIRS the grouped path, even for tiny experts.
    assert use_gemv_path(GEMV_MAX_PAIRS // 2, 2, 4096, 1) and not use_gemv_path(GEMV_MAX_PAIRS // 2 + 1, 2, 4096, 1)


@needs_interpreter
def test_fused_moe_auto_takes_the_decode_path_for_few_pairs(monkeypatch):
    from engine.kernels import moe
    calls = []
    monkeypatch.setattr(moe, "fused_moe_decode", lambda *a, **kw: calls.append(a[0].shape[0]) or a[0])
    x, w13, w2, weights, ids = case(5, 8, 2, 32, 16)
    moe.fused_moe(x, w13, w2, weights, ids)
    x, w13, w2, weights, ids = case(70, 8, 2, 32, 16)
    moe.fused_moe(x, w13, w2, weights, ids)
    assert calls == [5]


@needs_interpreter
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_triton_engine_decodes_moe_models_like_hf(kind, monkeypatch):
    """Greedy tokens of the tiny models on the Triton backend equal HF's (tie-aware), with the decode path (the
    routing fused into its gate_up kernel) taken at the decode steps (two running requests, then one)."""
    from engine.kernels import moe
    model = make_family_model(kind)
    decode_tokens = []
    real = moe.fused_moe_decode_routed
    monkeypatch.setattr(moe, "fused_moe_decode_routed",
                        lambda x, *a, **kw: decode_tokens.append(x.shape[0]) or real(x, *a, **kw))
    prompts, max_tokens = make_prompts(3, [3, 19]), [6, 4]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=64, block_size=8,
                                                max_num_batched_tokens=32, attention_backend="triton"))
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens])
    for prompt, n, out in zip(prompts, max_tokens, outs):
        expected, gaps = hf_greedy(model, prompt, n)
        assert_same_greedy(out.token_ids, expected, gaps, f"{kind}: prompt of {len(prompt)} tokens")
    assert {1, 2} <= set(decode_tokens)


@needs_interpreter
@pytest.mark.parametrize("path", ["gemv", "dedup", "grouped", "auto"])
def test_moe_from_logits_paths_agree(path):
    """MoEMLP's entry point: each path routes as route_topk and gives the reference's output."""
    from engine.kernels.moe import fused_moe_from_logits
    x, w13, w2, _, _ = case(3, 8, 2, 32, 40, seed=11)
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(12))
    weights, ids = route_topk(logits, 2, renormalize=False)
    routing = torch.zeros(3, 2, dtype=torch.int64)
    out = fused_moe_from_logits(x, logits, w13, w2, 2, False, routing, path=path)
    assert torch.equal(routing, ids)
    torch.testing.assert_close(out, reference(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="path"):
        fused_moe_from_logits(x, logits, w13, w2, 2, False, path="sorted")


@needs_interpreter
def test_decode_path_with_routing_unfused_agrees(monkeypatch):
    """DECODE_FUSED_ROUTING off: route_topk_triton, then the same GEMV kernels; same output and routing_out."""
    from engine.kernels import moe
    x, w13, w2, _, _ = case(2, 16, 8, 32, 24, seed=13)
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(14))
    outs, routings = [], []
    for fused in (True, False):
        monkeypatch.setattr(moe, "DECODE_FUSED_ROUTING", fused)
        routing = torch.zeros(2, 8, dtype=torch.int64)
        outs.append(moe.fused_moe_from_logits(x, logits, w13, w2, 8, True, routing, path="auto"))
        routings.append(routing)
    assert torch.equal(routings[0], routings[1]) and torch.equal(routings[0], route_topk(logits, 8, True)[1])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
