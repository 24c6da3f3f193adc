"""AttentionMetadata: what one forward pass needs to find each request's KV in the paged cache."""
from __future__ import annotations

from dataclasses import dataclass

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
