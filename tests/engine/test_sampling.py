"""The sampler against hand-computed distributions; seeds, stops and EOS through the engine."""
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.sampling import Sampler, _filter_top_k_top_p


def test_top_k_and_top_p_masks():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(_filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # softmax mass: 0.644, 0.237, 0.087, 0.032 -> top_p 0.7 keeps the first two tokens
    assert torch.isinf(_filter_top_k_top_p(logits, -1, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter_top_k_top_p(logits, -1, 0.5)).tolist() == [False, True, True, True]


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5]]).repeat(4000, 1)
    params = [SamplingParams(temperature=0.7)] * 4000
    tokens = torch.tensor(Sampler(0)(logits, params, [None] * 4000))
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_greedy_rows_take_argmax_in_mixed_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    out = Sampler(0)(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)], [None, None])
    assert out == [1, 0]


def llm():
    return LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, num_gpu_blocks=64, block_size=8))


def test_same_seed_same_tokens_regardless_of_batch():
    m = llm()
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = m.generate([[5, 6, 7]], p)[0].token_ids
    batched = m.generate([[9, 9], [5, 6, 7], [11]], [SamplingParams(max_tokens=5, temperature=1.0), p,
                                                     SamplingParams(max_tokens=20, temperature=1.0)])[1].token_ids
    other = m.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=8,
                                                   ignore_eos=True))[0].token_ids
    assert alone == batched and alone != other


def test_stop_tokens_eos_and_max_tokens():
    m = llm()
    greedy = m.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    stop = greedy[3]
    first = greedy.index(stop)
    out = m.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop"
    # The model's EOS (id 2 in the tiny preset) ends a request unless ignore_eos.
    eos_llm = llm()
    eos_llm.engine.spec = eos_llm.engine.spec.__class__(**{**eos_llm.engine.spec.__dict__,
                                                           "eos_token_ids": (greedy[0],)})
    out = eos_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == greedy[:1] and out.finish_reason == "stop"
    out = eos_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == greedy and out.finish_reason == "length"


def test_max_model_len_caps_output():
    m = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=16, num_gpu_blocks=8, block_size=8))
    out = m.generate([[5] * 10], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
