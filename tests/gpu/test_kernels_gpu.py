"""Triton attention kernels against the reference on the GPU: bf16 and the shapes of Llama-3.1-8B
(32 query heads, 8 KV heads, head_dim 128), KV block 16, contexts up to 4096 tokens.

The oracle is `paged_attention_reference`, run on the CPU in float32 over the same bf16 cache. Every
cache slot that holds no token is NaN and every output starts as NaN, as in tests/engine/test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
TOL = 1e-2  # bf16 operands: relative error between 1e-3 and 1e-2


def rel_err(out, ref):
    return ((out.float().cpu() - ref.float()).norm() / ref.float().norm()).item()


def make_batch(requests, block_size, seed, fill_new_kv=True):
    """requests: [(ctx_len, query_len)], decodes first. Returns q, caches, meta, new key/value (all on CUDA)."""
    from engine.kernels.reference import random_paged_batch
    return random_paged_batch(requests, num_kv_heads=NUM_KV_HEADS, group=NUM_HEADS // NUM_KV_HEADS, head_dim=HEAD_DIM,
                              block_size=block_size, dtype=DTYPE, seed=seed, device="cuda", fill_new_kv=fill_new_kv)


def reference(q, k_cache, v_cache, meta, scale):
    from engine.kernels.reference import reference_on_cpu
    return reference_on_cpu(q, k_cache, v_cache, meta, scale)


@pytest.mark.parametrize("block_size,num_splits", [(16, None), (16, 1), (16, 7), (8, None), (32, None), (128, 4)])
def test_decode_bf16(block_size, num_splits):
    from engine.kernels.triton_decode import decode_attention

    contexts = [4096, 1, 15, 16, 17, 511, 1000, 2049, 3333, 4095]
    q, k_cache, v_cache, meta, _, _ = make_batch([(c - 1, 1) for c in contexts], block_size, seed=block_size)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, HEAD_DIM ** -0.5,
                     max_seq_len=meta.max_seq_len, num_splits=num_splits)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert rel_err(out, reference(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)) < TOL


@pytest.mark.parametrize("num_seqs", [31, 32, 255, 256])
def test_decode_bf16_default_tiles_around_their_batch_bounds(num_seqs):
    """The default tile changes at 32 and 256 requests (decode_tile): each side of both bounds, ragged contexts."""
    from engine.kernels.triton_decode import decode_attention

    contexts = [1 + (i * 397) % 700 for i in range(num_seqs)]
    q, k_cache, v_cache, meta, _, _ = make_batch([(c - 1, 1) for c in contexts], 16, seed=num_seqs)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, HEAD_DIM ** -0.5,
                     max_seq_len=meta.max_seq_len)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert rel_err(out, reference(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)) < TOL


@pytest.mark.parametrize("block_size", [16, 64])
def test_prefill_bf16_continuing_from_cached_blocks(block_size):
    from engine.kernels.triton_prefill import prefill_attention

    requests = [(0, 1024), (1008, 517), (3000, 1096), (4095, 1), (0, 3)]
    q, k_cache, v_cache, meta, _, _ = make_batch(requests, block_size, seed=1 + block_size)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
                      HEAD_DIM ** -0.5, max_query_len=meta.max_query_len)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert rel_err(out, reference(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)) < TOL


def test_backend_mixed_batch_bf16():
    from engine.kernels import select_backend
    from engine.kernels.reference import write_kv_reference

    requests = [(4095, 1), (100, 1), (2047, 1), (0, 700), (1600, 300)]
    q, k_cache, v_cache, meta, key, value = make_batch(requests, 16, seed=3, fill_new_kv=False)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_reference(key, value, k_ref, v_ref, meta.slot_mapping)
    backend = select_backend("triton", torch.device("cuda"))
    backend.write_kv(key, value, k_cache, v_cache, meta)
    assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    out = backend.attend(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
    assert not out.isnan().any()
    assert rel_err(out, reference(q, k_ref, v_ref, meta, HEAD_DIM ** -0.5)) < TOL


def test_decode_step_captures_in_a_cuda_graph():
    """write_kv + attend for a decode batch, captured once and replayed on new inputs of the same shape."""
    from engine.kernels import select_backend

    backend = select_backend("triton", torch.device("cuda"))
    requests = [(c - 1, 1) for c in (4096, 33, 1200, 2500)]
    q, k_cache, v_cache, meta, key, value = make_batch(requests, 16, seed=5, fill_new_kv=False)
    static = dict(q=q.clone(), key=key.clone(), value=value.clone())
    meta.max_seq_len = 4096  # as a runner would capture: the longest allowed context, not this step's

    def step():
        backend.write_kv(static["key"], static["value"], k_cache, v_cache, meta)
        return backend.attend(static["q"], k_cache, v_cache, meta, HEAD_DIM ** -0.5)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    # New inputs in the same buffers: other queries, other new K/V, other context lengths.
    static["q"].copy_(torch.randn_like(q))
    static["key"].copy_(torch.randn_like(key))
    static["value"].copy_(torch.randn_like(value))
    new_lens = [4000, 20, 1190, 2]
    tables = meta.block_tables.cpu()
    meta.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    meta.slot_mapping.copy_(torch.tensor([int(tables[i, (n - 1) // 16]) * 16 + (n - 1) % 16
                                          for i, n in enumerate(new_lens)]))
    meta.seq_lens_cpu = new_lens
    graph.replay()
    torch.cuda.synchronize()
    assert not graph_out.isnan().any()
    assert rel_err(graph_out, reference(static["q"], k_cache, v_cache, meta, HEAD_DIM ** -0.5)) < TOL
