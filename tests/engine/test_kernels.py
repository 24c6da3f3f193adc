"""Triton attention kernels against the pure-torch reference, on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernel modules are imported (triton.jit picks the interpreter
at decoration time), so it is set here, above every engine.kernels.triton_* import; where CUDA is
present the same tests run compiled on the GPU instead. Shapes are small: the interpreter is slow.

Every case draws fresh random K/V, scatters each request over shuffled, non-contiguous physical
blocks, fills every cache slot that holds no token with NaN (so a kernel that reads past a request's
context, or through a block-table padding entry, fails), and poisons the output with NaN (so an
unwritten element fails).
"""
from __future__ import annotations

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from engine.kernels import select_backend  # noqa: E402
from engine.kernels.reference import random_paged_batch, write_kv_reference  # noqa: E402
from engine.kernels.reference import reference_on_cpu as reference  # noqa: E402
from engine.kernels.triton_cache import write_kv_triton  # noqa: E402
from engine.kernels.triton_decode import decode_attention, decode_num_splits  # noqa: E402
from engine.kernels.metadata import prefill_work, prefill_work_fits  # noqa: E402
from engine.kernels.triton_prefill import prefill_attention, prefill_block_q  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_batch(requests, **kw):
    return random_paged_batch(requests, device=DEVICE, **kw)


TOL = {torch.float32: 2e-3, torch.float16: 5e-3}


# --- write_kv ----------------------------------------------------------------------------------

def test_write_kv_matches_reference_through_strided_views():
    num_kv_heads, head_dim, block_size = 2, 64, 16
    g = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 9, 37
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    # key/value as views into a fused qkv projection: token stride is the fused width.
    fused = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=g).to(DEVICE)
    key = fused[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, 2 * num_kv_heads * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE)
    k_ref, v_ref = k_cache.clone().cpu(), v_cache.clone().cpu()
    write_kv_reference(key.cpu(), value.cpu(), k_ref, v_ref, slots)
    write_kv_triton(key, value, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.cpu(), k_ref)
    assert torch.equal(v_cache.cpu(), v_ref)


def test_write_kv_casts_to_cache_dtype_and_skips_negative_slots():
    num_kv_heads, head_dim, block_size = 1, 16, 8
    key = torch.randn(3, num_kv_heads, head_dim, device=DEVICE)
    value = torch.randn(3, num_kv_heads, head_dim, device=DEVICE)
    k_cache = torch.zeros(2, block_size, num_kv_heads, head_dim, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    write_kv_triton(key, value, k_cache, v_cache, torch.tensor([5, -1, 9], device=DEVICE))
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[5], key[0].half()) and torch.equal(flat_k[9], key[2].half())
    assert torch.equal(flat_v[5], value[0].half()) and torch.equal(flat_v[9], value[2].half())
    untouched = [s for s in range(2 * block_size) if s not in (5, 9)]
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


# --- decode ------------------------------------------------------------------------------------

DECODE_CASES = [
    # block_size, num_kv_heads, group, head_dim, num_splits, dtype
    (8, 2, 1, 64, 1, torch.float32),
    (16, 2, 4, 128, 3, torch.float32),
    (32, 1, 8, 64, None, torch.float16),
    (16, 2, 7, 80, 2, torch.float32),  # Qwen-like group of 7 and a head_dim that is no power of two
]


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,num_splits,dtype", DECODE_CASES)
def test_decode_matches_reference(block_size, num_kv_heads, group, head_dim, num_splits, dtype, heads_first):
    # Context lengths around block and tile edges, including 1 token and a slice count above the
    # number of tiles (empty slices).
    requests = [(0, 1), (15, 1), (64, 1), (130, 1), (200, 1)]
    q, k_cache, v_cache, meta, _, _ = make_batch(requests, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                                                 block_size=block_size, dtype=dtype, seed=block_size + group)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, scale, max_seq_len=meta.max_seq_len,
                     num_splits=num_splits, heads_first=heads_first)
    ref = reference(q, k_cache, v_cache, meta, scale)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_in_a_given_order_matches_the_batch_order(num_splits):
    # The programs take the requests in `order` (the runner's: longest context first): every row is still written,
    # each with exactly the values of the batch-order launch.
    requests = [(30, 1), (0, 1), (200, 1), (64, 1), (129, 1), (7, 1)]
    q, k_cache, v_cache, meta, _, _ = make_batch(requests, num_kv_heads=2, group=4, head_dim=64, block_size=16,
                                                 dtype=torch.float32, seed=3)
    scale = 0.125
    batch = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, batch, scale,
                     max_seq_len=meta.max_seq_len, num_splits=num_splits)
    lens = meta.seq_lens.tolist()
    for order in (sorted(range(len(lens)), key=lambda i: -lens[i]), [4, 1, 5, 0, 3, 2]):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, scale,
                         max_seq_len=meta.max_seq_len, num_splits=num_splits,
                         order=torch.tensor(order, dtype=torch.int32, device=DEVICE))
        assert torch.equal(out, batch)
    assert rel_err(batch.cpu(), reference(q, k_cache, v_cache, meta, scale)) < TOL[torch.float32]
    if num_splits > 1:
        return  # (the reduce kernel writes every row; the order must be a permutation)
    # the programs follow the order: rows it does not name are left alone
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, scale, max_seq_len=meta.max_seq_len,
                     num_splits=num_splits, order=torch.tensor([2, 2, 4, 4, 2, 4], dtype=torch.int32, device=DEVICE))
    assert torch.equal(out[[2, 4]], batch[[2, 4]]) and out[[0, 1, 3, 5]].isnan().all()


@pytest.mark.parametrize("q_dtype,q_size", [(torch.bfloat16, 1.0), (torch.float32, 1e5), (torch.bfloat16, 1e-6)])
def test_decode_over_fp8_caches_matches_reference_of_their_values(q_dtype, q_size):
    """e4m3 caches: the kernel converts the tiles to float16 and q with them, rescaled by a power of two (q of 1e5
    overflows float16 unless rescaled; the reference sees q as given), against the float32 reference over the
    caches' own values. NaN fills the slots no request owns, as above."""
    requests = [(0, 1), (15, 1), (64, 1), (130, 1)]
    q, k_cache, v_cache, meta, _, _ = make_batch(requests, num_kv_heads=2, group=4, head_dim=64, block_size=16,
                                                 dtype=torch.float32, seed=11)
    k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    q = (q * q_size).to(q_dtype)
    scale = 64 ** -0.5
    for splits in (1, 2):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k8, v8, meta.block_tables, meta.seq_lens, out, scale, max_seq_len=meta.max_seq_len,
                         num_splits=splits)
        ref = reference(q.float(), k8.float(), v8.float(), meta, scale)
        assert rel_err(out.cpu(), ref) < 5e-3, splits


def test_decode_split_count_fills_the_gpu_from_shapes():
    # Few long requests: many slices; a full batch: one slice.
    assert decode_num_splits(1, 8, 4096, 132) == 16
    assert decode_num_splits(256, 8, 4096, 132) == 1
    assert decode_num_splits(4, 8, 100, 132) == 1  # too short to split


# --- prefill -----------------------------------------------------------------------------------

PREFILL_CASES = [
    # block_size, num_kv_heads, group, head_dim, dtype
    (8, 2, 1, 64, torch.float32),
    (16, 1, 4, 128, torch.float32),
    (32, 1, 8, 64, torch.float16),
    (16, 1, 7, 80, torch.float32),
]


@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,dtype", PREFILL_CASES)
def test_prefill_matches_reference(block_size, num_kv_heads, group, head_dim, dtype):
    # A fresh prompt, prompts continuing from cached blocks (chunked prefill / prefix cache hits,
    # also starting mid-block), and a one-token chunk.
    requests = [(0, 45), (32, 20), (37, 9), (50, 1)]
    q, k_cache, v_cache, meta, _, _ = make_batch(requests, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                                                 block_size=block_size, dtype=dtype, seed=100 + block_size + group)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, scale,
                      max_query_len=meta.max_query_len)
    ref = reference(q, k_cache, v_cache, meta, scale)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_prefill_work_lists_every_query_block_longest_request_first():
    # Hand-computed: block_q 4. Requests by context after the step: 2 and 3 (9 tokens; ties keep the batch's
    # order), 0 (8), 1 (6). Each request's blocks together, the one seeing the most keys first: request 2 has
    # 9 new tokens (blocks 0-2), 3 has 2 after 7 cached (block 0), 0 has 8 new (blocks 0-1), 1 one after 5.
    # (Sorted by each block's keys alone, 3's block, seeing 9 keys, would come second.)
    work = prefill_work([8, 1, 9, 2], [8, 6, 9, 9], 4)
    assert [(int(w) >> 16, int(w) & 0xFFFF) for w in work] == [(2, 2), (2, 1), (2, 0), (3, 0), (0, 1), (0, 0), (1, 0)]
    work = prefill_work([10, 5, 1], [13, 5, 21], 4)
    assert work.dtype == np.int32
    assert [(int(w) >> 16, int(w) & 0xFFFF) for w in work] == [(2, 0), (0, 2), (0, 1), (0, 0), (1, 1), (1, 0)]
    # What an int32 item encodes: < 32768 requests of < 65536 blocks.
    assert prefill_work_fits(32767, 65535 * 4, 4) and not prefill_work_fits(32768, 4, 4)
    assert not prefill_work_fits(1, 65536 * 4, 4)
    with pytest.raises(ValueError, match="prefill_work: 1 requests of up to 262144 new tokens"):
        prefill_work([1 << 18], [1 << 18], 4)


@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,dtype", PREFILL_CASES[:2])
def test_prefill_over_a_work_list_matches_reference(block_size, num_kv_heads, group, head_dim, dtype):
    requests = [(0, 45), (32, 20), (37, 9), (50, 1)]
    q, k_cache, v_cache, meta, _, _ = make_batch(requests, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                                                 block_size=block_size, dtype=dtype, seed=200 + block_size + group)
    scale = head_dim ** -0.5
    block_q = prefill_block_q(group, DEVICE.type == "cuda")
    work = prefill_work([n for _, n in requests], [c + n for c, n in requests], block_q)
    ref = reference(q, k_cache, v_cache, meta, scale)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, scale,
                      max_query_len=meta.max_query_len, work=torch.from_numpy(work).to(DEVICE))
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    # The list is what runs: without the first request's blocks, its rows stay unwritten.
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, scale,
                      max_query_len=meta.max_query_len, work=torch.from_numpy(work[(work >> 16) != 0]).to(DEVICE))
    assert out[:45].isnan().all() and not out[45:].isnan().any()
    assert rel_err(out[45:].cpu(), ref[45:]) < TOL[dtype]


# --- the backend -------------------------------------------------------------------------------

@pytest.mark.parametrize("decode_order", [None, [2, 0, 1]])
@pytest.mark.parametrize("block_size,group,dtype", [(16, 4, torch.float16), (8, 8, torch.float32)])
def test_backend_mixed_decode_and_prefill_matches_torch_backend(block_size, group, dtype, decode_order, monkeypatch):
    requests = [(40, 1), (7, 1), (100, 1), (0, 30), (24, 17)]  # 3 decodes, then 2 prefill chunks
    q, k_cache, v_cache, meta, key, value = make_batch(
        requests, num_kv_heads=2, group=group, head_dim=64, block_size=block_size, dtype=dtype,
        seed=7 + block_size, fill_new_kv=False)
    if decode_order is not None:  # the runner's order of the decode rows (longest context first)
        meta.decode_order = torch.tensor(decode_order, dtype=torch.int32, device=DEVICE)
    backend = select_backend("triton", DEVICE)
    assert backend.name == "triton"
    # Poison whatever the backend allocates for its output, so an unwritten row shows up as NaN.
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    scale = 0.125
    k_ref, v_ref = k_cache.cpu().clone(), v_cache.cpu().clone()
    write_kv_reference(key.cpu(), value.cpu(), k_ref, v_ref, meta.slot_mapping.cpu())
    backend.write_kv(key, value, k_cache, v_cache, meta)
    # Slots that hold no token stay NaN in both: compare with NaN mapped to a sentinel.
    assert torch.equal(k_cache.cpu().nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_cache.cpu().nan_to_num(7.0), v_ref.nan_to_num(7.0))
    from engine.kernels import triton_backend
    orders = []

    def recording(*args, order=None, **kwargs):
        orders.append(order)
        return decode_attention(*args, order=order, **kwargs)
    monkeypatch.setattr(triton_backend, "decode_attention", recording)
    out = backend.attend(q, k_cache, v_cache, meta, scale)
    assert len(orders) == 1 and orders[0] is meta.decode_order  # the decode kernel gets the metadata's order
    ref = reference(q, k_ref, v_ref, meta, scale)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_select_triton_on_cpu_without_interpreter_names_the_setting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_backend"):
        select_backend("triton", torch.device("cpu"))
