"""Sliding-window paged KV (engine/kv/groups.py, engine/kv/hybrid.py): KV cache groups, the blocks a sliding group
frees as a request advances (hand-computed counts), prefix hits that need the window's blocks, and the same tokens
as the one-table engine (HF parity: tests/engine/test_model_families.py) with sharing, beams and speculation."""
import dataclasses
import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis import given
import torch

from engine import LLM, BeamSearchParams, EngineConfig, SamplingParams
from engine.kv.groups import (group_blocks, kv_cache_groups, largest_request_tokens, layer_group_slots,
                              request_blocks)
from engine.kv.hybrid import HybridKVCacheManager
from engine.request import Request
from family_models import make_family_model, tiny_family_config
from test_model_families import hf_greedy, make_prompts, assert_same_greedy


def test_gemma_3_12b_groups():
    """48 layers, every 6th global: G = gcd(8, 40) = 8 layers per group, 1 full group and 5 sliding ones."""
    spec = LLM.model_spec("gemma-3-12b")
    groups = kv_cache_groups(spec.layer_windows, spec.num_layers)
    assert [g.sliding_window for g in groups] == [None] + [1024] * 5
    assert groups[0].layers == tuple(range(5, 48, 6))
    assert groups[1].layers == (0, 1, 2, 3, 4, 6, 7, 8)
    slots = layer_group_slots(groups)
    assert slots[5] == (0, 0) and slots[47] == (0, 7) and slots[0] == (1, 0) and slots[46] == (5, 7)
    # Tensor parallel: the same groups (every rank holds its KV heads of every layer, with rank 0's tables).
    assert LLM.kv_cache_groups(spec.layer_windows, spec.num_layers, 2) == groups
    assert LLM.kv_cache_groups((None,) * 4, 4) is None  # no window: one table, the plain engine
    # Gemma 2 alternates: 2 groups of half the layers; Mistral's window on every layer: 1 sliding group.
    assert [(len(g.layers), g.sliding_window) for g in kv_cache_groups((4, None) * 3, 6)] == [(3, None), (3, 4)]
    assert [(len(g.layers), g.sliding_window) for g in kv_cache_groups((4,) * 3, 3)] == [(3, 4)]


def test_request_blocks_hand_computed():
    # Window 32, blocks of 16: the 32 visible tokens straddle at most cdiv(31, 16) + 1 = 3 blocks.
    assert group_blocks(32, 200, 16) == 3
    assert group_blocks(None, 200, 16) == 13
    assert group_blocks(32, 20, 16) == 2  # a short request: its own blocks
    assert group_blocks(32, 200, 16, chunk_tokens=200) == 13  # a whole-prompt prefill holds every block
    assert group_blocks(32, 200, 16, chunk_tokens=64) == math.ceil((31 + 64) / 16) + 1
    # gemma-3-12b at 4096 tokens: 256 blocks in the full group, 1023 // 16 + 1 + 1 = 65 in each sliding group.
    assert request_blocks((None,) + (1024,) * 5, 4096, 16) == 256 + 5 * 65
    assert largest_request_tokens((None, 32), 13 + 3, 16, 1, 10_000) == 13 * 16
    assert largest_request_tokens((32,), 3, 16, 1, 10_000) == 10_000  # sliding only: any length


@pytest.fixture(scope="module")
def window32():
    """Tiny Gemma 3 (3 sliding layers of window 32, 1 global) and its HF twin."""
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    from family_models import perturb_weights
    cfg = tiny_family_config("gemma3")
    cfg.sliding_window = 32
    return perturb_weights(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())


def test_sliding_groups_hold_the_window_only(window32):
    """Prompt 200, window 32, blocks of 16: after the prefill step (13 blocks in every group), each sliding group
    holds exactly the blocks of positions c - 31 .. c (at most 3), the full group cdiv(c + 1, 16); HF's tokens."""
    llm = LLM.from_hf_model(window32, EngineConfig(device="cpu", block_size=16, max_model_len=512))
    eng = llm.engine
    assert eng.stats().kv_cache_groups == (None, 32, 32, 32)
    assert eng.stats().kv_capacity_tokens == eng.kv.num_blocks * 16 // 4  # a block holds one of the 4 layers
    prompt = make_prompts(3, [200])[0]
    eng.add_request("r", prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    req = eng.requests["r"]
    eng.step()
    assert eng.last_step_stats().group_used_blocks == (13, 13, 13, 13)
    seen = set()
    while eng.has_unfinished_requests():
        c = req.num_computed_tokens  # the position this step computes
        eng.step()
        used = eng.last_step_stats().group_used_blocks
        if not eng.has_unfinished_requests():
            break
        sliding = c // 16 - max(c - 31, 0) // 16 + 1
        assert used == (math.ceil((c + 1) / 16), sliding, sliding, sliding), c
        seen.add(sliding)
        assert eng.kv.num_used_blocks == sum(used)
    assert max(seen) == 3 and eng.stats().num_used_blocks == 0
    assert eng.stats().group_used_blocks == (0, 0, 0, 0)
    expected, gaps = hf_greedy(window32, prompt, 30)
    assert_same_greedy(req.output_token_ids, expected, gaps, "window 32, prompt 200")


def test_block_map_shows_groups(window32):
    llm = LLM.from_hf_model(window32, EngineConfig(device="cpu", block_size=16, max_model_len=128, num_gpu_blocks=64))
    eng = llm.engine
    eng.add_request("r", make_prompts(4, [100])[0], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    eng.step()
    eng.step()
    m = eng.block_map()
    assert m["kv_cache_groups"] == [None, 32, 32, 32]
    tables = m["group_block_tables"]["r"]
    assert len(tables) == 4 and all(len(t) == 7 for t in tables)
    assert tables[1][:4] == [64] * 4  # left the window (position 100 sees 69..100): the null block's id
    for g, t in enumerate(tables):
        assert all(m["block_groups"][b] == g for b in t if b != 64)
    assert m["block_groups"].count(-1) == 64 - 7 - 3 * 3


def _req(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=4), 0.0, ())


def test_prefix_hit_needs_the_windows_blocks():
    """A hit is as long as every group can serve: the sliding group only needs the blocks the window of the first
    token to compute reads; once one of those is evicted, the hit shrinks to where the window is cached again."""
    kv = HybridKVCacheManager(64, 16, True, kv_cache_groups((None, 32), 2), max_chunk_tokens=256)
    full, sliding = kv.groups
    tokens = list(range(100, 200))
    a = _req("a", tokens)
    assert kv.allocate_slots(a, 100, kv.get_computed_blocks(a)[0])
    kv.commit()
    a.num_computed_tokens = 100
    assert kv.allocate_slots(a, 1)  # decoding position 100: blocks 0..3 left the window (100 - 31 = 69 -> block 4)
    assert sliding.block_ids("a")[:4] == [64] * 4 and kv.group_used_blocks() == (7, 3)
    kv.free(a)
    assert kv.num_used_blocks == 0
    b = _req("b", tokens + list(range(300, 320)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 96  # 6 full blocks; the window of position 96 reads 65..96: blocks 4 and 5
    assert [len(h) for h in hits] == [6, 6] and hits[1][:4] == [sliding.null_block] * 4
    # Evict the sliding group's block 4: position 96's window is gone; position 64's (33..64: blocks 2, 3) is cached.
    block4 = hits[1][4]
    kv.pool.uncache_block(block4, block4.block_hash)
    hits, n = kv.get_computed_blocks(b)
    assert n == 64 and hits[1][:2] == [sliding.null_block] * 2 and all(h is not None for h in hits[1])
    assert kv.allocate_slots(b, 120 - 64, hits)
    assert kv.prefix_cache_hits == 64 and sliding.block_ids("b")[:2] == [64, 64]
    kv.commit()
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.group_used_blocks() == (0, 0)


def test_allocation_is_all_groups_or_none():
    kv = HybridKVCacheManager(10, 16, False, kv_cache_groups((None, 32), 2), max_chunk_tokens=256)
    a = _req("a", list(range(90)))
    assert not kv.allocate_slots(a, 90, [])  # 6 + 6 blocks > 10: nothing taken
    assert kv.num_used_blocks == 0 and not kv.req_to_blocks
    assert kv.allocate_slots(a, 64, [])  # a chunk of 64: 4 + 4
    assert kv.group_used_blocks() == (4, 4)
    a.num_computed_tokens = 64
    assert kv.allocate_slots(a, 26)  # 6 full, sliding frees block 0 (64 - 31 = 33 -> block 2: blocks 0, 1) then 2 new
    assert kv.group_used_blocks() == (6, 4)
    assert kv.blocks_needed(90) == 6 + 6 and kv.blocks_needed(1000) == 63 + min(63, (31 + 256 + 15) // 16 + 1)


def _plain(monkeypatch):
    """The one-table engine (every layer keeps every block; sliding layers only mask)."""
    import engine.runner
    monkeypatch.setattr(engine.runner, "engine_kv_groups", lambda *a: None)


@pytest.mark.parametrize("what", ["n3-sampled", "beam", "ngram"])
def test_sharing_beams_and_speculation_match_the_one_table_engine(window32, monkeypatch, what):
    """Forked sequences (copy-on-write), beam search and speculative decoding give the tokens of the engine that
    keeps one table for every layer, with prompts several windows long; the pool ends empty."""
    prompts = make_prompts(5, [90, 41])
    cfg = EngineConfig(device="cpu", block_size=8, max_model_len=256, enable_prefix_caching=True,
                       **({"speculative_method": "ngram", "num_speculative_tokens": 3} if what == "ngram" else {}))
    if what == "ngram":  # repetitive prompts, so the lookup proposes something
        prompts = [(p[:12] * 8)[:90] for p in prompts]

    def go(llm):
        if what == "beam":
            outs = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True))
            return [[c.token_ids for c in o.outputs] for o in outs]
        params = (SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True) if what != "ngram"
                  else SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]

    hybrid = LLM.from_hf_model(window32, cfg)
    assert isinstance(hybrid.engine.kv, HybridKVCacheManager)
    got = go(hybrid)
    assert hybrid.engine.stats().num_used_blocks == 0
    if what == "n3-sampled":
        assert hybrid.engine.stats().num_cow_copies > 0
    if what == "ngram":
        assert hybrid.engine.stats().spec_decode.num_draft_tokens > 0
    _plain(monkeypatch)
    plain = LLM.from_hf_model(window32, cfg)
    assert not isinstance(plain.engine.kv, HybridKVCacheManager)
    assert got == go(plain)


def test_sliding_window_kv_holds_more_requests_in_the_same_memory(window32, monkeypatch):
    """The same memory (64 blocks of all 4 layers = 256 blocks of one group) and 8 requests of 150 tokens: the
    grouped pool holds them all at once, the one-table pool (64 blocks) preempts."""
    prompts = make_prompts(6, [140] * 8)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    base = dict(device="cpu", block_size=16, max_model_len=256, max_num_batched_tokens=256)
    hybrid = LLM.from_hf_model(window32, EngineConfig(**base, num_gpu_blocks=256))
    a = hybrid.generate(prompts, params)
    s = hybrid.engine.stats()
    # 10 blocks of the full group + 3 x 3 of the sliding ones per decoding request: 8 x 19 = 152 <= 256.
    assert s.num_preemptions == 0 and max(st.num_running for st in s.steps) == 8
    _plain(monkeypatch)
    plain = LLM.from_hf_model(window32, EngineConfig(**base, num_gpu_blocks=64))
    b = plain.generate(prompts, params)
    assert plain.engine.stats().num_preemptions > 0  # 8 x 10 blocks > 64
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_planner_capacity_gemma_3_12b_vs_no_window():
    """H200, 4096-token requests, blocks of 16: about the same KV bytes K; a group block is 1 MiB (8 layers x 8 KV heads
    x 256 x 2 (K, V) x 2 bytes x 16 tokens), a one-table block 6 MiB; a request holds 256 + 5 x 65 = 581 group
    blocks or 256 one-table blocks: (K / 1 MiB - 1) // 581 vs (K / 6 MiB - 1) // 256, about 6 x 256 / 581 = 2.64x."""
    from workbench.planner import plan
    spec = LLM.model_spec("gemma-3-12b")
    plain_spec = dataclasses.replace(spec, layer_windows=(None,) * spec.num_layers)
    cfg = EngineConfig(max_model_len=4096, block_size=16)
    a, b = plan(spec, "H200", cfg), plan(plain_spec, "H200", cfg)
    assert a.fits and b.fits
    assert 0 < b.kv_cache_bytes - a.kv_cache_bytes < 8 * 2**20  # 5 more block tables and slot mappings
    mib = 2**20
    assert a.num_gpu_blocks == a.kv_cache_bytes // mib - 1 and b.num_gpu_blocks == b.kv_cache_bytes // (6 * mib) - 1
    assert a.max_concurrent_requests == a.num_gpu_blocks // 581
    assert b.max_concurrent_requests == b.num_gpu_blocks // 256
    assert 2.5 <= a.max_concurrent_requests / b.max_concurrent_requests <= 2.7


def test_planner_capacity_gemma_3_12b_at_tp2():
    """Tensor parallel 2 on H200s: each rank keeps the 6 groups over its 4 of the 8 KV heads, so a group block is
    0.5 MiB and a one-table block 3 MiB; a request still holds 581 group blocks or 256 one-table blocks: the same
    2.6x over the model without windows as at TP=1, and about twice TP=1's requests (half the KV bytes per rank)."""
    from workbench.planner import plan
    spec = LLM.model_spec("gemma-3-12b")
    plain_spec = dataclasses.replace(spec, layer_windows=(None,) * spec.num_layers)
    cfg = EngineConfig(max_model_len=4096, block_size=16)
    a, b = plan(spec, "H200", cfg, tensor_parallel_size=2), plan(plain_spec, "H200", cfg, tensor_parallel_size=2)
    one = plan(spec, "H200", cfg)
    assert a.fits and b.fits and a.tensor_parallel_size == 2
    mib = 2**20
    assert a.num_gpu_blocks == a.kv_cache_bytes // (mib // 2) - 1
    assert b.num_gpu_blocks == b.kv_cache_bytes // (3 * mib) - 1
    assert a.max_concurrent_requests == a.num_gpu_blocks // 581 and b.max_concurrent_requests == b.num_gpu_blocks // 256
    assert 2.5 <= a.max_concurrent_requests / b.max_concurrent_requests <= 2.7
    assert a.max_concurrent_requests > 2 * one.max_concurrent_requests  # the weights are split too: more KV room


def _check_pool(kv):
    """Ref counts equal the owners over every group's tables (null slots aside); free queue = unowned blocks."""
    from collections import Counter
    owners = Counter(b.block_id for m in kv.groups for blocks in m.req_to_blocks.values() for b in blocks
                     if b.block_id < kv.num_blocks)
    free = {b.block_id for b in kv.pool.free_queue}
    for block in kv.pool.blocks:
        assert block.ref_count == owners.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in free)
    assert kv.pool.num_cached_free_blocks == sum(1 for b in kv.pool.cached_blocks.values() if b.ref_count == 0)
    assert kv.group_used_blocks() == tuple(
        len({b.block_id for bl in m.req_to_blocks.values() for b in bl if b.block_id < kv.num_blocks}) for m in kv.groups)
    assert sum(kv.group_used_blocks()) == kv.num_used_blocks


@pytest.mark.parametrize("call,layer", [(0, 0), (2, 2), (4, 3), (6, 1), (7, 0)])
def test_interrupted_step_then_reference_tokens(window32, call, layer):
    """A step interrupted in any layer is rolled back in every group: nothing half-written stays cached, the pool
    is consistent, and the prompts (chunked, sharing a prefix, several windows long) then give the reference."""
    from collections import Counter
    cfg = EngineConfig(device="cpu", block_size=8, max_num_batched_tokens=24, max_model_len=128,
                       enable_prefix_caching=True, num_gpu_blocks=120)
    prompts = make_prompts(7, [70, 20])
    prompts[1] = prompts[0][:48] + prompts[1]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM.from_hf_model(window32, cfg)
    refs = [o.token_ids for o in llm.generate(prompts, greedy)]
    llm.reconfigure(cfg)
    llm.generate([make_prompts(8, [60])[0]], greedy)  # cached blocks holding other KV
    seen = Counter()

    def hook(module, args):
        seen["n"] += 1
        if seen["n"] == call + 1:
            raise KeyboardInterrupt
    handle = llm.model.layers[layer].register_forward_pre_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, greedy)
    finally:
        handle.remove()
    kv = llm.engine.kv
    assert kv.num_used_blocks == 0
    _check_pool(kv)
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == refs
    assert [llm.generate([p], greedy)[0].token_ids for p in prompts] == refs
    assert llm.engine.stats().prefix_cache_hits > 0
    _check_pool(kv)


def _check_tables(kv, running):
    """Every group's table of a request has one length, covers its computed tokens, and a sliding table holds the
    null block exactly in its skipped slots, a real block in every slot the next token's window reads."""
    for req in running:
        rid, c = req.request_id, req.num_computed_tokens
        lengths = {len(m.block_ids(rid)) for m in kv.groups}
        assert len(lengths) == 1 and lengths.pop() * kv.block_size >= c
        for m in kv.sliding:
            ids, skipped = m.block_ids(rid), m.num_skipped.get(rid, 0)
            assert all(b == kv.num_blocks for b in ids[:skipped])
            assert all(b < kv.num_blocks for b in ids[max(skipped, m.first_needed_block(c)):])


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "rollback", "fork", "draft"]),
                              st.integers(0, 3),
                              st.integers(1, 40)), min_size=1, max_size=40))
def test_hybrid_manager_invariants_under_random_schedules(ops):
    """Admissions with prefix hits, chunked prefill, decode, preemption, finishing, rolled-back steps, forks
    (copy-on-write) and speculative slots (allocate_draft_slots, trim), as the scheduler drives them: the pool
    stays consistent, tables stay aligned, and everything returns to the pool."""
    kv = HybridKVCacheManager(48, 4, True, kv_cache_groups((None, 6, 6, 13), 4), max_chunk_tokens=16)
    waiting, running, n = [], [], 0

    def advance(req, num_new):  # the step computed num_new tokens; the last one samples the next token
        req.num_computed_tokens += num_new
        if req.num_computed_tokens == req.num_tokens:
            req.all_token_ids.append(7 + req.num_tokens % 5)
    prefixes = [list(range(10, 30)), list(range(10, 20)) + list(range(50, 60))]
    for op, i, length in ops:
        if op == "add":
            waiting.append(_req(f"r{n}", (prefixes[i % 2] + list(range(100, 140)))[:length]))
            n += 1
        elif op == "fork":  # a decoding request shares its blocks with a new sequence (parallel sampling)
            parents = [r for r in running if r.num_computed_tokens == r.num_tokens - 1]
            if parents:
                parent = parents[i % len(parents)]
                child = _req(f"r{n}", list(parent.all_token_ids))
                n += 1
                kv.fork(parent, child, parent.num_computed_tokens)
                child.num_computed_tokens = parent.num_computed_tokens
                running.append(child)
        elif op == "draft":  # speculative slots for i + 1 proposed tokens, all rejected (no forked sequence drafts)
            for req in running:
                if req.num_computed_tokens == req.num_tokens - 1 and req.request_id not in kv.groups[0].forked:
                    if kv.allocate_draft_slots(req, req.num_tokens + i + 1, keep_free=length % 3):
                        kv.trim(req, req.num_computed_tokens)
        elif op == "rollback":  # as Scheduler.rollback: every running request back to waiting, with no KV
            for req in running:
                kv.free(req)
                req.num_computed_tokens = 0
            waiting[:0], running = running, []
            kv.rollback()
        else:
            for req in list(running):
                num_new = min(req.num_tokens - req.num_computed_tokens, 16)
                if not kv.allocate_slots(req, num_new):
                    kv.free(req)  # preempted
                    req.num_computed_tokens = 0
                    running.remove(req)
                    waiting.insert(0, req)
                    continue
                advance(req, num_new)
                if req.num_tokens > 45:
                    kv.free(req)
                    running.remove(req)
            while waiting:
                req = waiting[0]
                hits, num_hit = kv.get_computed_blocks(req)
                num_new = min(req.num_tokens - num_hit, 16)
                if not kv.allocate_slots(req, num_new, hits):
                    break
                waiting.pop(0)
                req.num_computed_tokens = num_hit
                advance(req, num_new)
                running.append(req)
            kv.commit()
        _check_pool(kv)
        _check_tables(kv, running)
    for req in running:
        kv.free(req)
    assert kv.num_used_blocks == 0 and kv.group_used_blocks() == (0, 0, 0, 0)
    _check_pool(kv)


@pytest.mark.parametrize("evict", [False, True])
def test_prefix_hit_falls_back_when_the_window_was_evicted(window32, evict):
    """A (160-token prompt) finishes; C repeats its prompt plus 20 tokens. Alone, C hits all 10 full blocks (160
    tokens). When B first takes 84 blocks of the 100-block pool, the free queue hands out A's never-used
    blocks, the sliding blocks that left A's window, then A's last sliding blocks (freed tail first): the full
    group still has A's prefix, the sliding groups no longer have its window, so C recomputes. HF's tokens."""
    cfg = EngineConfig(device="cpu", block_size=16, max_model_len=352, max_num_batched_tokens=512,
                       enable_prefix_caching=True, num_gpu_blocks=100)
    llm = LLM.from_hf_model(window32, cfg)
    a, b, c = make_prompts(9, [160, 336, 20])
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([a], greedy)
    if evict:
        llm.generate([b], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        from engine.kv.hashing import hash_request_blocks
        kv = llm.engine.kv
        cached = [[kv.pool.get_cached_block(h) is not None for h in hash_request_blocks(a, 16, [], m.hash_root)]
                  for m in kv.groups]
        assert all(cached[0]) and not all(cached[3][8:10])  # full group: A's prefix; group 3: not its window
    out = llm.generate([a + c], greedy)[0]
    assert out.metrics.num_cached_tokens == (0 if evict else 160)
    expected, gaps = hf_greedy(window32, a + c, 4)
    assert_same_greedy(out.token_ids, expected, gaps, f"evict={evict}")


def test_triton_kernels_read_freed_slots_only_masked(window32):
    """The Triton kernels (interpreter) over per-group tables whose freed slots point at blocks other requests
    reuse: a prefill tile that starts before the window reads them masked, so the tokens equal the torch backend's
    (small pool: blocks are reused; chunked prefill; a shared prefix)."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    prompts = make_prompts(10, [60, 20])
    prompts[1] = prompts[0][:40] + prompts[1]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM.from_hf_model(window32, EngineConfig(
            device="cpu", max_model_len=96, block_size=4, max_num_batched_tokens=16, num_gpu_blocks=80,
            enable_prefix_caching=True, attention_backend=backend))
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.stats().prefix_cache_hits > 0
    assert tokens["triton"] == tokens["torch"]


def test_size_kv_cache_per_group_by_hand():
    """6 groups (1 full, 5 of window 1024), 6 KiB of KV per token over every layer: a block of 16 tokens holds one
    group, 16 KiB. A 4096-token request needs 6 x 256 blocks while its whole prompt is one chunk (the verdict) and
    256 + 5 x 65 = 581 between steps (the requests held at once)."""
    from engine.memory import size_kv_cache
    windows = (None,) + (1024,) * 5
    common = dict(gpu_memory_utilization=1.0, weight_bytes=0, kv_bytes_per_token=6 * 1024, block_size=16,
                  max_model_len=4096, device="cpu", group_windows=windows, chunk_tokens=8192)
    s = size_kv_cache(total_bytes=(10_000 + 1) * 16 * 1024, **common)
    assert s.bytes_per_block == 16 * 1024 and s.num_blocks == 10_000 and s.fits
    assert f"hold {10_000 // 581} requests" in s.reason and "6 KV cache groups" in s.reason
    small = size_kv_cache(total_bytes=(1535 + 1) * 16 * 1024, **common)
    assert not small.fits and "needs 1536 blocks" in small.reason
    chunked = size_kv_cache(total_bytes=(1535 + 1) * 16 * 1024, **{**common, "chunk_tokens": 512})
    assert chunked.fits  # prefilled 512 at a time: 256 + 5 x (cdiv(1023 + 512, 16) + 1) = 741 blocks at most
    assert size_kv_cache(total_bytes=(740 + 1) * 16 * 1024, **{**common, "chunk_tokens": 512}).verdict != "fits"
