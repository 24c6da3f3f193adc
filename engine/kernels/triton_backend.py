"""TritonBackend: the attention backend for CUDA, built from the Triton kernels beside it.

Same interface as TorchBackend (engine/kernels/__init__.py). Nothing here reads a device value on
the host (no .item(), .tolist(), no shape taken from a tensor's contents): grid sizes come from
tensor shapes and from meta.max_query_len / meta.max_seq_len, so a decode step can be captured in
a CUDA graph. Scratch for the split-K decode is allocated per call from torch's caching allocator.
"""
from __future__ import annotations

import torch

from .metadata import AttentionMetadata
from .triton_cache import write_kv_triton
from .triton_decode import decode_attention
from .triton_prefill import prefill_attention


class TritonBackend:
    """Paged attention with Triton: the decode kernel for the first meta.num_decodes requests (one
    new token each, rows 0..num_decodes-1 of q), the prefill kernel for the rest."""

    name = "triton"

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        write_kv_triton(key, value, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        opts = dict(sliding_window=sliding_window, softcap=softcap)
        out = torch.empty_like(q)
        num_decodes = meta.num_decodes
        num_seqs = meta.seq_lens.shape[0]
        if num_decodes > 0:
            decode_attention(q, k_cache, v_cache, meta.block_tables[:num_decodes], meta.seq_lens[:num_decodes],
                             out, scale, max_seq_len=meta.max_seq_len, order=meta.decode_order, **opts)
        if num_seqs > num_decodes:
            prefill_attention(q, k_cache, v_cache, meta.block_tables[num_decodes:], meta.seq_lens[num_decodes:],
                              meta.query_start_loc[num_decodes:], out, scale, max_query_len=meta.max_query_len,
                              **opts)
        return out
