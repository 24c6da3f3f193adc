"""A generalised decoder whose attention reads and writes the paged KV cache.

Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, Mixtral and Qwen3-MoE are one stack with per-family options
from the ModelSpec (q/k norms, Gemma's sandwich norms and embedding scale, sliding-window layers,
soft-capping, mixture-of-experts MLPs). The model is a model and nothing else: it takes flat token ids,
positions, the per-layer caches and an AttentionMetadata, and returns hidden states. Q/K/V and gate/up
projections are fused into one matmul each; the loader (weights.py) concatenates the checkpoint's tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.metadata import AttentionMetadata
from ..kv.groups import kv_cache_groups, layer_group_slots
from .moe import MoEMLP
from .rotary import RotaryEmbedding
from .spec import ModelSpec


class RMSNorm(nn.Module):
    """Holds the weight; the backend computes norm(residual + x) and the new residual in one op.
    (Gemma's (1 + w) norms hold 1 + w: the loader adds the 1.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual, backend):
        return backend.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.rotary = rotary
        self.scale = spec.attn_scale
        self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        # Passed to the backend only when set, so backends without them still run the plain families.
        self.attend_options = {}
        if spec.layer_window(layer_idx) is not None:
            self.attend_options["sliding_window"] = spec.layer_window(layer_idx)
        if spec.attn_softcap is not None:
            self.attend_options["softcap"] = float(spec.attn_softcap)
        # This layer's KV cache group: it picks the group's block table when the runner keeps one per group.
        self.kv_group = layer_group_slots(kv_cache_groups(spec.layer_windows, spec.num_layers))[layer_idx][0]

    def _norm_qk(self, qkv, backend):
        if getattr(backend, "name", "torch") == "triton":
            from ..kernels.qk_norm import qk_norm_triton_  # lazily: triton is optional on CPU machines
            return qk_norm_triton_(qkv, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.num_kv_heads,
                                   self.head_dim, self.q_norm.eps)
        t, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, d), None, backend)[0].view(t, -1)
        k = self.k_norm(k.reshape(-1, d), None, backend)[0].view(t, -1)
        return torch.cat([q, k, v], dim=-1)

    def forward(self, positions, qkv, kv_cache, meta: AttentionMetadata, backend):
        """The attention block after its QKV projection (the decoder layer runs that with its input norm)."""
        if meta.groups is not None:
            meta = meta.groups[self.kv_group]
        k_cache, v_cache = kv_cache
        if self.q_norm is not None:
            qkv = self._norm_qk(qkv, backend)
        # Rotates q and k, and writes k and v into the paged cache (one fused kernel on CUDA).
        q = backend.rotary_write_kv(qkv, positions, self.rotary, k_cache, v_cache, meta,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
        return backend.attend_linear(q, k_cache, v_cache, meta, self.scale, self.o_proj, **self.attend_options)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.intermediate_size = spec.intermediate_size
        self.gelu = spec.hidden_act == "gelu_pytorch_tanh"
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x, backend, routing_out=None):
        return self.activate_down(self.gate_up_proj(x), backend)

    def activate_down(self, h, backend):
        """down_proj(act(gate) * up) of the gate/up projection h."""
        if self.gelu:  # Gemma: GeGLU with tanh-approximated GELU (no fused kernel: plain torch)
            gate, up = h.chunk(2, dim=-1)
            return self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up)
        return backend.silu_linear(h, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, rotary, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MoEMLP(spec) if spec.is_moe_layer(layer_idx) else MLP(spec)
        self.sandwich = spec.gemma_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, meta, backend, routing_out=None):
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them.
        Each norm that feeds a projection goes through backend.norm_linear, which may fuse the two."""
        qkv, residual = backend.norm_linear(x, residual, self.input_layernorm, self.self_attn.qkv_proj)
        x = self.self_attn(positions, qkv, kv_cache, meta, backend)
        if not self.sandwich:
            if isinstance(self.mlp, MLP):
                h, residual = backend.norm_linear(x, residual, self.post_attention_layernorm, self.mlp.gate_up_proj)
                return self.mlp.activate_down(h, backend), residual
            x, residual = self.post_attention_layernorm(x, residual, backend)
            return self.mlp(x, backend, routing_out), residual
        # Gemma: the attention and MLP outputs are normed before they join the residual stream.
        x = self.post_attention_layernorm(x, None, backend)[0]
        x, residual = self.pre_feedforward_layernorm(x, residual, backend)
        x = self.mlp(x, backend, routing_out)
        return self.post_feedforward_layernorm(x, None, backend)[0], residual


class LlamaModel(nn.Module):
    """Decoder stack + LM head. forward() -> hidden states [T, hidden]; compute_logits() -> [N, vocab].

    MoE models copy each step's expert choices into `routing` ([num_moe_layers, capacity, k], grown on
    demand outside CUDA graph capture); expert_load() counts them (tokens per expert per layer).
    """

    def __init__(self, spec: ModelSpec, max_positions: int):
        super().__init__()
        self.spec = spec
        self.max_positions = max_positions
        self.rotary = self._rotary(spec.rope_theta, spec.rope_scaling)
        self.rotary_local = self._rotary(spec.rope_local_theta, None) if spec.rope_local_theta else None
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, self.rotary_local if self.rotary_local is not None and spec.layer_window(i) is not None
                         else self.rotary, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.embed_scale = math.sqrt(spec.hidden_size) if spec.gemma_norms else None
        self.routing: torch.Tensor | None = None

    def _rotary(self, theta, scaling) -> RotaryEmbedding:
        return RotaryEmbedding(self.spec.head_dim, self.max_positions, theta, scaling)

    def init_rotary_(self, device: torch.device) -> None:
        """Recompute the rotary tables on `device` in float32 (after a build on the meta device)."""
        for rotary, theta, scaling in ((self.rotary, self.spec.rope_theta, self.spec.rope_scaling),
                                       (self.rotary_local, self.spec.rope_local_theta, None)):
            if rotary is not None:
                fresh = self._rotary(theta, scaling)
                rotary.cos, rotary.sin = fresh.cos.to(device), fresh.sin.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata, backend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if self.embed_scale is not None:
            # As transformers: the scale rounded to the model dtype first (on the host: no device op to capture).
            x = x * torch.tensor(self.embed_scale).to(x.dtype).item()
        routing = self._routing_buffer(input_ids.shape[0], x.device) if self.spec.is_moe else None
        j = 0
        for layer, kv_cache in zip(self.layers, kv_caches):
            out = None
            if routing is not None and isinstance(layer.mlp, MoEMLP):
                out, j = routing[j, :input_ids.shape[0]], j + 1
            x, residual = layer(positions, x, residual, kv_cache, meta, backend, out)
        return self.norm(x, residual, backend)[0]

    def _routing_buffer(self, num_tokens: int, device) -> torch.Tensor:
        if self.routing is None or self.routing.shape[1] < num_tokens or self.routing.device != device:
            cap = max(num_tokens, 256)
            self.routing = torch.zeros(self.spec.num_moe_layers, cap, self.spec.num_experts_per_tok,
                                       dtype=torch.int64, device=device)
        return self.routing

    def expert_load(self, num_tokens: int) -> torch.Tensor | None:
        """Tokens routed to each expert, [num_moe_layers, num_experts] int64 on the model's device (no host sync),
        by the first num_tokens tokens of the last forward pass (a CUDA-graph batch's padding rows come after
        them); None for a dense model."""
        if not self.spec.is_moe or self.routing is None:
            return None
        ids = self.routing[:, :num_tokens].flatten(1)
        counts = torch.zeros(ids.shape[0], self.spec.num_experts, dtype=torch.int64, device=ids.device)
        return counts.scatter_add_(1, ids, torch.ones_like(ids))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap_logits(self.lm_head(hidden).float())

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final soft-cap, c * tanh(logits / c); the identity for other families."""
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
