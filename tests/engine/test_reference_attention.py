"""The pure-torch paged attention against SDPA on contiguous K/V; the batched decode path against it."""
import pytest
import torch
from torch.nn import functional as F

from engine.kernels import TorchBackend
from engine.kernels.metadata import AttentionMetadata
from engine.kernels.reference import paged_attention_reference, write_kv_reference


def build_case(seq_lens, query_lens, block_size, num_heads, num_kv_heads, head_dim=16, seed=0):
    """Random K/V for every request written into shuffled physical blocks, and the matching metadata."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables, start = [], 0
    for n in blocks_per:
        tables.append(perm[start:start + n])
        start += n
    bt = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    ks = [torch.randn(s, num_kv_heads, head_dim, generator=g) for s in seq_lens]
    vs = [torch.randn(s, num_kv_heads, head_dim, generator=g) for s in seq_lens]
    for i, s in enumerate(seq_lens):
        pos = torch.arange(s)
        slots = bt[i, pos // block_size].long() * block_size + pos % block_size
        write_kv_reference(ks[i], vs[i], k_cache, v_cache, slots)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), query_start_loc=qsl,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=bt,
                             num_decodes=sum(1 for n in query_lens if n == 1) if query_lens[0] == 1 else 0,
                             max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return q, k_cache, v_cache, meta, ks, vs


def sdpa_expected(q, meta, ks, vs, num_heads):
    out = []
    qsl = meta.query_start_loc.tolist()
    for i, (k, v) in enumerate(zip(ks, vs)):
        qi = q[qsl[i]:qsl[i + 1]]
        n, s = qi.shape[0], k.shape[0]
        group = num_heads // k.shape[1]
        mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]
        o = F.scaled_dot_product_attention(qi.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
                                           v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_reference_matches_sdpa_for_chunked_prefill(block_size, heads):
    # A fresh prompt, a chunk continuing from 40 cached tokens, and a one-token decode.
    q, kc, vc, meta, ks, vs = build_case([30, 57, 9], [30, 17, 1], block_size, *heads)
    out = paged_attention_reference(q, kc, vc, meta, 16 ** -0.5)
    torch.testing.assert_close(out, sdpa_expected(q, meta, ks, vs, heads[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_decode_matches_reference(block_size):
    q, kc, vc, meta, ks, vs = build_case([5, 33, 64, 1, 20], [1, 1, 1, 1, 7], block_size, 8, 2)
    meta.num_decodes = 4
    out = TorchBackend().attend(q, kc, vc, meta, 16 ** -0.5)
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, meta, 16 ** -0.5), atol=1e-5, rtol=1e-5)
