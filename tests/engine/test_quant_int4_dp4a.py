"""The integer-dot int4 GEMV (engine/quant/triton_int4_dp4a.py) through Triton's CPU interpreter, dp4a emulated
byte by byte (compiled, with the PTX instruction, where CUDA is present): x's limbs packed in the kernel layout's
byte order (known answer), the kernel's sums equal to a float64 reimplementation of them (dp4a_reference), and the
product within the limbs' rounding of the dequantize-then-matmul reference over 25 decades of x; split-K, ragged N,
groups of 32 to 256."""
from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.quant.int4 import (dequantize_int4, int4_linear_reference, pack_int4, pack_int4_kernel,  # noqa: E402
                               quantize_int4)

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DP4A = dict(kernel="dp4a")


def test_x_limbs_pack_each_words_features_in_its_byte_order():
    """Known answer: x = 3 * ((f % 128) - 64), each 128-feature step's max |x| set to 192, so v = rint(x * 16256 /
    192); byte b of word j of the hi-even plane is the hi limb of feature 32 (j // 4) + j % 4 + 8 b, of the hi-odd
    plane that of feature + 4, the lo planes likewise; xs holds sx = 192 / 16256 and sx * sum(v) per step."""
    from engine.quant.triton_int4_dp4a import x_limbs
    from engine.quant.triton_int8_limbs import LIMB, LIMBS_MAX
    k = 256
    x = torch.tensor([[(f % 128) - 64.0 for f in range(k)]]) * 3.0
    x[0, 127] = x[0, 255] = 64.0 * 3.0  # each 128-feature step reaches |x| = 192 with both signs: v = x * 16256 / 192
    xq, xs, _ = x_limbs(x.to(DEVICE), 4)
    xq, xs = xq.cpu(), xs.cpu()
    v = torch.round(x[0] * (LIMBS_MAX / 192.0))
    hi = torch.round(v / LIMB)
    lo = v - LIMB * hi
    assert xq.shape == (1, 4, k // 8)

    def byte(word, b):
        return ((int(word) & 0xFFFFFFFF) >> (8 * b) & 0xFF) - (256 if (int(word) >> (8 * b) & 0x80) else 0)

    for j in range(k // 8):
        for b in range(4):
            f = 32 * (j // 4) + j % 4 + 8 * b
            assert byte(xq[0, 0, j], b) == hi[f] and byte(xq[0, 1, j], b) == hi[f + 4], (j, b)
            assert byte(xq[0, 2, j], b) == lo[f] and byte(xq[0, 3, j], b) == lo[f + 4], (j, b)
    assert torch.allclose(xs[0, :, 0], torch.full((2,), 192.0 / LIMBS_MAX))
    for s in range(2):
        assert xs[0, s, 1].item() == pytest.approx(192.0 / LIMBS_MAX * v[128 * s:128 * (s + 1)].sum().item())


# (m, n, k, group, cfg): ragged N, K of 3 and 5 chunks (96, 160), unequal and empty slices
CASES = [
    (1, 48, 256, 128, dict(DP4A, block_n=16, chunks=4, split_k=1)),
    (2, 40, 384, 128, dict(DP4A, block_n=32, chunks=4, split_k=3, serial=True)),
    (1, 33, 160, 32, dict(DP4A, block_n=16, chunks=1, split_k=4)),                 # an empty slice, torch.sum
    (2, 24, 96, 32, dict(DP4A, block_n=16, chunks=1, split_k=1)),
    (1, 40, 1024, 256, dict(DP4A, block_n=8, chunks=4, split_k=2, serial=True)),   # 2 steps a group
    (1, 24, 192, 64, dict(DP4A, block_n=8, chunks=2, split_k=2, serial=True)),     # 3 groups, 2 slices
    (1, 24, 8192, 128, dict(DP4A, block_n=8, chunks=4, split_k=16, serial=True)),  # a long K's deep split: 16 x 4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,group,cfg", CASES)
def test_int4_dp4a_gemv_computes_its_integer_sums_exactly(m, n, k, group, cfg, dtype):
    """Against dp4a_reference (float64, the same limbs): float32 rounding only; against the dequantize-then-matmul
    reference: within the limbs' rounding (|x - scale v| <= max|x| / 32512 per feature)."""
    from test_quant_int4_kernels import run_case

    from engine.quant.triton_int4_dp4a import dp4a_reference
    x, qweight, scales, zeros, out = run_case(m, n, k, group, cfg, dtype)
    exact = dp4a_reference(x, qweight, scales, zeros, group, cfg["chunks"])
    ref = int4_linear_reference(x, qweight, scales, zeros).double()
    # float32: each step's sum rounds once into the accumulator, so the bound grows with the steps (64 at K = 8192)
    steps = k // (32 * cfg["chunks"])
    tol = max(1e-6, steps * torch.finfo(torch.float32).eps) if dtype == torch.float32 else 1e-3  # float16 output
    assert ((out.double() - exact).norm() / exact.norm()).item() < tol
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-4 + tol


@pytest.mark.parametrize("magnitude", [1e-15, 1e-3, 1.0, 1e5, 1e10])
def test_int4_dp4a_gemv_keeps_its_accuracy_over_the_range_of_x(magnitude):
    """The limbs are a fixed point of each step's range, so the error relative to the product does not depend on
    x's magnitude (x of both signs, exact zeros, an all-zero step)."""
    from engine.quant.triton_int4 import int4_matmul
    g = torch.Generator().manual_seed(7)
    n, k, group = 40, 512, 128
    qweight, scales, zeros = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)
    x = torch.randn(2, k, generator=g) * magnitude
    x[:, ::17] = 0.0
    x[1, 128:256] = 0.0
    ref = x.double() @ dequantize_int4(qweight, scales, zeros, torch.float64).t()
    out = int4_matmul(x.to(DEVICE), pack_int4_kernel(qweight).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE),
                      group, **DP4A, block_n=16, chunks=4, split_k=2, serial=True).cpu().double()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-4


def test_int4_dp4a_gemv_reads_back_every_code():
    """Scale 1, zero 0, x a unit row: v = 16256 at the one feature, so the output is the codes of that feature."""
    from engine.quant.triton_int4 import int4_matmul
    n, k, group = 24, 128, 32
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_int4_kernel(pack_int4(codes)).to(DEVICE)
    ones, zeros = torch.ones(n, k // group), torch.zeros(n, k // group, dtype=torch.uint8)
    for f in (0, 1, 3, 4, 7, 8, 12, 16, 20, 28, 31, 32, 37, 100, 127):
        x = torch.eye(k)[f:f + 1]
        out = int4_matmul(x.to(DEVICE), packed, ones.to(DEVICE), zeros.to(DEVICE), group, **DP4A, block_n=8,
                          chunks=1).cpu()
        assert torch.allclose(out[0], codes[:, f].float(), rtol=1e-6), f


def test_int4_dp4a_is_offered_on_cuda_with_16_bit_x_and_keeps_steps_in_one_group():
    from engine.quant.triton_int4 import _launch, candidates
    for group in (32, 64, 128):
        dp4a = [c for c in candidates(1, 4096, 4096, group, 132, asm=True) if c.get("kernel") == "dp4a"]
        assert len(dp4a) >= 5 and all(group % (32 * c["chunks"]) == 0 for c in dp4a)
        assert any(c["split_k"] > 1 and c["serial"] for c in dp4a) and any(c["split_k"] == 1 for c in dp4a)
    # a K of 64 steps or more (down_proj's 14336 = 112 steps) is also offered in slices of DEEP_SPLIT_STEPS steps
    from engine.quant.triton_int4_dp4a import DEEP_SPLIT_STEPS, DP4A_TILES, dp4a_candidates
    splits = {c["split_k"] for c in dp4a_candidates(1, 4096, 14336, 128, 132)}
    assert 112 // DEEP_SPLIT_STEPS in splits
    # a short K (32 steps) keeps two a tile: the heuristic's split and none
    assert len(dp4a_candidates(1, 4096, 4096, 128, 132)) <= 2 * len(DP4A_TILES)
    # off CUDA / float32 x (asm=False) and above the GEMV's rows it is not a candidate
    assert not any(c.get("kernel") == "dp4a" for c in candidates(1, 4096, 4096, 128, 132, asm=False))
    assert not any(c.get("kernel") == "dp4a" for c in candidates(16, 4096, 4096, 128, 132, asm=True))
    qweight, scales, zeros = quantize_int4(torch.randn(8, 256), 128)
    with pytest.raises(ValueError, match="chunks=8"):
        _launch(torch.randn(1, 256), pack_int4_kernel(qweight), scales, zeros, 128, **DP4A, chunks=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter, chunks, act_order", [(256, 4, False), (384, 4, True), (192, 2, True), (32, 1, False)])
def test_silu_and_mul_limbs_stores_x_limbs_of_the_unfused_kernels_output(dtype, inter, chunks, act_order):
    """silu_and_mul_limbs against x_limbs of the unfused kernel's output (triton_fused), gathered by the act-order
    permutation: the same words and step scales bit for bit."""
    from engine.kernels.triton_fused import silu_and_mul_triton
    from engine.quant.triton_int4_dp4a import silu_and_mul_limbs, x_limbs
    g = torch.Generator().manual_seed(5)
    h = (2 * torch.randn(3, 2 * inter, generator=g)).to(DEVICE, dtype)
    h[1, :inter] = 0.0  # a row whose activation is all zero: sx = 0
    src = torch.randperm(inter, generator=g).to(DEVICE) if act_order else None
    act = silu_and_mul_triton(h)
    limbs, want = silu_and_mul_limbs(h, chunks, src), x_limbs(act if src is None else act[:, src], chunks)
    assert limbs.dtype == dtype and limbs.q.shape == want.q.shape and limbs.s.shape == want.s.shape
    assert torch.equal(limbs.q.cpu(), want.q.cpu())
    assert torch.equal(limbs.s.cpu(), want.s.cpu())
    assert not silu_and_mul_limbs(h, chunks).s[1].any()  # the all-zero row: sx = 0 and sx * sum(v) = 0
    with pytest.raises(ValueError, match="whole steps"):
        silu_and_mul_limbs(h[:, :2 * inter - 32], chunks)


@pytest.mark.parametrize("head_dim, chunks, splits", [(128, 4, 3), (128, 2, 16), (64, 1, 2), (32, 1, 5)])
def test_decode_reduce_stores_x_limbs_of_the_attention_output(head_dim, chunks, splits):
    """decode_attention with decode_reduce_limbs as its reduce: the output rows as the plain reduce writes them,
    bit for bit, and their Limbs those x_limbs makes of them (1-4 steps a head; a step over 2 heads' features is
    refused); a request with no context (a padding row) gives zeros, an all-zero step (sx = 0)."""
    import functools

    from engine.kernels.triton_decode import decode_attention
    from engine.quant.triton_int4_dp4a import decode_reduce_limbs, empty_limbs, x_limbs
    g = torch.Generator().manual_seed(head_dim + splits)
    b, heads, kv_heads, block_size, blocks, dtype = 3, 4, 2, 16, 12, torch.float16
    q = torch.randn(b, heads, head_dim, generator=g).to(DEVICE, dtype)
    k_cache, v_cache = (torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
                        for _ in range(2))
    tables = torch.randperm(blocks, generator=g)[:b * 4].view(b, 4).to(DEVICE, torch.int32)
    args = (q, k_cache, v_cache, tables, torch.tensor([50, 7, 0], dtype=torch.int32, device=DEVICE))
    plain, out = torch.empty_like(q), torch.empty_like(q)
    assert decode_attention(*args, plain, 0.1, max_seq_len=64, num_splits=splits) == splits
    limbs = empty_limbs(b, heads * head_dim, chunks, dtype, DEVICE)
    assert decode_attention(*args, out, 0.1, max_seq_len=64, num_splits=splits,
                            reduce=functools.partial(decode_reduce_limbs, limbs=limbs)) == splits
    assert torch.equal(out.cpu(), plain.cpu())
    want = x_limbs(plain.view(b, -1), chunks)
    assert torch.equal(limbs.q.cpu(), want.q.cpu()) and torch.equal(limbs.s.cpu(), want.s.cpu())
    assert plain[2].abs().sum() == 0 and not limbs.s[2].any()
    wide = empty_limbs(b, heads * head_dim, 2 * head_dim // 32, dtype, DEVICE)
    with pytest.raises(ValueError, match="whole steps"):
        decode_attention(*args, out, 0.1, max_seq_len=64, num_splits=splits,
                         reduce=functools.partial(decode_reduce_limbs, limbs=wide))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
def test_int4_engine_decodes_with_dp4a_inputs_stored_by_swiglu_and_attention(monkeypatch):
    """An int4 engine on the Triton backend (the interpreter) whose layers' kernel at 1 row of producer-stored input
    is the dp4a GEMV (as tuning picks it on a GPU): each decode step's SwiGLU and attention reduce (a context split
    into slices of 32 tokens, 256 on a GPU) store their layer's limbs, each the x_limbs of the output they store
    beside it, the layers after the norms make theirs with x_limbs, and the greedy tokens are the torch backend's
    int4 engine's."""
    from transformers import LlamaConfig

    from engine import LLM, EngineConfig, SamplingParams
    from engine.kernels import triton_decode
    from engine.quant import triton_int4_dp4a, tuning
    from engine.quant.triton_int4 import tuning_key
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    for n, k in ((256, 128), (128, 128), (512, 128), (128, 256)):  # qkv, o_proj, gate_up, down
        monkeypatch.setitem(tuning.chosen, tuning_key(1, n, k, 128, torch.float32, x_ordered=True),
                            dict(kernel="dp4a", block_n=128, chunks=1, split_k=2, serial=True))
    # a short prompt split as a GPU splits a long one: the interpreter's prefill of 300 tokens took most of a minute
    monkeypatch.setattr(triton_decode, "decode_num_splits",
                        functools.partial(triton_decode.decode_num_splits, min_tokens_per_split=32))
    calls = {"x_limbs": 0, "silu_and_mul_limbs": 0, "decode_reduce_limbs": 0}
    x_limbs = triton_int4_dp4a.x_limbs

    def checked(name, real):
        def run(*args, **kwargs):
            calls[name] += 1
            result = real(*args, **kwargs)
            if name == "decode_reduce_limbs":  # (acc, lse, out, num_splits, limbs)
                out, limbs = args[2], kwargs["limbs"]
                want = x_limbs(out.reshape(out.shape[0], -1), 1)
                assert torch.equal(limbs.q, want.q) and torch.equal(limbs.s, want.s)
            return result
        return run
    for name in calls:
        monkeypatch.setattr(triton_int4_dp4a, name, checked(name, getattr(triton_int4_dp4a, name)))
    prompt = torch.randint(3, 256, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM.random(config, EngineConfig(device="cpu", max_model_len=512, block_size=16, num_gpu_blocks=40,
                                              quantization="int4", attention_backend=backend),
                         dtype=torch.float32, seed=3)
        tokens[backend] = llm.generate([prompt], params)[0].token_ids
    assert tokens["triton"] == tokens["torch"]
    assert calls["decode_reduce_limbs"] == 2 * 3 and calls["silu_and_mul_limbs"] == 2 * 3  # 3 decode steps
    assert calls["x_limbs"] == 2 * 2 * 3  # the limbs kernel after the norms only: qkv_proj and gate_up_proj
