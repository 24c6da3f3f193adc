"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router and E SwiGLU experts stored as stacked tensors.

w13 [E, 2 I, H] holds each expert's gate and up rows, w2 [E, H, I] its down projection (the layouts of
engine/kernels/moe_reference.py). On the Triton backend the experts run as the fused kernel
(engine/kernels/moe.py), elsewhere as the pure-torch reference; the router and the routing rule are
shared. Neither the router nor the experts are nn.Linear, so weight quantization leaves them in the model
dtype. Under tensor parallelism each rank holds every expert's slice of I (see engine/distributed/sharding.py)
and all-reduces the partial sums (tp_group set).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.moe_reference import fused_moe_reference, route_topk
from .spec import ModelSpec


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class MoEMLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        e, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.num_experts, self.top_k, self.renormalize = e, spec.num_experts_per_tok, spec.norm_topk_prob
        self.intermediate_size = i
        self.gate = Router(e, h)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.tp_group = False  # set by sharding: all-reduce the partial outputs
        # The fused kernels' path (engine/kernels/moe.py fused_moe_from_logits): "auto" picks by token count
        # (pick_path); benchmarks set "gemv", "dedup" or "grouped" on every layer (then reconfigure, so the
        # CUDA graphs are captured with it) to compare.
        self.path = "auto"

    def forward(self, x: torch.Tensor, backend, routing_out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]; the chosen experts' ids are copied into routing_out ([T, k]) if given."""
        logits = self.gate(x)
        if getattr(backend, "name", "torch") == "triton":
            from ..kernels.moe import fused_moe_from_logits  # lazily: triton is optional on CPU machines
            out = fused_moe_from_logits(x, logits, self.w13, self.w2, self.top_k, self.renormalize, routing_out,
                                        path=self.path)
        else:
            weights, ids = route_topk(logits, self.top_k, self.renormalize)
            if routing_out is not None:
                routing_out.copy_(ids)
            out = fused_moe_reference(x, self.w13, self.w2, weights, ids)
        if self.tp_group:
            torch.distributed.all_reduce(out)
        return out
