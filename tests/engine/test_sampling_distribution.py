"""The device sampler's filter and draws against an independent reference: the filter rule computed token by token
in float64 (reference_probs), and chi-square tests of many draws on a tiny vocabulary against that exact filtered
softmax, for temperature, top-k, top-p, both, the sort path, seeded rows and mixed batches."""
import pytest
import torch

from engine.sampling import Sampler, SamplingParams, _filter_top_k_top_p
from engine.spec_decode.verifier import target_probs
from sampling_reference import ROW, chi2_pvalue, reference_probs


CASES = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=2),          # the k-th value is tied: 3 tokens kept
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.0, top_p=0.5),        # sort path
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=5, top_p=0.7),
    dict(temperature=2.0, top_k=6, top_p=0.95),  # ties at the k-th value (-0.5) beyond k
    dict(temperature=0.5, top_k=7, top_p=0.999),
]


def test_reference_is_hand_computed():
    # softmax of ROW: 2.0 -> 0.354, 1.5 -> 0.215 (x2), 0.3 -> 0.065, ...: top_p 0.5 keeps 2.0 (mass above 0) and
    # both 1.5 (mass above 0.354 < 0.5); top_p 0.3 keeps only 2.0.
    assert reference_probs(ROW, 1.0, -1, 0.5).nonzero().flatten().tolist() == [0, 1, 2]
    assert reference_probs(ROW, 1.0, -1, 0.3).nonzero().flatten().tolist() == [0]
    assert reference_probs(ROW, 1.0, 2, 1.0).nonzero().flatten().tolist() == [0, 1, 2]
    assert reference_probs(ROW, 1.0, 6, 1.0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    p = reference_probs(ROW, 1.0, 1, 1.0)
    assert p.tolist() == [1.0] + [0.0] * 7


def _grid(vocab):
    return [SamplingParams(temperature=t, top_k=k, top_p=p)
            for t in (0.7, 1.0) for k in (-1, 1, 2, 5, 17, vocab - 1, vocab, vocab + 3) for p in (1.0, 0.95, 0.5, 0.2)]


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_filtered_logits_equal_the_reference_with_ties(chunk_rows, monkeypatch):
    """Every (temperature, top_k, top_p) of a grid, on rows full of ties and on random rows, in one mixed batch:
    the sampler's kept tokens are the reference's and its values are logits / temperature, on every path: the top-k
    path, the sort path (a top-k above TOPK_PATH_MAX_K, lowered here to 4), and top-p alone with its nucleus found
    among the TOP_P_PROBE_K largest values or not (the probe lowered to 8 or 3, or larger than the vocabulary)."""
    torch.manual_seed(0)
    vocab = 40
    grid = _grid(vocab)
    rows = torch.cat([torch.randint(-6, 6, (len(grid), vocab)).float() * 0.5, torch.randn(len(grid), vocab) * 2])
    params = grid + grid[::-1]
    expected = torch.stack([reference_probs(r, p.temperature, p.top_k, p.top_p) for r, p in zip(rows, params)])
    for max_k, probe in ((1024, 1024), (4, 8), (1024, 3)):
        monkeypatch.setattr("engine.sampling.TOPK_PATH_MAX_K", max_k)
        monkeypatch.setattr("engine.sample_ops.TOP_P_PROBE_K", probe)
        got = Sampler(0, chunk_rows=chunk_rows).filtered_logits(rows, params)
        assert torch.equal(torch.isfinite(got), expected > 0), (max_k, probe)
        scaled = rows / torch.tensor([p.temperature for p in params])[:, None]
        assert torch.equal(got[torch.isfinite(got)], scaled[torch.isfinite(got)])
        # The one-row filter the verifier uses is the same rule.
        one = torch.stack([_filter_top_k_top_p(r / p.temperature, p.top_k, p.top_p) for r, p in zip(rows, params)])
        assert torch.equal(torch.isfinite(one), expected > 0)


def test_verifier_target_probs_are_the_reference():
    torch.manual_seed(1)
    logits = torch.randint(-4, 4, (3, 12)).float()
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.6)
    expected = torch.stack([reference_probs(r, 0.8, 5, 0.6) for r in logits])
    assert torch.allclose(target_probs(logits, params).double(), expected, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_filtered_softmax(case, seeded):
    """N rows of ROW in one call (chunked): filtered tokens are never drawn, the others follow the reference."""
    n = 6000
    params = SamplingParams(**case)
    expected = reference_probs(ROW, params.temperature, params.top_k, params.top_p)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)] if seeded else [None] * n
    tokens = torch.tensor(Sampler(3)(ROW.repeat(n, 1), [params] * n, gens))
    counts = torch.bincount(tokens, minlength=len(ROW))
    assert counts[expected == 0].sum() == 0
    assert chi2_pvalue(counts, n * expected) > 1e-3, (counts.tolist(), (n * expected).tolist())


def test_mixed_batch_draws_follow_each_rows_distribution():
    """Rows of every case interleaved in one batch with greedy rows (several chunks of each path): each case's rows
    follow that case's reference, the greedy rows all take the argmax."""
    per, cases = 2000, CASES + [dict(temperature=0.0)]
    params = [SamplingParams(**cases[i % len(cases)]) for i in range(per * len(cases))]
    tokens = torch.tensor(Sampler(7, chunk_rows=50)(ROW.repeat(len(params), 1), params, [None] * len(params)))
    for c, case in enumerate(cases):
        got = torch.bincount(tokens[c::len(cases)], minlength=len(ROW))
        if case["temperature"] == 0:
            assert got[0] == per
            continue
        p = SamplingParams(**case)
        expected = reference_probs(ROW, p.temperature, p.top_k, p.top_p)
        assert got[expected == 0].sum() == 0
        assert chi2_pvalue(got, per * expected) > 1e-3, case
