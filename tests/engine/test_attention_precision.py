"""Both attention backends against a float32 oracle on a realistic shape (Llama-style GQA, head_dim 128,
contexts of hundreds of tokens, 16-token blocks), float16 inputs (Triton runs in its interpreter on the CPU,
where bf16 dots are wrong; on a GPU the same test runs compiled).

The oracle is paged_attention_reference in float32 over the same 16-bit inputs. The torch backend computes in
float32 and rounds its output once, so its error is the output's rounding. The Triton kernels' P @ V dot takes
P in the model dtype; with its rounding residue added (pv_dot's PRECISE_PV, the default for 16-bit models) the
kernels are as accurate as float32 before the output's rounding, so neither backend is further off.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from engine.kernels import select_backend  # noqa: E402
from engine.kernels.reference import random_paged_batch  # noqa: E402
from engine.kernels.reference import reference_on_cpu as oracle  # noqa: E402
from engine.kernels.triton_decode import decode_attention  # noqa: E402
from engine.kernels.triton_prefill import prefill_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {"decode": [(300, 1), (517, 1), (64, 1), (900, 1)], "prefill": [(0, 96), (200, 64)]}
SCALE = 128 ** -0.5


def batch(kind):
    return random_paged_batch(CASES[kind], num_kv_heads=2, group=4, head_dim=128, block_size=16,
                              dtype=torch.float16, seed=3, device=DEVICE)


def errors(out, ref):
    d = out.float().cpu() - ref
    return (d.norm() / ref.norm()).item(), d.abs().max().item()


@pytest.mark.parametrize("kind", list(CASES))
def test_each_backend_is_within_the_outputs_rounding_of_the_float32_oracle(kind):
    q, k_cache, v_cache, meta, _, _ = batch(kind)
    ref = oracle(q, k_cache, v_cache, meta, SCALE)
    rel_round, max_round = errors(ref.half(), ref)  # rounding the exact answer to float16: the floor
    for name in ("torch", "triton"):
        backend = select_backend(name, DEVICE)
        rel, worst = errors(backend.attend(q, k_cache, v_cache, meta, SCALE), ref)
        assert rel <= 1.02 * rel_round, (name, rel, rel_round)
        assert worst <= 1.5 * max_round, (name, worst, max_round)


@pytest.mark.parametrize("kind", list(CASES))
def test_triton_kernels_match_float32_before_the_output_rounding(kind):
    """Written into a float32 output, the kernels' own error: float32-level with P's residue, and P's bf16/fp16
    rounding (about the size of the output's rounding) without it."""
    q, k_cache, v_cache, meta, _, _ = batch(kind)
    ref = oracle(q, k_cache, v_cache, meta, SCALE)
    rel = {}
    for precise in (True, False):
        out = torch.full(q.shape, float("nan"), device=DEVICE)
        if kind == "decode":
            decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, SCALE,
                             max_seq_len=meta.max_seq_len, precise_pv=precise)
        else:
            prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
                              SCALE, max_query_len=meta.max_query_len, precise_pv=precise)
        rel[precise] = errors(out, ref)[0]
    assert rel[True] < 5e-6
    assert rel[False] > 20 * rel[True]
