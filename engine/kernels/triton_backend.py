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
from .triton_prefill import prefill_attention, prefill_block_q


class TritonBackend:
    """Paged attention with Triton: the decode kernel for the first meta.num_decodes requests (one
    new token each, rows 0..num_decodes-1 of q), the prefill kernel for the rest."""

    name = "triton"
    orders_decodes = True  # the decode kernel reads AttentionMetadata.decode_order (the runner computes it)

    @staticmethod
    def prefill_block_q(group: int, device: torch.device) -> int:
        """Query tokens of a block of the prefill kernel's work list (AttentionMetadata.prefill_work)."""
        return prefill_block_q(group, device.type == "cuda")

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        write_kv_triton(key, value, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        return self._attend(q, k_cache, v_cache, meta, scale, dict(sliding_window=sliding_window, softcap=softcap))[0]

    def _attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, opts: dict,
                reduce=None) -> tuple[torch.Tensor, int]:
        """attend's output and the decode kernel's split count (0 without decode rows); reduce: decode_attention's."""
        out = torch.empty_like(q)
        num_decodes = meta.num_decodes
        num_seqs = meta.seq_lens.shape[0]
        splits = 0
        if num_decodes > 0:
            splits = decode_attention(q, k_cache, v_cache, meta.block_tables[:num_decodes],
                                      meta.seq_lens[:num_decodes], out, scale, max_seq_len=meta.max_seq_len,
                                      order=meta.decode_order, reduce=reduce, **opts)
        if num_seqs > num_decodes:
            # The runner's work list, when its blocks are this kernel's (the group is the layer's own).
            block_q = self.prefill_block_q(q.shape[1] // k_cache.shape[2], q.device)
            work = meta.prefill_work if meta.prefill_block_q == block_q else None
            prefill_attention(q, k_cache, v_cache, meta.block_tables[num_decodes:], meta.seq_lens[num_decodes:],
                              meta.query_start_loc[num_decodes:], out, scale, max_query_len=meta.max_query_len,
                              work=work, **opts)
        return out, splits
