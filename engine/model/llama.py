"""A Llama-family decoder (Llama, Mistral, Qwen2) whose attention reads and writes the paged KV cache.

The model is a model and nothing else: it takes flat token ids, positions, the per-layer caches and
an AttentionMetadata, and returns hidden states. Q/K/V and gate/up projections are fused into one
matmul each; the loader (weights.py) concatenates the checkpoint's separate tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.metadata import AttentionMetadata
from .rotary import RotaryEmbedding
from .spec import ModelSpec


class RMSNorm(nn.Module):
    """Holds the weight; the backend computes norm(residual + x) and the new residual in one op."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual, backend):
        return backend.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, backend):
        k_cache, v_cache = kv_cache
        # Rotates q and k, and writes k and v into the paged cache (one fused kernel on CUDA).
        q = backend.rotary_write_kv(self.qkv_proj(x), positions, self.rotary, k_cache, v_cache, meta,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
        out = backend.attend(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.intermediate_size = spec.intermediate_size
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x, backend):
        return self.down_proj(backend.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rotary)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, positions, x, residual, kv_cache, meta, backend):
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them."""
        x, residual = self.input_layernorm(x, residual, backend)
        x = self.self_attn(positions, x, kv_cache, meta, backend)
        x, residual = self.post_attention_layernorm(x, residual, backend)
        return self.mlp(x, backend), residual


class LlamaModel(nn.Module):
    """Decoder stack + LM head. forward() -> hidden states [T, hidden]; compute_logits() -> [N, vocab]."""

    def __init__(self, spec: ModelSpec, max_positions: int):
        super().__init__()
        self.spec = spec
        rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, rotary) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata, backend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, backend)
        return self.norm(x, residual, backend)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
