"""Async scheduling (engine/async_step.py) on the CPU: the same bookkeeping as on CUDA (placeholders, the device-side
token feed, stops found one step late). Outputs must be those of synchronous steps (and of HF transformers), with no
request dropped or duplicated, no token after a stop, and every KV block back in the pool at the end."""
from collections import Counter

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.config import ConfigError
from engine.sampling import BeamSearchParams
from test_hf_parity import CASES, hf_greedy, make_prompts


def engine_for(model, async_scheduling, **cfg):
    return LLM.from_hf_model(model, EngineConfig(device="cpu", async_scheduling=async_scheduling,
                                                 **{"max_model_len": 512, **cfg}))


def check_clean(llm):
    """No request left, nothing in flight, every block free and the counters consistent."""
    eng = llm.engine
    st = eng.stats()
    assert not eng.has_unfinished_requests() and not eng._inflight
    assert st.num_free_blocks == st.num_gpu_blocks and st.num_used_blocks == 0
    assert not eng.kv.req_to_blocks and not eng.runner.rows
    return st


def _step_until_interrupted(eng, layer, nth: int, outs: dict) -> None:
    """Step eng (collecting finished outputs into outs) until the nth forward pass through `layer` raises
    KeyboardInterrupt, which the caller expects to happen."""
    seen = Counter()

    def hook(module, args):
        seen["n"] += 1
        if seen["n"] == nth:
            raise KeyboardInterrupt
    handle = layer.register_forward_pre_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            while eng.has_unfinished_requests():
                outs.update((o.request_id, o) for o in eng.step())
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def hf_refs(hf_models):
    lengths, max_tokens = [1, 7, 16, 33, 120, 300], [12, 30, 5, 24, 9, 16]
    prompts = make_prompts(1, lengths)
    prompts.append(prompts[4][:64] + make_prompts(2, [20])[0])  # a shared 64-token prefix
    return [(p, n, hf_greedy(hf_models["llama"], p, n)) for p, n in zip(prompts, max_tokens + [10])]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(hf_models, hf_refs, case):
    llm = engine_for(hf_models["llama"], True, **CASES[case])
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n, _ in hf_refs]
    outs = llm.generate([p for p, _, _ in hf_refs], params)
    for (prompt, n, expected), out in zip(hf_refs, outs):
        assert out.token_ids == expected, f"{case}: prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length" and out.metrics.num_output_tokens == n
    st = check_clean(llm)
    assert st.async_scheduling and all(s.async_scheduling for s in st.steps)
    assert st.num_generation_tokens == sum(n for _, n, _ in hf_refs)
    if case == "preemption":
        assert st.num_preemptions > 0
    if CASES[case].get("enable_prefix_caching", True):
        assert st.prefix_cache_hits > 0


def run_both(model, prompts, params, **cfg):
    """Outputs of synchronous and async engines over the same prompts, and the async engine's stats."""
    outs = {}
    for mode in (False, True):
        llm = engine_for(model, mode, **cfg)
        outs[mode] = llm.generate(prompts, params)
        st = check_clean(llm)
    return outs[False], outs[True], st


def test_stop_tokens_end_requests_one_step_late_without_an_extra_token(hf_models):
    model = hf_models["llama"]
    prompts = make_prompts(3, [5, 12, 40, 3, 64, 17])
    free_run = engine_for(model, False, block_size=4).generate(
        prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    # Each request stops at a token its free run produces at position 2 + i (EOS-like, one per request).
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[o.token_ids[2 + i]])
              for i, o in enumerate(free_run)]
    sync, asyn, st = run_both(model, prompts, params, block_size=4, max_num_batched_tokens=48)
    for s, a, free in zip(sync, asyn, free_run):
        assert a.token_ids == s.token_ids and a.finish_reason == s.finish_reason == "stop"
        stop = a.token_ids[-1]
        assert a.token_ids == free.token_ids[:free.token_ids.index(stop) + 1]  # nothing after the stop token
        assert a.metrics.num_output_tokens == len(a.token_ids)
    assert sum(s.num_discarded_tokens for s in st.steps) > 0  # found one step late, and dropped
    assert st.num_generation_tokens == sum(len(a.token_ids) for a in asyn)


def test_seeded_sampling_and_logprobs_match_sync(hf_models):
    prompts = make_prompts(4, [9, 30, 2, 50, 21])
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.9, top_p=0.9, top_k=40 if i % 2 else -1, seed=i,
                             logprobs=2 if i == 1 else None, stop_token_ids=[7, 11]) for i in range(5)]
    sync, asyn, _ = run_both(hf_models["llama"], prompts, params, block_size=8, max_num_batched_tokens=40)
    for s, a in zip(sync, asyn):
        assert a.token_ids == s.token_ids and a.finish_reason == s.finish_reason
    lp_s, lp_a = sync[1].token_ids, asyn[1].token_ids
    assert [t.logprob for t in lp_a] == pytest.approx([t.logprob for t in lp_s])
    assert asyn[1].outputs[0].cumulative_logprob == pytest.approx(sync[1].outputs[0].cumulative_logprob)


def drive(llm, arrivals, abort_at):
    """Step the engine, adding arrivals[step] = [(request_id, prompt, params)] before that step and aborting
    abort_at[step] = [request_id]; returns {request_id: output} (each request returned exactly once)."""
    eng, outs, step, returned = llm.engine, {}, 0, Counter()
    while step <= max(arrivals) or eng.has_unfinished_requests():
        for rid, prompt, params in arrivals.get(step, []):
            eng.add_request(rid, prompt, params)
        for rid in abort_at.get(step, []):
            out = eng.abort_request(rid)
            if out is not None:
                outs[rid] = out
                returned[rid] += 1
        for out in eng.step():
            outs[out.request_id] = out
            returned[out.request_id] += 1
        step += 1
        assert step < 500
    assert all(c == 1 for c in returned.values()), returned
    return outs


def test_arrivals_between_steps_abort_and_preemption(hf_models):
    model = hf_models["llama"]
    lengths = [3, 40, 17, 90, 5, 60, 33, 8, 120, 11]
    prompts = make_prompts(5, lengths)
    arrivals = {}
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=4 + (i * 5) % 17, temperature=0.0, ignore_eos=True,
                                stop_token_ids=[5] if i % 3 == 0 else [])
        arrivals.setdefault((i * 3) % 11, []).append((f"r{i}", p, params))
    abort_at = {6: ["r2"], 9: ["r8", "nope"]}
    # A small pool (12 blocks of 16) and budget: chunked prefill and preemption while requests keep arriving.
    cfg = dict(block_size=16, num_gpu_blocks=14, max_num_batched_tokens=32, max_model_len=224)
    results = {}
    for mode in (False, True):
        llm = engine_for(model, mode, **cfg)
        results[mode] = drive(llm, arrivals, abort_at)
        st = check_clean(llm)
        if mode:
            assert st.num_preemptions > 0
    sync, asyn = results[False], results[True]
    assert set(sync) == set(asyn) == {f"r{i}" for i in range(len(prompts))}
    for rid in sync:
        if rid in ("r2", "r8"):  # aborted: a prefix of what the request produces (async may lag by one token)
            short, long = sorted((sync[rid].token_ids, asyn[rid].token_ids), key=len)
            assert long[:len(short)] == short
            continue
        assert asyn[rid].token_ids == sync[rid].token_ids, rid
        assert asyn[rid].finish_reason == sync[rid].finish_reason


def test_interrupted_step_is_rolled_back_and_outputs_stay_exact(hf_models):
    model = hf_models["llama"]
    prompts = make_prompts(6, [5, 30, 18, 44])
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, stop_token_ids=[9]) for n in (3, 10, 6, 8)]
    cfg = dict(block_size=4, max_num_batched_tokens=24)
    reference = [o.token_ids for o in engine_for(model, False, **cfg).generate(prompts, params)]
    for call in range(1, 10, 2):
        llm = engine_for(model, True, **cfg)
        eng, outs = llm.engine, {}
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params[i])
        _step_until_interrupted(eng, llm.model.layers[1], call + 1, outs)
        assert not eng._inflight and all(r.num_output_placeholders == 0 for r in eng.requests.values())
        while eng.has_unfinished_requests():
            for o in eng.step():
                assert o.request_id not in outs
                outs[o.request_id] = o
        assert [outs[f"r{i}"].token_ids for i in range(len(prompts))] == reference, call
        check_clean(llm)


@pytest.mark.parametrize("where, call", [("update", c) for c in (0, 2, 4, 7)] + [("output", c) for c in range(4)])
def test_failure_while_processing_outputs_delivers_each_request_once(hf_models, monkeypatch, call, where):
    """An exception while the previous step's outputs are applied (a KeyboardInterrupt after the scheduler's update,
    or while the finished requests' outputs are built): the requests it finished come back from the next step, once,
    and the others are recomputed to the same tokens."""
    model = hf_models["llama"]
    prompts = make_prompts(10, [4, 22, 9, 35])
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (2, 7, 2, 9)]
    reference = [o.token_ids for o in engine_for(model, False, block_size=4).generate(prompts, params)]
    llm = engine_for(model, True, block_size=4)
    eng, outs, calls = llm.engine, {}, Counter()
    target = eng.scheduler if where == "update" else eng
    name = "update_from_async_output" if where == "update" else "_output"
    real = getattr(target, name)

    def call_then_fail(*args):
        result = real(*args)
        calls["n"] += 1
        if calls["n"] == call + 1:
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(target, name, call_then_fail)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params[i])
    with pytest.raises(KeyboardInterrupt):
        while eng.has_unfinished_requests():
            outs.update((o.request_id, o) for o in eng.step())
    assert not eng._inflight and all(r.num_output_placeholders == 0 for r in eng.requests.values())
    while eng.has_unfinished_requests() or eng._undelivered:
        for o in eng.step():
            assert o.request_id not in outs
            outs[o.request_id] = o
    assert [outs[f"r{i}"].token_ids for i in range(len(prompts))] == reference
    check_clean(llm)


def test_step_timeline_of_async_steps(hf_models):
    llm = engine_for(hf_models["llama"], True, block_size=8)
    llm.generate(make_prompts(7, [10, 20, 30]), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    st = llm.engine.stats()
    for s in st.steps:
        assert s.async_scheduling
        phases = s.schedule_time + s.prepare_time + s.launch_time + s.sample_time + s.output_time
        assert phases == pytest.approx(s.duration, abs=1e-6)
        assert 0 <= s.token_wait_time <= s.output_time + 1e-9
        assert s.hidden_host_time == 0.0  # torch on the CPU is synchronous: nothing is hidden
    assert st.num_steps == 12  # a prefill step then 11 decodes (the 12th token is capped: nothing scheduled past it)


def test_allocator_trim_waits_until_the_previous_steps_tokens_are_processed(hf_models, monkeypatch):
    """A trim empties the allocator's cache, which waits for the device: run between launching step N+1 and
    processing step N, it would hold N's tokens (and their timestamps) back until N+1 ended. So each launched
    step's trim comes after the step before it was processed: one step in flight, and every request already
    holding the tokens of the steps before."""
    llm = engine_for(hf_models["llama"], True, block_size=8)
    eng = llm.engine
    seen = []

    def trim(shape=None):
        seen.append((len(eng._inflight), sum(len(r.output_token_ids) for r in eng.requests.values()), shape))
        return False
    monkeypatch.setattr(eng.runner, "trim_reserved", trim)
    outs = llm.generate(make_prompts(8, [10, 20]), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    assert len(seen) == eng.stats().num_steps and all(inflight == 1 for inflight, _, _ in seen[:-1])
    # Step k's trim sees the tokens of steps 1..k-1 applied: 2 requests x (k - 1).
    assert [tokens for _, tokens, _ in seen[:-1]] == [2 * k for k in range(len(seen) - 1)]
    assert seen[0][2] == (30, 2, 2)  # (tokens, sequences, logit rows) of the prefill step, no padding on the CPU


def test_device_gaps_are_the_idle_time_between_forward_passes():
    from engine.stats import StepStats
    from engine.timeline import device_gaps

    def step(device_start, device_time):
        s = StepStats(*([0] * 20))
        s.device_start, s.device_time = device_start, device_time
        return s
    gaps = device_gaps([step(1.0, 0.5), step(1.5, 0.25), step(2.0, 0.1), step(float("nan"), 0.1)])
    assert gaps[:2] == [0.0, 0.25] and gaps[2] != gaps[2]


def test_config_validation_and_unsupported_requests(hf_models):
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    with pytest.raises(ConfigError, match="async_scheduling=True is not allowed.*speculative"):
        EngineConfig(async_scheduling=True, speculative_method="ngram")
    with pytest.raises(ConfigError, match="async_scheduling=True is not allowed.*tensor_parallel_size"):
        EngineConfig(async_scheduling=True, tensor_parallel_size=2)
    assert EngineConfig(async_scheduling=False).async_scheduling is False
    assert not engine_for(hf_models["llama"], None).engine.async_scheduling  # auto: CUDA only
    llm = engine_for(hf_models["llama"], True)
    eng = llm.engine
    prompt = make_prompts(8, [6])[0]
    for params in (SamplingParams(n=2, max_tokens=3), BeamSearchParams(beam_width=2, max_tokens=3)):
        with pytest.raises(ValueError, match="async_scheduling=True"):
            eng.add_request("g", prompt, params)
    with pytest.raises(ValueError, match="async_scheduling"):
        eng.set_proposer(object())
    assert not eng.has_unfinished_requests()
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_sequence_groups_fall_back_to_synchronous_steps(hf_models):
    """Auto mode (forced on here as on CUDA): a request of several sequences drains the pipeline and runs
    synchronous steps; plain requests next to it keep their outputs."""
    model = hf_models["llama"]
    prompts = make_prompts(9, [7, 25])
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in engine_for(model, False).generate(prompts, greedy)]
    llm = engine_for(model, None)
    eng = llm.engine
    eng.async_scheduling = True  # what auto resolves to on CUDA
    eng.add_request("a", prompts[0], greedy)
    eng.step()
    eng.step()
    assert eng._inflight
    eng.add_request("g", prompts[1], SamplingParams(n=2, max_tokens=4, temperature=0.0, ignore_eos=True))
    outs = {}
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o) for o in eng.step())
    assert outs["a"].token_ids == reference[0]
    assert [c.token_ids for c in outs["g"].outputs] == [reference[1][:4]] * 2
    check_clean(llm)


@pytest.mark.parametrize("call", [1, 2, 3, 5])
def test_interruption_while_groups_run_synchronously_in_auto_mode(hf_models, call):
    """Auto mode (forced on as on CUDA) with a request of several sequences: steps are synchronous, and a failed
    one is rolled back as such (groups re-enter whole), after the async steps before it were drained."""
    model = hf_models["llama"]
    prompts = make_prompts(11, [9, 21, 14])
    plain = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    group = SamplingParams(n=2, max_tokens=5, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in engine_for(model, False).generate(prompts, plain)]
    llm = engine_for(model, None, block_size=4)
    eng, outs = llm.engine, {}
    eng.async_scheduling = True  # what auto resolves to on CUDA
    eng.add_request("a", prompts[0], plain)
    outs.update((o.request_id, o) for o in eng.step())
    eng.add_request("b", prompts[2], plain)
    outs.update((o.request_id, o) for o in eng.step())
    eng.add_request("g", prompts[1], group)
    _step_until_interrupted(eng, llm.model.layers[0], call + 1, outs)
    while eng.has_unfinished_requests() or eng._undelivered:
        for o in eng.step():
            assert o.request_id not in outs
            outs[o.request_id] = o
    assert outs["a"].token_ids == reference[0] and outs["b"].token_ids == reference[2]
    assert [c.token_ids for c in outs["g"].outputs] == [reference[1][:5]] * 2
    check_clean(llm)


def test_group_finished_by_a_failed_synchronous_step_is_returned_once_in_auto_mode(hf_models, monkeypatch):
    """The synchronous step (auto mode's fallback) that finishes a group's sequences fails after its update: the
    next step returns the group once, whole (the groups' own rollback, not the async one)."""
    model = hf_models["llama"]
    prompts = make_prompts(12, [9, 21])
    plain = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in engine_for(model, False).generate(prompts, plain)]
    llm = engine_for(model, None, block_size=4)
    eng, outs, delivered, failed = llm.engine, {}, [], []
    eng.async_scheduling = True  # what auto resolves to on CUDA
    eng.add_request("a", prompts[0], plain)
    eng.step()
    eng.add_request("g", prompts[1], SamplingParams(n=3, max_tokens=4, temperature=0.0, ignore_eos=True))
    original = eng.scheduler.update_from_output

    def update_then_fail(*args):
        result = original(*args)
        group = eng.groups.groups.get("g")
        if not failed and group is not None and group.seqs and all(s.status.finished for s in group.seqs):
            failed.append(True)
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(eng.scheduler, "update_from_output", update_then_fail)
    for _ in range(200):
        if not eng.has_unfinished_requests() and not eng._undelivered:
            break
        try:
            step = eng.step()
        except KeyboardInterrupt:
            continue
        delivered += [o.request_id for o in step]
        outs.update((o.request_id, o) for o in step)
    assert failed and sorted(delivered) == ["a", "g"]
    assert outs["a"].token_ids == reference[0]
    assert [c.token_ids for c in outs["g"].outputs] == [reference[1][:4]] * 3
    check_clean(llm)


def test_request_preempted_with_its_last_token_in_flight_finishes_in_the_queue(hf_models):
    """A (admitted first) needs a new block while B (the tail, its last token in flight) holds the other: B is
    preempted with a placeholder, its token arrives while it waits, and it finishes from the waiting queue."""
    model = hf_models["llama"]
    pa, pb = make_prompts(14, [3, 3])
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)]
    reference = [o.token_ids for o in engine_for(model, False, block_size=4).generate([pa, pb], params)]
    llm = engine_for(model, True, block_size=4, num_gpu_blocks=2, max_model_len=8)
    eng, outs = llm.engine, {}
    eng.add_request("A", pa, params[0])
    eng.add_request("B", pb, params[1])
    eng.step()
    eng.step()
    assert [r.request_id for r in eng.scheduler.running] == ["A", "B"]
    outs.update((o.request_id, o) for o in eng.step())  # schedules A, preempting B; then B's last token arrives
    assert "B" in outs and outs["B"].finish_reason == "length" and eng.scheduler.num_preemptions == 1
    assert not eng.scheduler.waiting
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o) for o in eng.step())
    assert [outs["A"].token_ids, outs["B"].token_ids] == reference
    check_clean(llm)
