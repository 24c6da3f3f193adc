"""AttentionMetadata: what one forward pass needs to find each request's KV in the paged cache."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of a batch of requests over the paged KV cache.

    The batch is a flat run of T new tokens from B requests, request i owning the tokens
    query_start_loc[i]:query_start_loc[i+1]. The first num_decodes requests have exactly one new
    token each (decode); the rest are prefill chunks of any length.

    slot_mapping:    [T] int64, physical slot (block_id * block_size + offset) each new token's K/V goes to.
    query_start_loc: [B + 1] int32, cumulative new-token counts.
    seq_lens:        [B] int32, tokens of context per request after this step (cached + new).
    block_tables:    [B, max_blocks_per_seq] int32, physical block ids in sequence order (padding unspecified).
    The new tokens of request i sit at positions seq_lens[i] - query_len_i ... seq_lens[i] - 1, and
    attend causally to every earlier position of their own request.
    decode_order:    [num_decodes] int32 or None, a permutation of the decode rows: the order the decode kernel's
                     programs take them in (the runner's: longest context first); None: batch order.
    prefill_work:    [items] int32 or None, the prefill rows' (request, query block) pairs for a backend that runs
                     one program a pair (prefill_work(); the Triton backend's prefill kernel), blocks of
                     prefill_block_q tokens; None: the backend's own grid.
    k_scale, v_scale: dequantization scales of an fp8 KV cache (a cached code c stands for c * scale);
    ignored for 16/32-bit caches. The Triton kernels only cast (they assume 1.0, see engine/quant/kv_cache.py).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    # Host copies, so the torch reference can loop without device syncs.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    decode_order: torch.Tensor | None = None
    prefill_work: torch.Tensor | None = None
    prefill_block_q: int = 0
    k_scale: float = 1.0
    v_scale: float = 1.0
    # KV cache groups (engine/kv/groups.py): the metadata of each group, whose block tables and slot mapping are
    # the group's own (the rest is shared); a layer of group g reads groups[g]. None: one table for every layer.
    groups: tuple | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def prefill_work_fits(num_requests: int, max_query_len: int, block_q: int) -> bool:
    """Whether prefill_work can encode the pairs of num_requests requests of up to max_query_len new tokens (an
    int32 item holds a request < 32768 and a block < 65536)."""
    return num_requests < 1 << 15 and -(-max_query_len // block_q) < 1 << 16


def prefill_work(query_lens, seq_lens, block_q: int) -> np.ndarray:
    """prefill_attention's work list: every (request, query block) pair as request << 16 | block, the requests
    with the most keys first (their long programs start at once and the short ones fill in behind them), each
    request's blocks together, the one whose last token sees the most keys first: programs that run side by side
    read the same K/V, which stays in L2. On the H200 that ran the 1000-request trace's prefill steps 1.04x faster
    than the pairs sorted by their keys alone (benchmarks/prefill_trace_ab.py, prefill_work_orders_h200.json)."""
    qlens, lens = np.asarray(query_lens, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64)
    if not prefill_work_fits(len(qlens), int(qlens.max(initial=0)), block_q):
        raise ValueError(f"prefill_work: {len(qlens)} requests of up to {qlens.max()} new tokens in blocks of "
                         f"{block_q}; the work list holds < 32768 requests of < 65536 blocks")
    blocks = -(-qlens // block_q)
    order = np.argsort(-lens, kind="stable")
    counts = blocks[order]
    seq = np.repeat(order, counts)
    block = np.repeat(np.cumsum(counts) - 1, counts) - np.arange(len(seq))  # a request's last item is its block 0
    return (seq << 16 | block).astype(np.int32)
