"""The sampler against hand-computed distributions; seeds, stops and EOS through the engine."""
import weakref

import pytest
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


KINDS = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3),
         SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.5, seed=4),
         SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.1, top_p=0.95, seed=14),
         SamplingParams(temperature=1.3, top_k=7, seed=11), SamplingParams(temperature=1.0, top_k=5, seed=12),
         SamplingParams(temperature=0.9, seed=13)]


def _seeded(params, offset=0):
    return [torch.Generator().manual_seed(p.seed + offset) if p.seed is not None else None for p in params]


@pytest.mark.parametrize("probe", [1024, 16])
def test_seeded_rows_are_reproducible_and_independent_of_the_batch(probe, monkeypatch):
    """A seeded row (each filter path) gives the same tokens over three steps alone, in any batch around it, at any
    position, with any chunk size, in float32 and bfloat16, and run after run; another seed gives other tokens.
    probe 16: top-p alone looks among the 16 largest values first (a chunk's rows may or may not find it there)."""
    monkeypatch.setattr("engine.sample_ops.TOP_P_PROBE_K", probe)
    torch.manual_seed(0)
    vocab = 300
    for dtype in (torch.float32, torch.bfloat16):
        steps = [(torch.randn(40, vocab) * 3).to(dtype) for _ in range(3)]
        for kind in [k for k in KINDS if k.seed is not None]:
            alone_gen = _seeded([kind])
            alone = [Sampler(1)(s[7:8], [kind], alone_gen)[0] for s in steps]
            rerun_gen = _seeded([kind])
            assert [Sampler(2)(s[7:8], [kind], rerun_gen)[0] for s in steps] == alone
            # Another seed, other tokens (on flatter rows over six steps, where a repeat is improbable).
            flat = [(torch.randn(1, vocab) * 0.5).to(dtype) for _ in range(6)]
            runs = [[Sampler(1)(s, [kind], g)[0] for s in flat] for g in (_seeded([kind]), _seeded([kind], 1))]
            assert runs[0] != runs[1], kind
            for chunk_rows, pos in ((1, 0), (2, 7), (5, 12), (64, 39)):
                params = [KINDS[(3 * i) % len(KINDS)] for i in range(40)]
                params[pos] = kind
                gens = _seeded(params)
                sampler = Sampler(5, chunk_rows=chunk_rows)
                rows = list(range(40))
                rows[pos], rows[7] = 7, pos  # the seeded row's logits sit at `pos`
                got = [sampler(s[rows], params, gens)[pos] for s in steps]
                assert got == alone, (dtype, kind, chunk_rows, pos)


def test_greedy_rows_take_the_argmax_first_index_on_ties():
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = (torch.randn(30, 64) * 2).to(dtype)
        logits[0, 4] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins
        params = [KINDS[i % len(KINDS)] for i in range(30)]
        out = Sampler(0, chunk_rows=4)(logits, params, _seeded(params))
        greedy = [i for i, p in enumerate(params) if p.greedy]
        assert [out[i] for i in greedy] == [int(logits[i].float().argmax()) for i in greedy]
        assert out[0] == 4


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 4096), (8, 1000), (9, 4096), (2, 97)])
def test_argmax_rows_is_argmax_ties_and_nan_included(rows, vocab):
    """The two-pass argmax (chunk maxima, then the first chunk holding the row maximum) against torch.argmax:
    ties inside a chunk and across chunks take the first index, NaN wins; shapes it splits (vocab with a
    power-of-two factor >= 16, <= 8 rows) and ones it leaves to argmax."""
    from engine.sample_ops import argmax_rows
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g)
    top = x.max() + 1
    x[0, vocab // 2] = x[0, vocab - 1] = x[0, 3] = top  # a tie across chunks: index 3
    if rows > 1:
        x[1, 5] = x[1, 6] = top  # a tie inside one chunk
    if rows > 2:
        x[2, vocab - 2] = float("nan")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert int(argmax_rows(x)[0]) == 3


def test_large_batch_runs_a_chunk_at_a_time(monkeypatch):
    """2000 rows: the sampler filters and draws at most chunk_rows rows at once (sort_rows for the sort path),
    computes logprobs chunk_rows at a time, and every row's token is one its filter keeps."""
    import engine.sampling as sampling
    seen = {"draw": [], "sort": [], "logp": []}
    real_race, real_sort, real_lsm = sampling.exponential_race, sampling.apply_top_p_sorted, torch.log_softmax
    real_top_k = sampling.apply_top_k_top_p

    drawn_chunks = []  # weak references to the buffers of the chunks drawn so far

    def race(x, q):
        seen["draw"].append(x.shape[0])
        drawn_chunks.append(weakref.ref(x))
        return real_race(x, q)

    def sort(x, k, p):
        seen["sort"].append(x.shape[0])
        return real_sort(x, k, p)

    def top_k(x, k, p):  # a new chunk's buffer exists: the earlier chunks' are gone
        assert all(ref() is None for ref in drawn_chunks)
        return real_top_k(x, k, p)

    def lsm(x, dim):
        seen["logp"].append(x.shape[0])
        return real_lsm(x, dim=dim)

    monkeypatch.setattr(sampling, "exponential_race", race)
    monkeypatch.setattr(sampling, "apply_top_p_sorted", sort)
    monkeypatch.setattr(sampling, "apply_top_k_top_p", top_k)
    monkeypatch.setattr(sampling.torch, "log_softmax", lsm)
    kinds = KINDS + [SamplingParams(temperature=1.0, top_k=3, logprobs=2)]
    params = [kinds[i % len(kinds)] for i in range(2000)]
    logits = torch.randn(2000, 32)
    sampler = Sampler(0, chunk_rows=16)
    out = sampler(logits, params, _seeded(params))
    assert max(seen["draw"]) == 16 and max(seen["sort"]) == sampler.sort_rows == 4
    assert len(drawn_chunks) > 100
    n_lp = sum(p.logprobs is not None for p in params)
    assert n_lp == 200 and seen["logp"] == [16] * 12 + [8]
    # Each group's rows draw chunk by chunk: the random rows are all drawn once.
    assert sum(seen["draw"]) == sum(not p.greedy for p in params)
    kept = torch.isfinite(sampler.filtered_logits(logits, params))
    assert all(kept[i, t] for i, t in enumerate(out))
    assert all(out[i] == int(logits[i].argmax()) for i, p in enumerate(params) if p.greedy)


def test_logprobs_are_the_log_softmax_of_the_raw_logits_whatever_the_chunk():
    torch.manual_seed(2)
    logits = torch.randn(9, 50) * 2
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.7, top_k=4, logprobs=0),
              SamplingParams(temperature=1.0), SamplingParams(temperature=1.2, top_p=0.8, logprobs=5, seed=1)] * 2 \
        + [SamplingParams(temperature=0.0)]
    ref = torch.log_softmax(logits.double(), -1)
    outs = [Sampler(0, chunk_rows=c)(logits, params, _seeded(params)) for c in (1, 2, 64)]
    for out in outs:
        for i, (t, p) in enumerate(zip(out, params)):
            if p.logprobs is None:
                assert not hasattr(t, "logprob")
                continue
            assert abs(t.logprob - ref[i, t].item()) < 1e-5
            if p.logprobs:
                ids, lps = t.top
                assert ids == torch.topk(ref[i], p.logprobs).indices.tolist()
                assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref[i, ids], atol=1e-5)
            else:
                assert t.top is None
    # Seeded rows and greedy rows agree across chunk sizes.
    assert [outs[0][i] for i in (0, 3, 4, 7, 8)] == [outs[2][i] for i in (0, 3, 4, 7, 8)]


def test_profile_params_cover_a_full_chunk_of_each_path():
    from engine.sample_ops import TOPK_PATH_MAX_K
    sampler = Sampler(0, chunk_rows=8)
    for n in (1, 2, 5, 10, 12, 40):
        for vocab, k in ((128256, TOPK_PATH_MAX_K), (512, 511)):
            params = sampler.profile_params(n, vocab)
            groups = dict(sampler._groups(params, [i for i, p in enumerate(params) if not p.greedy], vocab))
            assert len(params) == n
            # The sort path itself (a top-k above the top-k path's; top-p alone where the probe covers the vocabulary).
            assert len(groups.get("sort" if vocab > TOPK_PATH_MAX_K + 1 else "topp", [])) == min(n, sampler.sort_rows)
            assert len(groups.get(("topk", k), [])) == min(n - min(n, 2), 8)
            assert all(p.logprobs for p in params if p.top_k == k)


def test_bad_chunk_rows_is_refused():
    with pytest.raises(ValueError, match="chunk_rows=0"):
        Sampler(0, chunk_rows=0)


def test_sampler_temporary_bytes_is_hand_computed():
    from engine.memory import forward_activation_bytes, sampler_temporary_bytes
    v = 128256
    # 2048 rows, chunks of 128 (top-k path: 11 bytes an element) and 32 (sort path: 56): the sort chunk is larger,
    # 32 x 128256 x 56 = 229834752, plus 16 bytes a row for the argmax and the tokens.
    assert sampler_temporary_bytes(2048, v, 128, 32) == 229834752 + 16 * 2048
    assert sampler_temporary_bytes(4096, v, 128, 32) == 229834752 + 16 * 4096  # bounded by the chunks
    assert sampler_temporary_bytes(5, v, 128, 32) == 5 * v * 56 + 80
    assert sampler_temporary_bytes(2048, v, 512, 32) == 512 * v * 11 + 16 * 2048
    # The host check counts it: 10 tokens of a 4/8/6/16 model over 3 rows of a 100-token vocabulary, 4-byte dtype.
    per_token = 4 * 4 + 6 + 3 * 16
    assert forward_activation_bytes(10, 3, 4, 16, 6, 100, 4) == (10 * per_token * 4 + 3 * 100 * (4 + 4 + 4)
                                                                 + 3 * 100 * 56 + 16 * 3)


def test_seeds_and_logprobs_out_of_range_are_refused_naming_them():
    with pytest.raises(ValueError, match="seed=.* is not allowed"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match="seed=.* is not allowed"):
        SamplingParams(seed=2**64 - 2, n=4)  # sequence 3 would seed 2**64 + 1
    with pytest.raises(ValueError, match="seed=.* is not allowed"):
        EngineConfig(seed=-2**63 - 1)
    SamplingParams(seed=2**64 - 4, n=4)
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    vocab = llm.engine.spec.vocab_size
    with pytest.raises(ValueError, match="logprobs=.* is not allowed"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, logprobs=vocab + 1))
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0, logprobs=vocab))[0]
    assert len(out.token_ids) == 2  # the engine stays usable, and the whole vocabulary is allowed
