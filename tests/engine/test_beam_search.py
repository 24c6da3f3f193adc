"""Beam search of the engine against HF transformers generate(num_beams=W) (float32, CPU).

Tie-aware: the engine's W finished beams must carry HF's W scores, and its best beam must be HF's
best beam unless the two best scores are a tie within float32 rounding.
"""
import copy
from pathlib import Path

import pytest
import torch

from engine import LLM, BeamSearchParams, EngineConfig, SamplingParams

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"
TIE = 1e-4


def hf_beams(model, prompt, width, max_tokens, length_penalty, eos):
    """HF's W beams (output tokens, score), best first; eos None: no end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_tokens, num_beams=width, num_return_sequences=width,
                             do_sample=False, length_penalty=length_penalty, early_stopping=False,
                             eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices != -1).sum(-1).tolist()
    return [(out.sequences[i, len(prompt):len(prompt) + lengths[i]].tolist(), float(out.sequences_scores[i]))
            for i in range(width)]


def engine_score(tokens, cum_logprob, length_penalty):
    return cum_logprob / (len(tokens) ** length_penalty)


def assert_same_beams(ours, theirs, length_penalty, what):
    assert len(ours.outputs) == len(theirs), what
    our_scores = [engine_score(o.token_ids, o.cumulative_logprob, length_penalty) for o in ours.outputs]
    hf_scores = [s for _, s in theirs]
    assert our_scores == sorted(our_scores, reverse=True), f"{what}: beams not best first"
    torch.testing.assert_close(torch.tensor(our_scores), torch.tensor(hf_scores), atol=TIE, rtol=0,
                               msg=f"{what}: beam scores differ from HF's")
    best, hf_best = ours.outputs[0].token_ids, theirs[0][0]
    if best != hf_best:  # only a near-tie may order them differently
        assert abs(hf_scores[0] - hf_scores[1]) < TIE and best in [t for t, _ in theirs], f"{what}: best beam differs"
    for o in ours.outputs:
        assert o.finish_reason in ("stop", "length")


def prompts_for(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def with_eos(model, eos):
    """A copy of the model whose end-of-sequence token is `eos`."""
    model = copy.deepcopy(model)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    return model


LENGTH_PENALTY = {2: 1.0, 4: 0.5, 8: 2.0}


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preemption"])
@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_beam_search_matches_hf(hf_models, kind, width, preempt):
    lp = LENGTH_PENALTY[width]
    max_tokens = 10
    prompts = prompts_for(width, [13, 30, 5, 22, 27, 18, 25, 29] if preempt else [13, 30, 5])
    # EOS: a token the best beam of the second prompt produces, so that some beams finish on it.
    eos = hf_beams(hf_models[kind], prompts[1], width, max_tokens, lp, None)[0][0][-2]
    model = with_eos(hf_models[kind], eos)
    # Without EOS for the first prompt (all beams run to max_tokens), with the model's EOS for the others.
    params = [BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=lp, ignore_eos=i == 0)
              for i in range(len(prompts))]
    bs = 4
    if preempt:
        # The pool holds one request's beams unshared, no more: eight requests preempt each other.
        longest = max(len(p) for p in prompts) + max_tokens
        cfg = dict(num_gpu_blocks=width * -(-longest // bs), max_num_batched_tokens=48)
    else:
        cfg = dict(max_num_batched_tokens=64)
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", block_size=bs, max_model_len=64, **cfg))
    outs = llm.generate(prompts, params)
    for i, (prompt, p, out) in enumerate(zip(prompts, params, outs)):
        theirs = hf_beams(model, prompt, width, max_tokens, lp, None if p.ignore_eos else eos)
        assert_same_beams(out, theirs, lp, f"{kind} W={width} prompt {i}")
    if lp < 1:  # a penalty below 1 favours short beams: some of the best end on EOS
        assert any(o.finish_reason == "stop" and o.token_ids[-1] == eos for o in outs[1].outputs)
    assert all(o.finish_reason == "length" and len(o.token_ids) == max_tokens for o in outs[0].outputs)
    assert outs[0].metrics.num_output_tokens == max_tokens and len(outs[0].metrics.itl) == max_tokens - 1
    stats = llm.engine.stats()
    assert stats.num_used_blocks == 0 and llm.engine.scheduler.num_reserved_seqs == 0
    assert stats.num_cow_copies > 0 and max(s.num_saved_blocks for s in stats.steps) > 0
    if preempt:
        assert stats.num_preemptions > 0
        assert max(s.num_batched_tokens for s in stats.steps) <= 48


def test_beam_search_matches_hf_on_shipped_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True)
    llm = LLM.from_pretrained(SHIPPED, EngineConfig(device="cpu", block_size=8, max_model_len=128),
                              dtype=torch.float32)
    prompts = ["def ", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n']
    params = BeamSearchParams(beam_width=4, max_tokens=16, length_penalty=1.0)
    outs = llm.beam_search(prompts, params)
    eos = model.generation_config.eos_token_id
    for text, out in zip(prompts, outs):
        ids = tokenizer(text).input_ids
        assert out.prompt_token_ids == ids
        assert_same_beams(out, hf_beams(model, ids, 4, 16, 1.0, eos), 1.0, f"shipped {text!r}")
        assert out.text == out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_beam_width_one_is_greedy(hf_models):
    model = hf_models["llama"]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", block_size=8, max_model_len=64))
    prompt = prompts_for(0, [9])[0]
    out = llm.beam_search(prompt, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == greedy.token_ids


def test_bad_beam_requests_are_rejected_before_any_change(hf_models):
    model = hf_models["llama"]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", block_size=8, max_model_len=64, num_gpu_blocks=16,
                                                max_num_seqs=8))
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.beam_search([5, 6], BeamSearchParams(beam_width=9, max_tokens=4))
    with pytest.raises(ValueError, match="KV blocks"):  # 8 beams x 5 blocks > 16
        llm.beam_search([5] * 30, BeamSearchParams(beam_width=8, max_tokens=8))
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats().num_used_blocks == 0
    assert llm.beam_search([5, 6], BeamSearchParams(beam_width=2, max_tokens=3))[0].finished
