"""triton_int4_mma (kernel="mma"), the natural-K-order int4 tensor-core kernel, beyond the reference cases
of test_quant_int4_kernels (MMA_CASES: both orientations, folded and per-code scaled dequantization, K steps
below the group, split-K with empty slices, ragged rows and N), through Triton's CPU interpreter (compiled
where CUDA is present): AWQ / GPTQ layers (GPTQ zero points up to 16, act-order via the layer's
permutation), every code read back exactly, and the tuner keeping a disagreeing or overflowing candidate
from being chosen."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int4 import Int4Linear, pack_int4, pack_int4_kernel, quantize_int4  # noqa: E402

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MMA = dict(gemv=False, kernel="mma")


@pytest.mark.parametrize("cfg", [dict(MMA, block_m=16, block_n=16, block_k=32),
                                 dict(MMA, block_m=32, block_n=16, block_k=64, swap=False),
                                 dict(MMA, block_m=16, block_n=32, block_k=32, fold=False, split_k=2),
                                 dict(MMA, layout="pairs", block_m=32, block_n=16, block_k=128, split_k=2),
                                 dict(MMA, layout="pairs", fold=False, x_perm=True, block_m=16, block_n=16,
                                      block_k=128, split_k=2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mma_kernel_reads_back_every_code_exactly(cfg, dtype):
    """Scale 1, zero 0 (then zero 3), x = unit rows: the output is each code (minus the zero) exactly,
    which pins the word / nibble of every feature of the layout."""
    from engine.quant.triton_int4 import int4_matmul
    n, k = 24, 256
    group = 128 if cfg.get("layout") == "pairs" else 64
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_int4_kernel(pack_int4(codes)).to(DEVICE)
    x = torch.eye(k, dtype=dtype).to(DEVICE)
    ones = torch.ones(n, k // group, dtype=dtype, device=DEVICE)
    for zero in (0, 3):
        zeros = torch.full((n, k // group), zero, dtype=torch.uint8, device=DEVICE)
        out = int4_matmul(x, packed, ones, zeros, group, **cfg).cpu()
        assert torch.equal(out.float(), codes.t().float() - zero)


@pytest.mark.parametrize("fmt", ["awq", "gptq_act_order"])
@pytest.mark.parametrize("cfg", [dict(MMA, block_m=16, block_n=16, block_k=128, split_k=2),
                                 dict(MMA, block_m=32, block_n=32, block_k=64, swap=False, fold=False),
                                 dict(MMA, layout="pairs", block_m=16, block_n=32, block_k=128, split_k=2),
                                 dict(MMA, layout="pairs", fold=False, x_perm=True, block_m=16, block_n=32,
                                      block_k=128),
                                 dict(MMA, layout="pairs", prefetch=True, block_m=16, block_n=32, block_k=128,
                                      split_k=2),
                                 dict(MMA, layout="pairs", fold=False, x_perm=True, prefetch=True, block_m=16,
                                      block_n=16, block_k=128, split_k=4)])
def test_mma_kernel_on_checkpoint_layers(fmt, cfg):
    """AWQ layers (through the AWQ tensors and back) and GPTQ layers with act-order (a permutation of the
    input features, zero points 1..16 as GPTQ v1 stores them) run the same kernel on the same layout; with
    prefetch, each step's scale and zero loaded a step ahead (3 groups in slices of 2 steps and 1, or of 1 step
    each and an empty one: the look-ahead past K is clamped)."""
    from engine.quant.checkpoint import awq_to_int4, int4_to_awq
    from engine.quant.triton_int4 import int4_matmul
    g = torch.Generator().manual_seed(7)
    n, k, group, m = 40, 384, 128, 19
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
    if fmt == "awq":
        layer = awq_to_int4(**int4_to_awq(Int4Linear(qweight, scales, zeros, None, group)))
    else:
        zeros = torch.randint(1, 17, zeros.shape, generator=g).to(torch.uint8)  # GPTQ v1: stored zero + 1
        layer = Int4Linear(qweight, scales, zeros, None, group, perm=torch.randperm(k, generator=g))
    layer = layer.to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    xp = x if layer.perm is None else x.index_select(1, layer.perm)
    out = int4_matmul(xp, layer.packed, layer.scales, layer.zeros, layer.group_size, **cfg)
    ref = x.float() @ layer.dequantized_weight().t()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-5


def test_mma_launch_rejects_configs_it_cannot_run():
    from engine.quant.triton_int4 import _launch
    qweight, scales, zeros = quantize_int4(torch.randn(8, 256), 64)
    packed, x = pack_int4_kernel(qweight), torch.randn(2, 256)
    for block_k in (128, 48, 16):
        with pytest.raises(ValueError, match=f"block_k={block_k}"):
            _launch(x, packed, scales, zeros, 64, kernel="mma", block_k=block_k)
    with pytest.raises(ValueError, match="block_k=64: layout='pairs'"):  # 4 dots of K = 16 need 128 a step
        _launch(x, packed, scales, zeros, 64, kernel="mma", layout="pairs", block_k=64)
    with pytest.raises(ValueError, match="swap-AB"):
        _launch(x, packed, scales, zeros, 64, kernel="mma", layout="pairs", swap=False)
    for flag in ("x_perm", "prefetch"):
        with pytest.raises(ValueError, match="x_perm=True and prefetch=True are for layout='pairs'"):
            _launch(x, packed, scales, zeros, 64, kernel="mma", **{flag: True})
    with pytest.raises(ValueError, match="layout='rows'"):
        _launch(x, packed, scales, zeros, 64, kernel="mma", layout="rows")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="inline PTX"):
            _launch(x, packed, scales, zeros, 64, kernel="mma", layout="pairs", asm=True)


def test_mma_configs_are_offered_at_every_batch_and_fit_the_group():
    from engine.quant.triton_int4 import candidates
    for m in (1, 2, 16, 33, 64, 100, 256, 600):
        mma = [c for c in candidates(m, 4096, 4096, 128, 132, asm=True) if c.get("kernel") == "mma"]
        pairs = [c for c in mma if c.get("layout") == "pairs"]
        assert pairs and all(c["asm"] and c["block_k"] == 128 for c in pairs), m
        assert all(c["split_k"] == 1 or c.get("serial") for c in mma)
        assert all(c["block_m"] * c["block_n"] <= 16384 for c in pairs)  # <= 64 + 64 accumulators a thread
        unfolded = [c for c in pairs if not c["fold"]]  # four accumulators: <= 128 float32 a thread
        assert bool(unfolded) == (m > 2) and all(c["x_perm"] for c in unfolded), m
        assert all(4 * c["block_m"] * c["block_n"] <= 128 * 32 * c["num_warps"] for c in unfolded), m
        assert not any(c.get("asm") for c in candidates(m, 4096, 4096, 128, 132) if c.get("kernel") == "mma")
        for group in (64, 32):  # steps of 128 features would span groups: no pairs, "tile" steps inside one
            mma = [c for c in candidates(m, 4096, 4096, group, 132, asm=True) if c.get("kernel") == "mma"]
            assert not any(c.get("layout") == "pairs" for c in mma)
            assert all(group % c["block_k"] == 0 and c["block_k"] % 32 == 0 for c in mma), (m, group)
    big = [c for c in candidates(256, 4096, 4096, 128, 132) if c.get("kernel") == "mma"]
    assert any(not c["swap"] for c in big) and any(c["block_m"] == 128 and c.get("layout") == "pairs" for c in big)


def test_tuner_never_picks_a_candidate_that_disagrees(monkeypatch):
    """tuning.pick on a (simulated) GPU: the fastest candidate computes a wrong product, so the fastest
    of the agreeing ones is chosen and the wrong one is timed as inf."""
    from engine.quant import tuning
    from engine.quant.triton_int4 import _launch
    g = torch.Generator().manual_seed(3)
    qweight, scales, zeros = (t.to(DEVICE) for t in quantize_int4(torch.randn(24, 256, generator=g) * 0.05, 128))
    packed, x = pack_int4_kernel(qweight), torch.randn(5, 256, generator=g).to(DEVICE)
    good_slow = dict(MMA, block_m=16, block_n=16, block_k=128)
    wrong_fast = dict(MMA, block_m=16, block_n=16, block_k=128, wrong=True)
    good_fast = dict(MMA, block_m=16, block_n=32, block_k=64, swap=False)
    times = {0: 3.0, 1: 1.0, 2: 2.0}
    calls = []

    def launch(cfg, *args):
        calls.append(cfg)
        cfg = dict(cfg)
        out = _launch(*args, **{k: v for k, v in cfg.items() if k != "wrong"})
        return out * 1.5 if cfg.get("wrong") else out

    monkeypatch.setattr(tuning, "_graph_time", lambda fn, n: times[[good_slow, wrong_fast, good_fast].index(calls[-1])])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = ("test-int4-mma", 5, 24, 256)
    try:
        best = tuning.pick(key, [good_slow, wrong_fast, good_fast], launch,
                           lambda: [(x, packed, scales, zeros, 128)], torch.device("cuda"))
        assert best == good_fast
        assert dict((str(c), t) for c, t in tuning.timings[key])[str(wrong_fast)] == float("inf")
    finally:
        for table in (tuning.chosen, tuning.timings, tuning.seconds):
            table.pop(key, None)


def test_tuner_rejects_a_candidate_that_overflows_on_large_activations(monkeypatch):
    """A candidate right on ordinary activations but non-finite once they pass float16's range (what
    triton_int8_mma's float16 conversion did on the GPU) is timed as inf, though it is the fastest."""
    from engine.quant import tuning
    from engine.quant.triton_int4 import _launch
    g = torch.Generator().manual_seed(4)
    qweight, scales, zeros = (t.to(DEVICE) for t in quantize_int4(torch.randn(24, 256, generator=g) * 0.05, 128))
    packed, x = pack_int4_kernel(qweight), torch.randn(5, 256, generator=g).to(DEVICE)
    good_slow = dict(MMA, block_m=16, block_n=16, block_k=128)
    overflows_fast = dict(MMA, block_m=16, block_n=32, block_k=64, overflow=True)
    calls = []

    def launch(cfg, *args):
        calls.append(cfg)
        out = _launch(*args, **{k: v for k, v in cfg.items() if k != "overflow"})
        if cfg.get("overflow") and float(args[0].abs().max()) > 65504:
            return torch.full_like(out, float("nan"))
        return out

    times = {0: 2.0, 1: 1.0}
    monkeypatch.setattr(tuning, "_graph_time", lambda fn, n: times[[good_slow, overflows_fast].index(calls[-1])])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = ("test-int4-overflow", 5, 24, 256)
    try:
        best = tuning.pick(key, [good_slow, overflows_fast], launch, lambda: [(x, packed, scales, zeros, 128)],
                           torch.device("cuda"))
        assert best == good_slow
        assert dict((str(c), t) for c, t in tuning.timings[key])[str(overflows_fast)] == float("inf")
        assert float(x.abs().max()) < 10  # the caller's activations are untouched
    finally:
        for table in (tuning.chosen, tuning.timings, tuning.seconds):
            table.pop(key, None)
