"""Greedy outputs of the engine are token-for-token those of HF transformers generate (float32, CPU)."""
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from family_models import assert_case_counters


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_prompts(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def references(hf_models):
    """Prompts of 1..300 tokens with mixed output lengths, and HF's greedy continuation of each."""
    lengths = [1, 7, 16, 33, 120, 300]
    max_tokens = [12, 30, 5, 24, 9, 16]
    refs = {}
    for kind, model in hf_models.items():
        prompts = make_prompts(1, lengths)
        # Two prompts share a 64-token prefix so that prefix caching has something to hit.
        prompts.append(prompts[4][:64] + make_prompts(2, [20])[0])
        mt = max_tokens + [10]
        refs[kind] = [(p, n, hf_greedy(model, p, n)) for p, n in zip(prompts, mt)]
    return refs


def run_engine(model, refs, **cfg):
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", **{"max_model_len": 512, **cfg}))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n, _ in refs]
    outs = llm.generate([p for p, _, _ in refs], params)
    return llm, outs


CASES = {
    "block1": dict(block_size=1, max_num_batched_tokens=2048),
    "block8-no-prefix-cache": dict(block_size=8, enable_prefix_caching=False),
    "block16-prefix-cache": dict(block_size=16, enable_prefix_caching=True),
    "chunked-prefill": dict(block_size=8, max_num_batched_tokens=37),
    # 22 blocks of 16 = 352 slots for 7 requests of up to 316 tokens each: forces preemption.
    "preemption": dict(block_size=16, num_gpu_blocks=22, max_num_batched_tokens=512, max_model_len=352),
}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(hf_models, references, kind, case):
    llm, outs = run_engine(hf_models[kind], references[kind], **CASES[case])
    for (prompt, n, expected), out in zip(references[kind], outs):
        assert out.token_ids == expected, f"{kind}/{case}: prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length" and len(out.token_ids) == n
    stats = llm.engine.stats()
    assert_case_counters(stats, case, 37)
    if case == "chunked-prefill":
        assert any(0 < s.num_prefill_tokens for s in stats.steps[1:])
    if case == "block8-no-prefix-cache":
        assert stats.prefix_cache_hits == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prompt_logits_match_hf(hf_models, kind):
    model = hf_models[kind]
    ids = make_prompts(3, [70])[0]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=128, block_size=16))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.prompt_logits(ids), expected, atol=1e-4, rtol=1e-4)
