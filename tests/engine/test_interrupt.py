"""Exception and KeyboardInterrupt safety: a failed step is rolled back, nothing it half-wrote is ever served
from the prefix cache, and the same prompt then gives the tokens of an engine that was never interrupted.

The shipped model (trained, so greedy choices are well separated) with small blocks and a small token budget:
a prompt is prefilled over several chunked steps, so an interruption can land in any step and any layer.
"""
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, EngineConfig, SamplingParams

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"
CONFIG = EngineConfig(device="cpu", block_size=4, max_num_batched_tokens=16, max_model_len=128, num_gpu_blocks=40)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(100, 140)), list(range(100, 120)) + list(range(300, 320))]  # 40 tokens: 10 blocks each


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def llm():
    return LLM.from_pretrained(MODEL_DIR, CONFIG)


@pytest.fixture(scope="module")
def reference(llm):
    """Tokens of each prompt alone from a fresh engine, and how many forward passes each layer ran."""
    llm.reconfigure(CONFIG)
    counter = Counter()
    hook = llm.model.layers[0].register_forward_pre_hook(lambda *a: counter.update(["calls"]))
    try:
        refs = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        hook.remove()
    return refs, counter["calls"]


def check_pool(engine):
    """Ref counts equal block-table owners; the free queue holds exactly the unowned blocks; no request left."""
    kv = engine.kv
    owners = Counter(b.block_id for blocks in kv.req_to_blocks.values() for b in blocks)
    free = {b.block_id for b in kv.pool.free_queue}
    for block in kv.pool.blocks:
        assert block.ref_count == owners.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in free)
    assert kv.pool.num_cached_free_blocks == sum(1 for b in kv.pool.cached_blocks.values() if b.ref_count == 0)
    assert all(b.block_hash == h for h, b in kv.pool.cached_blocks.items())


def step_until_interrupted(llm, call: int, layer: int, keyboard: bool, keep) -> dict:
    """Step llm's engine until a KeyboardInterrupt (or an injected error) raised at `layer` of forward call
    `call` propagates (the test fails if it does not); returns {request_id: keep(output)} of what finished."""
    exc = KeyboardInterrupt() if keyboard else Injected("device lost")
    hook, outs, eng = interrupt_at(llm, call, layer, exc), {}, llm.engine
    try:
        with pytest.raises(type(exc)):
            while eng.has_unfinished_requests():
                outs.update((o.request_id, keep(o)) for o in eng.step())
    finally:
        hook.remove()
    return outs


def interrupt_at(llm, call: int, layer: int, exc):
    """A hook that raises `exc` when `layer` runs for the call-th time (counting from 0)."""
    seen = Counter()

    def hook(module, args):
        seen["n"] += 1
        if seen["n"] == call + 1:
            raise exc
    return llm.model.layers[layer].register_forward_pre_hook(hook)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layer=st.integers(0, 5), keyboard=st.booleans(), caching_first=st.booleans())
def test_generate_after_interruption_gives_reference_tokens(llm, reference, data, layer, keyboard, caching_first):
    refs, num_calls = reference
    call = data.draw(st.integers(0, num_calls - 1), label="forward call")
    llm.reconfigure(CONFIG)
    if caching_first:  # blocks that hold someone else's KV, to make a wrongly served block visible
        llm.generate([list(range(500, 540))], GREEDY)
    exc = KeyboardInterrupt() if keyboard else Injected("device lost")
    hook = interrupt_at(llm, call, layer, exc)
    try:
        with pytest.raises(type(exc)):
            llm.generate(PROMPTS, GREEDY)
    finally:
        hook.remove()
    eng = llm.engine
    assert not eng.has_unfinished_requests() and eng.kv.num_used_blocks == 0
    check_pool(eng)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == refs
    assert [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == refs
    assert eng.kv.num_used_blocks == 0
    check_pool(eng)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layer=st.integers(0, 5), keyboard=st.booleans())
def test_step_api_continues_after_interruption(llm, reference, data, layer, keyboard):
    """The step API: the interrupted step's requests wait to be recomputed and finish with the reference tokens."""
    refs, num_calls = reference
    call = data.draw(st.integers(0, num_calls - 1), label="forward call")
    llm.reconfigure(CONFIG)
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, GREEDY)
    outs = step_until_interrupted(llm, call, layer, keyboard, lambda o: o)
    check_pool(eng)
    # Nothing of the failed step is cached: every cached block's tokens give the reference KV below.
    while eng.has_unfinished_requests() or len(outs) < len(PROMPTS):
        outs.update((o.request_id, o) for o in eng.step())
    assert [outs[f"r{i}"].token_ids for i in range(len(PROMPTS))] == refs
    assert eng.kv.num_used_blocks == 0
    check_pool(eng)


def test_failed_step_registers_no_block_in_the_prefix_cache(llm, reference):
    """A prefill that fails in its first step leaves the cache exactly as it was before the step."""
    llm.reconfigure(CONFIG)
    eng = llm.engine
    before = dict(eng.kv.pool.cached_blocks)
    hook = interrupt_at(llm, 0, 3, KeyboardInterrupt())
    try:
        eng.add_request("a", PROMPTS[0], GREEDY)
        with pytest.raises(KeyboardInterrupt):
            eng.step()
    finally:
        hook.remove()
    assert eng.kv.pool.cached_blocks == before and eng.kv.num_used_blocks == 0
    assert [r.request_id for r in eng.scheduler.waiting] == ["a"] and not eng.scheduler.running
    assert eng.stats().num_preemptions == 0  # a rollback is not a preemption
    eng.abort_request("a")


def test_requests_finished_by_a_failed_step_are_returned_by_the_next(llm, reference, monkeypatch):
    """An interruption after the step finished some requests: none is dropped, the next step returns them."""
    refs, _ = reference
    llm.reconfigure(CONFIG)
    eng = llm.engine
    eng.add_request("a", PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    update = eng.scheduler.update_from_output

    def update_then_fail(*args):
        update(*args)
        raise KeyboardInterrupt
    outs = []
    while not outs:
        if eng.scheduler.running and eng.scheduler.running[0].num_computed_tokens + 16 >= len(PROMPTS[0]):
            monkeypatch.setattr(eng.scheduler, "update_from_output", update_then_fail)
            with pytest.raises(KeyboardInterrupt):
                eng.step()
            monkeypatch.undo()
        outs = eng.step()
    assert [o.request_id for o in outs] == ["a"] and outs[0].finished and outs[0].token_ids == refs[0][:1]
    assert not eng.has_unfinished_requests() and eng.kv.num_used_blocks == 0 and eng.step() == []
    check_pool(eng)


# ----- sequence groups (parallel sampling, beam search): forks, copies-on-write, seats -----------------------
GROUP_CONFIG = EngineConfig(device="cpu", block_size=4, max_num_batched_tokens=16, max_model_len=48,
                            num_gpu_blocks=22)
# Forks with a partly filled shared block (15 and 17 tokens), and a plain request that makes the pool preempt.
GROUP_PROMPTS = [list(range(100, 115)), list(range(100, 106)) + list(range(300, 311)), list(range(200, 230))]


def group_params():
    from engine import BeamSearchParams
    return [SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
            BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]


def run_groups(engine, outs):
    while engine.has_unfinished_requests() or len(outs) < len(GROUP_PROMPTS):
        outs.update((o.request_id, [c.token_ids for c in o.outputs]) for o in engine.step())
    return [outs[f"g{i}"] for i in range(len(GROUP_PROMPTS))]


@pytest.fixture(scope="module")
def group_reference(llm):
    """Each group's completions from an engine never interrupted, and the forward passes of layer 0."""
    llm.reconfigure(GROUP_CONFIG)
    eng = llm.engine
    for i, (p, params) in enumerate(zip(GROUP_PROMPTS, group_params())):
        eng.add_request(f"g{i}", p, params)
    counter = Counter()
    hook = llm.model.layers[0].register_forward_pre_hook(lambda *a: counter.update(["calls"]))
    try:
        refs = run_groups(eng, {})
    finally:
        hook.remove()
    stats = eng.stats()
    assert stats.num_cow_copies > 0 and stats.num_preemptions > 0  # the failures below land amid both
    return refs, counter["calls"]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layer=st.integers(0, 5), keyboard=st.booleans())
def test_groups_continue_after_interruption(llm, group_reference, data, layer, keyboard):
    """A step of forked sequences fails: no block leaks, ref counts hold, no seat stays reserved, no half-written
    block is served, and the groups then finish with the completions of an engine never interrupted."""
    refs, num_calls = group_reference
    call = data.draw(st.integers(0, num_calls - 1), label="forward call")
    llm.reconfigure(GROUP_CONFIG)
    eng = llm.engine
    for i, (p, params) in enumerate(zip(GROUP_PROMPTS, group_params())):
        eng.add_request(f"g{i}", p, params)
    outs = step_until_interrupted(llm, call, layer, keyboard, lambda o: [c.token_ids for c in o.outputs])
    check_pool(eng)
    sched = eng.scheduler
    assert sched.num_reserved_seqs == sum(g.reserved for g in eng.groups.groups.values()) == 0
    assert set(eng.kv.req_to_blocks) <= {r.request_id for r in sched.running}
    assert not eng.kv.pending_copies
    assert run_groups(eng, outs) == refs
    assert eng.kv.num_used_blocks == 0 and sched.num_reserved_seqs == 0 and not eng.groups.groups
    check_pool(eng)


@pytest.mark.parametrize("where", ["update", "record"])
def test_groups_finished_by_a_failed_step_are_returned_by_the_next(llm, group_reference, monkeypatch, where):
    """The step that finishes a group fails afterwards (its sequences' last tokens appended, or the group complete):
    the next step returns the group once, with the completions of an engine never interrupted."""
    refs, _ = group_reference
    llm.reconfigure(GROUP_CONFIG)
    eng = llm.engine
    for i, (p, params) in enumerate(zip(GROUP_PROMPTS, group_params())):
        eng.add_request(f"g{i}", p, params)
    target = eng.scheduler if where == "update" else eng
    name = "update_from_output" if where == "update" else "_record_step"
    original = getattr(target, name)
    failed = []

    def g0_finishes_in_this_step():
        group = eng.groups.groups.get("g0")
        if where == "update":  # its sequences all finished, the group not yet
            return group is not None and all(s.status.finished for s in group.seqs)
        return any(g.request_id == "g0" for g in eng.groups.finished_in_step)

    def call_then_fail(*args):
        result = original(*args)
        if not failed and g0_finishes_in_this_step():
            failed.append(True)
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(target, name, call_then_fail)
    outs, delivered = {}, []
    for _ in range(500):
        if not eng.has_unfinished_requests() and len(outs) == len(GROUP_PROMPTS):
            break
        try:
            step = eng.step()
        except KeyboardInterrupt:
            check_pool(eng)
            continue
        delivered += [o.request_id for o in step]
        outs.update((o.request_id, [c.token_ids for c in o.outputs]) for o in step)
    assert failed and sorted(delivered) == sorted(outs) == ["g0", "g1", "g2"]
    assert [outs[f"g{i}"] for i in range(len(GROUP_PROMPTS))] == refs
    assert eng.kv.num_used_blocks == 0 and eng.scheduler.num_reserved_seqs == 0 and eng.step() == []
    check_pool(eng)
