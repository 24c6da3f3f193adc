"""Attention backends: the pure-torch reference (CPU, oracle) and the Triton kernels (CUDA).

A backend writes the new tokens' K/V into the paged cache and runs attention over it; the model
calls nothing else. `select_backend` resolves "auto" and records which backend runs, so a slow
path is never taken silently.
"""
from __future__ import annotations

import torch

from .metadata import AttentionMetadata
from .reference import (add_rms_norm_reference, paged_attention_reference, paged_decode_attention_torch,
                        rotate_reference, silu_and_mul_reference, write_kv_reference)


class TorchBackend:
    """Gather-then-attend in plain torch: decodes batched, prefills one request at a time.

    Correct everywhere, fast nowhere: the CPU path, and the oracle's twin on the GPU. Besides
    attention, a backend supplies the element-wise ops around it (norm, rotary + cache write,
    SwiGLU), which the Triton backend fuses into one kernel each.
    """

    name = "torch"

    def add_rms_norm(self, x, residual, weight, eps):
        return add_rms_norm_reference(x, residual, weight, eps)

    def rotary_write_kv(self, qkv, positions, rotary, k_cache, v_cache, meta, num_heads, num_kv_heads, head_dim):
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = rotate_reference(q.view(-1, num_heads, head_dim), positions, rotary.cos, rotary.sin)
        k = rotate_reference(k.view(-1, num_kv_heads, head_dim), positions, rotary.cos, rotary.sin)
        self.write_kv(k, v.view(-1, num_kv_heads, head_dim), k_cache, v_cache, meta)
        return q

    def silu_and_mul(self, x):
        return silu_and_mul_reference(x)

    def linear(self, x, linear):
        """linear(x): the attention block's output projection (a GEMV kernel of the Triton backend's at decode size)."""
        return linear(x)

    def attend_linear(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, linear, **opts):
        """linear(attend(...)) of the heads' outputs side by side: attention and its output projection, which the
        Triton backend may join (the decode reduce storing an int4 layer's input limbs)."""
        return self.linear(self.attend(q, k_cache, v_cache, meta, scale, **opts).reshape(q.shape[0], -1), linear)

    def norm_linear(self, x, residual, norm, linear):
        """(linear(norm(x + residual)), x + residual): a block's input norm and first projection, which the
        Triton backend runs as one kernel at decode size."""
        x, residual = self.add_rms_norm(x, residual, norm.weight, norm.eps)
        return linear(x), residual

    def silu_linear(self, h, linear):
        """linear(silu_and_mul(h)): SwiGLU's activation and down projection (one kernel, as above). h is the
        caller's gate/up projection, dead after this: a backend may overwrite it."""
        return linear(self.silu_and_mul(h))

    def write_kv(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        if k_cache.dtype == torch.float8_e4m3fn:
            from ..quant.kv_cache import write_kv_fp8  # lazily: engine.quant imports the model, which imports us
            write_kv_fp8(key, value, k_cache, v_cache, meta.slot_mapping, meta.k_scale, meta.v_scale)
            return
        write_kv_reference(key, value, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """sliding_window / softcap: this layer's window (tokens) and score soft-cap, as in
        paged_attention_reference; None: full causal attention, no cap."""
        opts = dict(sliding_window=sliding_window, softcap=softcap)
        if k_cache.dtype == torch.float8_e4m3fn and (meta.k_scale != 1.0 or meta.v_scale != 1.0):
            # fp8 cache: the kernels below cast tiles to float; the scales fold into the softmax
            # scale (K) and the output (V), as engine/quant/kv_cache.py explains.
            return self._attend(q, k_cache, v_cache, meta, scale * meta.k_scale, opts) * meta.v_scale
        return self._attend(q, k_cache, v_cache, meta, scale, opts)

    def _attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, opts=None) -> torch.Tensor:
        opts = opts or {}
        d = meta.num_decodes
        if d == 0:
            return paged_attention_reference(q, k_cache, v_cache, meta, scale, **opts)
        out = torch.empty_like(q)
        out[:d] = paged_decode_attention_torch(q[:d], k_cache, v_cache, meta.block_tables[:d], meta.seq_lens[:d],
                                               scale, **opts)
        if d < meta.num_seqs:
            qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
            rest = AttentionMetadata(
                slot_mapping=meta.slot_mapping[d:], query_start_loc=meta.query_start_loc[d:] - d,
                seq_lens=meta.seq_lens[d:], block_tables=meta.block_tables[d:], num_decodes=0,
                max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                query_start_loc_cpu=[x - d for x in qsl[d:]] if qsl else None,
                seq_lens_cpu=lens[d:] if lens else None)
            out[d:] = paged_attention_reference(q[d:], k_cache, v_cache, rest, scale, **opts)
        return out


def select_backend(name: str, device: torch.device):
    """The backend for `name` ("auto" | "torch" | "triton") on `device`."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        # Imported lazily: triton is optional on CPU machines, and its kernels are compiled (or
        # interpreted) according to TRITON_INTERPRET when their module is imported.
        import os
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"attention_backend='triton' needs a CUDA device, got {device.type!r}: use "
                             "attention_backend='torch' or 'auto' (or set TRITON_INTERPRET=1 to run the kernels "
                             "in Triton's slow CPU interpreter, for tests)")
        try:
            from .triton_fused import TritonFusedBackend
        except ImportError as exc:
            raise ValueError(f"attention_backend='triton' needs the triton package, which failed to import "
                             f"({exc}): install triton or use attention_backend='torch'") from exc
        return TritonFusedBackend()
    raise ValueError(f"attention_backend={name!r} is not allowed: choose 'auto', 'torch' or 'triton'")


__all__ = ["AttentionMetadata", "TorchBackend", "select_backend", "paged_attention_reference",
           "write_kv_reference"]
