"""Parallel sampling (SamplingParams(n=k)): outputs against single requests, and the blocks it shares."""
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams

BS = 4


def prompts_for(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# 1 token (nothing to share), P - 1 a multiple of the block size (no partial block), partial blocks.
LENGTHS = [1, 9, 14, 23]

CASES = {
    "plain": dict(max_num_batched_tokens=256),
    "chunked-prefill": dict(max_num_batched_tokens=7),
    # 4 x 10 blocks for one request's four sequences unshared; four requests at once preempt each other.
    "preemption": dict(num_gpu_blocks=40, max_num_batched_tokens=64),
    "no-prefix-cache": dict(enable_prefix_caching=False),
}


def make_llm(hf_models, kind="llama", **cfg):
    return LLM.from_hf_model(hf_models[kind], EngineConfig(device="cpu", block_size=BS, max_model_len=64, **cfg))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_n_gives_n_copies_of_the_single_output(hf_models, kind, case):
    llm = make_llm(hf_models, kind, **CASES[case])
    prompts = prompts_for(1, LENGTHS)
    single = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    outs = llm.generate(prompts, SamplingParams(n=4, max_tokens=12, temperature=0, ignore_eos=True))
    for one, out in zip(single, outs):
        assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
        for o in out.outputs:
            assert o.token_ids == one.token_ids and o.finish_reason == "length"
        assert out.token_ids == out.outputs[0].token_ids and out.finish_reason == "length"
        # the four greedy sequences have the same cumulative logprob (up to batch-dependent float32 rounding)
        lps = [o.cumulative_logprob for o in out.outputs]
        assert max(lps) - min(lps) < 1e-4 and lps[0] < 0
        assert out.metrics.num_output_tokens == 12 and out.metrics.ttft > 0
    stats = llm.engine.stats()
    assert stats.num_used_blocks == 0 and llm.engine.scheduler.num_reserved_seqs == 0
    if case == "preemption":
        assert stats.num_preemptions > 0
    if case == "chunked-prefill":
        assert max(s.num_batched_tokens for s in stats.steps) <= 7


@pytest.mark.parametrize("case", ["plain", "preemption"])
def test_seeded_n_equals_separate_requests_with_the_sequence_seeds(hf_models, case):
    llm = make_llm(hf_models, **CASES[case])
    prompts = prompts_for(2, [6, 17, 11, 20])
    p = dict(max_tokens=10, temperature=1.0, top_p=0.95, ignore_eos=True)
    outs = llm.generate(prompts, [SamplingParams(n=3, seed=10 * i, **p) for i in range(len(prompts))])
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        separate = llm.generate([prompt] * 3, [SamplingParams(seed=10 * i + j, **p) for j in range(3)])
        assert [o.token_ids for o in out.outputs] == [s.token_ids for s in separate]
    assert len({tuple(o.token_ids) for out in outs for o in out.outputs}) > len(prompts)  # they do differ
    if case == "preemption":
        assert llm.engine.stats().num_preemptions > 0


def expected_blocks(prompt_len, num_computed, n):
    """Distinct blocks of n sequences forked after prompt_len - 1 tokens, each holding num_computed tokens:
    the shared full blocks once, every sequence's own tail (its copy of the partial block included)."""
    shared_full = (prompt_len - 1) // BS
    return shared_full + n * (-(-num_computed // BS) - shared_full)


@pytest.mark.parametrize("prompt_len", [9, 14])
def test_prompt_blocks_are_held_once_and_the_partial_block_copied_on_write(hf_models, prompt_len):
    llm = make_llm(hf_models)
    engine = llm.engine
    prompt = prompts_for(3, [prompt_len])[0]
    engine.add_request("r", prompt, SamplingParams(n=4, max_tokens=8, temperature=0.8, seed=1, ignore_eos=True))
    engine.step()  # the root computes the prompt less its last token; then the siblings fork from it
    tables = engine.block_map()["block_tables"]
    shared = -(-(prompt_len - 1) // BS)
    assert sorted(tables) == ["r#0", "r#1", "r#2", "r#3"] and len({tuple(t) for t in tables.values()}) == 1
    stats = engine.stats()
    assert stats.num_used_blocks == stats.num_shared_blocks == shared and stats.num_saved_blocks == 3 * shared
    assert engine.block_map()["blocks"][tables["r#0"][-1]][0] == 4  # ref count of the last (partial) block
    engine.step()  # each computes the last prompt token (into its own copy of a partial block) and samples
    tables = engine.block_map()["block_tables"]
    full = (prompt_len - 1) // BS
    assert len({tuple(t[:full]) for t in tables.values()}) == 1  # the full prompt blocks: one copy
    partial = (prompt_len - 1) % BS != 0
    stats = engine.stats()
    assert stats.num_cow_copies == (3 if partial else 0)
    assert stats.num_used_blocks == expected_blocks(prompt_len, prompt_len, 4)
    assert stats.num_shared_blocks == full and stats.num_saved_blocks == 3 * full
    while engine.has_unfinished_requests():
        out = engine.step()
        used = engine.stats().num_used_blocks
        if engine.has_unfinished_requests():
            computed = prompt_len + len(engine.requests["r"].seqs[0].output_token_ids) - 1
            assert used == expected_blocks(prompt_len, computed, 4)
    assert len(out) == 1 and len(out[0].outputs) == 4 and engine.stats().num_used_blocks == 0
    # without sharing: four prompts and four outputs
    peak = max(s.num_used_blocks for s in engine.stats().steps)
    assert peak < 4 * -(-(prompt_len + 7) // BS)


def test_best_of_returns_the_n_most_likely(hf_models):
    llm = make_llm(hf_models)
    prompt = prompts_for(4, [10])[0]
    out = llm.generate([prompt], SamplingParams(n=2, best_of=5, max_tokens=6, temperature=1.0, seed=3,
                                                ignore_eos=True))[0]
    every = llm.generate([prompt], SamplingParams(n=5, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True))[0]
    ranked = sorted(every.outputs, key=lambda o: o.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ranked[:2]]


def test_cumulative_logprob_is_the_sum_of_the_model_logprobs(hf_models):
    llm = make_llm(hf_models)
    prompt = prompts_for(5, [7])[0]
    out = llm.generate([prompt], SamplingParams(n=2, max_tokens=5, temperature=1.0, seed=0, ignore_eos=True))[0]
    for o in out.outputs:
        logits = llm.prompt_logits(prompt + o.token_ids[:-1])[len(prompt) - 1:]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(o.token_ids)[:, None]).sum()
        assert abs(o.cumulative_logprob - float(expected)) < 1e-3


def test_abort_returns_every_block_and_seat(hf_models):
    llm = make_llm(hf_models)
    engine = llm.engine
    engine.add_request("a", prompts_for(6, [13])[0], SamplingParams(n=3, max_tokens=20, ignore_eos=True))
    engine.add_request("b", prompts_for(7, [5])[0], SamplingParams(n=3, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort_request("a")
    assert out.request_id == "a" and len(out.outputs) == 3
    assert engine.abort_request("b").finished  # b: still in its root phase or just forked
    assert not engine.has_unfinished_requests() and engine.stats().num_used_blocks == 0
    assert engine.scheduler.num_reserved_seqs == 0 and not engine.requests


def test_bad_n_is_rejected_before_any_change(hf_models):
    llm = make_llm(hf_models, max_num_seqs=4, num_gpu_blocks=20)
    with pytest.raises(ValueError, match="n=0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate([[5, 6]], SamplingParams(n=5))
    with pytest.raises(ValueError, match="KV blocks"):  # 4 x 6 blocks > 20
        llm.generate([[5] * 16], SamplingParams(n=4, max_tokens=8))
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().num_used_blocks == 0
    assert len(llm.generate([[5, 6]], SamplingParams(n=4, max_tokens=3))[0].outputs) == 4


def test_sequences_that_stop_early_finish_alone(hf_models):
    """Stop tokens end the sequences of one request at different steps; each equals its separate request."""
    llm = make_llm(hf_models)
    prompt = prompts_for(8, [11])[0]
    stops = tuple(range(3, 512, 9))  # about one token in nine ends a sequence
    p = dict(max_tokens=16, temperature=1.0, stop_token_ids=stops)
    out = llm.generate([prompt], SamplingParams(n=4, seed=40, **p))[0]
    separate = llm.generate([prompt] * 4, [SamplingParams(seed=40 + j, **p) for j in range(4)])
    assert [(o.token_ids, o.finish_reason) for o in out.outputs] == [(s.token_ids, s.finish_reason) for s in separate]
    assert len({len(o.token_ids) for o in out.outputs}) > 1 and "stop" in {o.finish_reason for o in out.outputs}
    assert out.metrics.num_output_tokens == max(len(o.token_ids) for o in out.outputs)
    assert llm.engine.stats().num_used_blocks == 0
