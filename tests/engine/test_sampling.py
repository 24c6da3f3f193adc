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



def _unchunked_reference(engine_gen, logits, params, generators):
    """The sampler before rows were chunked: float32 logits of every row on the host, filtered row by row."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    host = logits.cpu()
    for i, p in enumerate(params):
        if not p.greedy:
            row = _filter_top_k_top_p(host[i] / p.temperature, p.top_k, p.top_p)
            gen = generators[i] if generators[i] is not None else engine_gen
            out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=gen).item())
    return out


def test_chunked_rows_sample_what_unchunked_sampling_did():
    """Gathering random rows chunk by chunk (any chunk size) gives the tokens of the whole-batch copy, for greedy,
    seeded and unseeded rows over three steps (generators carry over), in float32 and bfloat16, argmax ties
    included."""
    torch.manual_seed(0)
    n, vocab = 13, 50
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3),
             SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.5),
             SamplingParams(temperature=1.3, top_k=7, seed=11)]
    params = [kinds[(3 * i) % len(kinds)] for i in range(n)]
    assert params[0].greedy and sum(not p.greedy for p in params) >= 9

    def seeded():
        return [torch.Generator().manual_seed(p.seed + i) if p.seed is not None else None
                for i, p in enumerate(params)]

    for dtype in (torch.float32, torch.bfloat16):
        steps = [(torch.randn(n, vocab) * 3).to(dtype) for _ in range(3)]
        steps[0][0, 4] = steps[0][0, 9] = steps[0][0].max() + 1  # a tie in a greedy row: the first index wins
        engine_gen, gens = torch.Generator().manual_seed(5), seeded()
        expected = [_unchunked_reference(engine_gen, logits, params, gens) for logits in steps]
        assert expected[0][0] == 4
        assert len({tuple(e) for e in expected}) == 3  # the steps differ, so a misplaced row would show
        for chunk_rows in (1, 2, 5, 64):
            sampler, gens = Sampler(5, chunk_rows=chunk_rows), seeded()
            assert [sampler(logits, params, gens) for logits in steps] == expected, (dtype, chunk_rows)


def test_sampler_gathers_at_most_chunk_rows_at_once(monkeypatch):
    """The sampler's temporaries are bounded: random rows reach the host chunk_rows at a time, greedy rows never."""
    seen = []
    original = Sampler._sample_rows

    def spy(self, logits, params, generators):
        seen.append(logits.shape[0])
        return original(self, logits, params, generators)

    monkeypatch.setattr(Sampler, "_sample_rows", spy)
    params = [SamplingParams(temperature=0) if i % 3 else SamplingParams(temperature=1.0, top_p=0.9) for i in range(73)]
    Sampler(0, chunk_rows=8)(torch.randn(73, 20), params, [None] * 73)
    assert seen == [8, 8, 8, 1]  # rows 0, 3, ..., 72: 25 random rows
