"""Megatron-style sharding of a LlamaModel over the W ranks of a tensor-parallel group (gpt-fast style:
plain modules swapped for parallel ones; the model's forward is unchanged).

Rank r of W holds:
- qkv_proj, column-parallel by heads: its num_heads/W query heads and num_kv_heads/W KV heads (the q, k
  and v sections of the fused weight are sliced separately, so a rank's query heads keep the KV heads
  they attend with under grouped-query attention); the Attention module's head counts become per-rank.
- o_proj, row-parallel: the input columns of its query heads; the partial outputs are all-reduced.
- gate_up_proj, column-parallel: intermediate_size/W rows of the gate section and of the up section.
- down_proj, row-parallel: the matching input columns; all-reduced.
- embed_tokens, vocabulary-parallel: rows [r V'/W, (r+1) V'/W) of the table padded to V' (a multiple of
  W); a rank looks up the ids in its range, zeros the others, and the all-reduce adds the one non-zero row.
- lm_head, vocabulary-parallel: the same rows; each rank computes its logits slice and all-gathers them.
- norms (and the rotary tables) replicated.
- MoE layers: the router replicated; every expert split like the dense MLP (w13's gate and up rows
  column-parallel over I, w2's columns row-parallel), so each rank holds all experts' slices and
  all-reduces the partial sum of the chosen ones.

Every rank ends a decoder layer with the same residual stream (an all-reduce gives every rank the same
sum), so the hidden states, and the logits after the gather, are the same on all ranks.
Collectives use torch.distributed's default process group.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.llama import LlamaModel
from ..model.spec import ModelSpec


def check_tensor_parallel(spec: ModelSpec, world_size: int) -> None:
    """Raise ValueError (naming tensor_parallel_size) unless every rank can hold whole heads and MLP columns."""
    g = math.gcd(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, spec.moe_intermediate_size)
    if g % world_size:
        allowed = [d for d in range(1, g + 1) if g % d == 0]
        raise ValueError(
            f"tensor_parallel_size={world_size} must divide the model's num_heads={spec.num_heads}, "
            f"num_kv_heads={spec.num_kv_heads}, intermediate_size={spec.intermediate_size} and "
            f"moe_intermediate_size={spec.moe_intermediate_size} (each rank holds "
            f"whole attention heads and KV heads): use tensor_parallel_size in {allowed}")


def rank_spec(spec: ModelSpec, world_size: int) -> ModelSpec:
    """The shape one rank sees: its share of the query and KV heads (what its KV cache is sized for)."""
    return replace(spec, num_heads=spec.num_heads // world_size, num_kv_heads=spec.num_kv_heads // world_size)


def padded_vocab_size(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size


def shard_tensor(name: str, tensor: torch.Tensor, spec: ModelSpec, rank: int, world_size: int) -> torch.Tensor:
    """Rank's slice of one tensor of a full state dict with our fused names (engine/model/weights.py)."""
    w, r = world_size, rank
    if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return torch.cat([part.chunk(w, dim=0)[r] for part in tensor.split([q, kv, kv], dim=0)])
    if name.endswith("mlp.w13"):  # [E, 2I, H]
        return torch.cat([part.chunk(w, dim=1)[r] for part in tensor.chunk(2, dim=1)], dim=1)
    if name.endswith("mlp.w2"):  # [E, H, I]
        return tensor.chunk(w, dim=2)[r].contiguous()
    if name.endswith("mlp.gate.weight"):
        return tensor
    if name.endswith("gate_up_proj.weight"):
        return torch.cat([part.chunk(w, dim=0)[r] for part in tensor.chunk(2, dim=0)])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return tensor.chunk(w, dim=1)[r].contiguous()
    if name in ("embed_tokens.weight", "lm_head.weight"):
        pad = padded_vocab_size(spec.vocab_size, w) - tensor.shape[0]
        return F.pad(tensor, (0, 0, 0, pad)).chunk(w, dim=0)[r].contiguous()
    if name.endswith(("norm.weight", "layernorm.weight")):
        return tensor
    raise ValueError(f"no tensor-parallel rule for {name!r} (a quantized or unknown module)")


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T: the input features are split across ranks (each holds its
    columns of W), and an all-reduce adds the partial outputs. No bias (a bias would be added W times)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the (padded) embedding table; ids outside the range look up zeros,
    and the all-reduce leaves every rank with the one rank's row (an exact sum: the others add 0)."""

    def __init__(self, weight: nn.Parameter, rank: int):
        super().__init__()
        self.weight = weight
        self.start = rank * weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out)
        return out


class VocabParallelLMHead(nn.Module):
    """Each rank computes the logits of its vocabulary rows; an all-gather gives every rank all of them
    ([N, vocab_size], padding cut off), in the model dtype as the unsharded head does."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, world_size: int):
        super().__init__()
        self.weight = weight
        self.vocab_size, self.world_size = vocab_size, world_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


def _linear(weight: nn.Parameter, bias: nn.Parameter | None = None, cls=nn.Linear) -> nn.Linear:
    lin = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = weight
    if bias is not None:
        lin.bias = bias
    return lin


def shard_model(model: LlamaModel, rank: int, world_size: int) -> LlamaModel:
    """Swap `model`'s modules (in place) for rank's shards, slicing its weights; returns the model.

    Works on real weights and on the meta device (shapes only: build_shard fills them afterwards).
    """
    spec = model.spec
    check_tensor_parallel(spec, world_size)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head.weight included

    def piece(name: str) -> nn.Parameter:
        return nn.Parameter(shard_tensor(name, params[name].detach(), spec, rank, world_size))

    for i, layer in enumerate(model.layers):
        p, attn, mlp = f"layers.{i}.", layer.self_attn, layer.mlp
        bias = piece(p + "self_attn.qkv_proj.bias") if attn.qkv_proj.bias is not None else None
        attn.qkv_proj = _linear(piece(p + "self_attn.qkv_proj.weight"), bias)
        attn.o_proj = _linear(piece(p + "self_attn.o_proj.weight"), cls=RowParallelLinear)
        attn.num_heads //= world_size
        attn.num_kv_heads //= world_size
        attn.q_size, attn.kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        if hasattr(mlp, "w13"):  # mixture of experts
            mlp.w13, mlp.w2 = piece(p + "mlp.w13"), piece(p + "mlp.w2")
            mlp.tp_group = True
        else:
            mlp.gate_up_proj = _linear(piece(p + "mlp.gate_up_proj.weight"))
            mlp.down_proj = _linear(piece(p + "mlp.down_proj.weight"), cls=RowParallelLinear)
        mlp.intermediate_size //= world_size
    model.embed_tokens = VocabParallelEmbedding(piece("embed_tokens.weight"), rank)
    head = model.embed_tokens.weight if spec.tie_word_embeddings else piece("lm_head.weight")
    model.lm_head = VocabParallelLMHead(head, spec.vocab_size, world_size)
    model.tensor_parallel = (rank, world_size)
    return model


def build_shard(spec: ModelSpec, rank: int, world_size: int, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Rank's shard of a LlamaModel on `device`, weights allocated but not filled (see scatter_shards).

    Built on the meta device and cast there, so only the shard is ever allocated, in `dtype`.
    """
    with torch.device("meta"):
        model = LlamaModel(spec, spec.max_position_embeddings)
    model = shard_model(model, rank, world_size).to(dtype).to_empty(device=device)
    # As build_model does: the rotary tables are computed, in float32, on the device.
    model.init_rotary_(device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def scatter_shards(model: LlamaModel, weights=None) -> None:
    """Fill every rank's shard from rank 0's full tensors: one scatter per tensor, so each rank receives
    only its slices and no rank ever holds the whole model. Rank 0 passes `weights`, an iterator of
    (name, full tensor) in the model's parameter order (model.weights.full_weights: from the host copy, or
    drawn on rank 0's device one tensor at a time); the others pass None. All ranks call this together."""
    rank, world_size = model.tensor_parallel
    spec = model.spec
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is embed_tokens.weight, sent once
            chunks = None
            if rank == 0:
                full_name, full = next(weights)
                if full_name != name:
                    raise RuntimeError(f"shard order mismatch: {full_name!r} arrived for {name!r}")
                chunks = [shard_tensor(name, full, spec, r, world_size).to(param.device, param.dtype).contiguous()
                          for r in range(world_size)]
                del full
            dist.scatter(param.data, chunks, src=0)
