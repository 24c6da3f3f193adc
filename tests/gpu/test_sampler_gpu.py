"""The device sampler on a GPU: draws follow the filtered softmax (exponential_ and per-row CUDA generators), seeded
rows are reproducible and independent of their batch, the filter equals the CPU's, and its temporaries stay within
what the memory profile measures (Sampler.profile_params) and engine.memory.sampler_temporary_bytes.

    PYTHONPATH=. python -m pytest -q tests/gpu/test_sampler_gpu.py
"""
import sys
from pathlib import Path

import pytest
import torch

from engine.memory import sampler_temporary_bytes
from engine.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from sampling_reference import ROW, chi2_pvalue, reference_probs  # noqa: E402

VOCAB = 128256


def _gens(params):
    return [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("case", [dict(temperature=0.7), dict(temperature=1.0, top_k=2),
                                  dict(temperature=1.0, top_p=0.5), dict(temperature=0.9, top_k=5, top_p=0.7)])
def test_gpu_draws_follow_the_filtered_softmax(case, seeded):
    n = 6000
    params = [SamplingParams(**case, seed=1000 + i if seeded else None) for i in range(n)]
    expected = reference_probs(ROW, params[0].temperature, params[0].top_k, params[0].top_p)
    tokens = torch.tensor(Sampler(3)(ROW.cuda().repeat(n, 1), params, _gens(params)))
    counts = torch.bincount(tokens, minlength=len(ROW))
    assert counts[expected == 0].sum() == 0
    assert chi2_pvalue(counts, n * expected) > 1e-3


def test_gpu_seeded_rows_are_reproducible_and_batch_independent():
    torch.manual_seed(0)
    steps = [torch.randn(300, VOCAB, device="cuda") * 3 for _ in range(3)]
    kinds = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=5), SamplingParams(temperature=1.0, seed=6),
             SamplingParams(temperature=0.8, top_p=0.95, seed=7)]
    for kind in kinds:
        gen = _gens([kind])
        alone = [Sampler(0)(s[:1], [kind], gen)[0] for s in steps]
        gen = _gens([kind])
        assert [Sampler(1)(s[:1], [kind], gen)[0] for s in steps] == alone
        # Chunk-mates on every path: top-k rows with the same k as the seeded one, top-p alone, greedy.
        params = [SamplingParams(temperature=1.0, top_k=(i % 3) * 20 + 10, top_p=0.9) if i % 4 == 1 else
                  SamplingParams(temperature=0.9, top_p=0.8 + (i % 5) / 50) if i % 4 == 3 else
                  SamplingParams(temperature=0.0) for i in range(300)]
        params[123] = kind
        gens = _gens(params)
        rows = list(range(300))
        rows[0], rows[123] = 123, 0
        sampler = Sampler(2)
        assert [sampler(s[rows], params, gens)[123] for s in steps] == alone


def test_gpu_filter_equals_cpu_filter():
    torch.manual_seed(1)
    logits = torch.randn(64, 5000) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t in (0.5, 1.0) for k in (-1, 1, 40, 2000)
              for p in (1.0, 0.9, 0.3)] * 3
    params = params[:64]
    cpu = Sampler(0).filtered_logits(logits, params)
    gpu = Sampler(0).filtered_logits(logits.cuda(), params).cpu()
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
    assert torch.allclose(cpu[torch.isfinite(cpu)], gpu[torch.isfinite(gpu)])


def _peak(sampler, logits, params) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sampler(logits, params, [torch.Generator()] * len(params))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_temporaries_are_bounded_by_the_profile_and_the_stated_bound(dtype):
    """2048 rows of a 128256 vocabulary: every batch mix's peak temporaries <= the profile's (profile_params) <=
    sampler_temporary_bytes, independent of the number of random rows."""
    rows = 2048
    logits = (torch.randn(rows, VOCAB, device="cuda") * 3).to(dtype)
    sampler = Sampler(0)
    profile = _peak(sampler, logits, sampler.profile_params(rows, VOCAB))
    mixes = {
        "topk50_topp": [SamplingParams(temperature=0.8, top_k=50, top_p=0.9)] * rows,
        "topp": [SamplingParams(temperature=0.8, top_p=0.9)] * rows,
        "large_k": [SamplingParams(temperature=0.8, top_k=5000)] * rows,
        "plain_logprobs": [SamplingParams(temperature=1.0, logprobs=5)] * rows,
        "mixed": [SamplingParams(temperature=0.8, top_k=20 + i % 7, top_p=0.9 + (i % 3) / 40, logprobs=i % 4)
                  if i % 5 else SamplingParams(temperature=0.0) for i in range(rows)],
    }
    peaks = {name: _peak(sampler, logits, params) for name, params in mixes.items()}
    bound = sampler_temporary_bytes(rows, VOCAB, sampler.chunk_rows, sampler.sort_rows)
    assert all(p <= profile * 1.02 + 2**20 for p in peaks.values()), (profile, peaks)
    assert profile <= bound, (profile, bound)
    # Bounded by the chunk, not the batch: half the rows, the same peak (within the token vectors).
    assert abs(_peak(sampler, logits[: rows // 2], mixes["topp"][: rows // 2]) - peaks["topp"]) < 2**20
