"""Pure-torch mixture-of-experts: routing and the expert MLPs, the oracle of the fused kernel in moe.py
and the CPU path.

Layouts (E experts, hidden size H, expert intermediate size I, T tokens, top-k routing):
    x:            [T, H]
    w13:          [E, 2 I, H]   rows 0..I-1 the gate projection, rows I..2I-1 the up projection
    w2:           [E, H, I]     the down projection
    topk_weights: [T, k] float32; topk_ids: [T, k] int64 (distinct experts per token)
    out:          [T, H] = sum_j topk_weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, j]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] float32, topk_ids [T, k] int64): softmax over all experts in float32, the k
    largest, renormalised to sum 1 when `renormalize` (Mixtral; Qwen3-MoE's norm_topk_prob), as transformers."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """The MoE output [T, H] in x's dtype: one gathered matmul per chosen expert, as transformers' loop."""
    out = torch.zeros_like(x)
    num_experts = w13.shape[0]
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // topk_ids.shape[1]
        gate, up = F.linear(x[tokens], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        y = y * topk_weights.flatten()[pairs, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
