"""AWQ (Lin et al., 2023), activation-aware weight quantization: before rounding a Linear's weight to
4-bit groups, scale each input channel up by s (and the layer's input down by s, folded into the
op that produces it), so the channels that carry large activations lose less to rounding.

Per decoder layer, on calibration inputs X (the layer's inputs, as the layers before it produce them):
1. Scale search, for each group of Linears that share an input and have a foldable producer:
       qkv_proj     <- input_layernorm's weight
       o_proj       <- the V rows of qkv_proj (grouped-query attention: one scale per KV channel,
                       shared by the query heads that read it)
       gate_up_proj <- post_attention_layernorm's weight
       down_proj    <- the up rows of gate_up_proj
       lm_head      <- the final norm's weight
   candidates s = x^r / w^(1-r) and s = x^r for r in {0, 1/20, ..., 19/20} (x: mean |input| per
   channel, w: mean per channel of |W| relative to its group's max), each normalised to a geometric
   mean of 1; the one minimising ||X W^T - (X/s) Q(W s)^T||^2 on a token sample wins (s = 1, plain
   round-to-nearest, is among the candidates, so the search never does worse than RTN on it). For
   gate_up_proj the error is measured after the rest of the MLP (act(gate) * up, then the float
   down_proj), as AutoAWQ inspects the whole MLP: on the shipped model that took the held-out
   perplexity change from +1.10% to +0.78%.
2. The scales are folded (producer / s, consumer * s): the float model computes the same function.
3. Clipping search per output channel and group: the weight range is shrunk to (1 - i/20) x its max
   |w| for i < 10, keeping the one whose group outputs on the sample are closest to the unclipped
   float ones. Not for the query/key rows (attention logits are sensitive to them), as AWQ does.
4. Round-to-nearest into the engine's int4 format (asymmetric groups, int4.py).
Then the calibration stream advances through the quantized layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibration import LayerStream
from .int4 import GROUP_SIZE, INT4_MAX, Int4Linear, quantize_int4

N_GRID = 20
MAX_SHRINK = 0.5
SAMPLE_TOKENS = 2048  # token rows kept per layer input for the searches
CLIP_TOKENS = 512


def fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] rounded to asymmetric 4-bit groups along K and dequantized (float32)."""
    n, k = w.shape
    v = w.float().view(n, k // group_size, group_size)
    lo, hi = v.amin(dim=2, keepdim=True), v.amax(dim=2, keepdim=True)
    s = ((hi - lo) / INT4_MAX).clamp(min=1e-8)
    z = torch.round(-lo / s).clamp(0, INT4_MAX)
    return ((torch.round(v / s) + z).clamp(0, INT4_MAX) - z).mul(s).view(n, k)


class InputStats:
    """Mean |x| per channel over all calibration tokens, and a seeded sample of token rows."""

    def __init__(self, seed: int = 0):
        self.abs_sum, self.count, self.rows = None, 0, []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        self.rows.append(x)

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    def sample(self, n: int) -> torch.Tensor:
        x = torch.cat(self.rows)
        if x.shape[0] <= n:
            return x
        idx = torch.randperm(x.shape[0], generator=self.gen)[:n].to(x.device)
        return x[idx]


def search_scale(weight: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, group_size: int,
                 slots: torch.Tensor | None = None, head=None) -> torch.Tensor:
    """The input-channel scale s [K] (or [num slots] when `slots` [K] ties channels to shared scales)
    minimising the output error of Q(W s) (x / s) on the sample x [T, K]; with `head` (a function of
    the layer's outputs [T, N], e.g. the rest of the MLP), the error of head(outputs)."""
    head = head or (lambda y: y)
    w = weight.float()
    n, k = w.shape
    g = w.abs().view(n, k // group_size, group_size)
    w_mean = (g / g.amax(dim=2, keepdim=True).clamp(min=1e-12)).view(n, k).mean(0)
    if slots is not None:  # average the statistics over the channels that share a scale
        count = torch.bincount(slots).float()
        x_mean = torch.zeros(len(count), device=w.device).index_add_(0, slots, x_mean) / count
        w_mean = torch.zeros(len(count), device=w.device).index_add_(0, slots, w_mean) / count
    ref = head(x @ w.t())
    best, best_err = torch.ones_like(x_mean), None
    for ratio in [i / N_GRID for i in range(N_GRID)]:
        for duo in (False, True):
            s = x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4) if duo else x_mean.pow(ratio)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            full = s if slots is None else s[slots]
            err = (head(x @ (fake_quant(w * full, group_size) / full).t()) - ref).pow(2).mean()
            if best_err is None or err < best_err:
                best, best_err = s, err
    return best


def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, rows: torch.Tensor | None = None,
                chunk: int = 256) -> torch.Tensor:
    """weight [N, K] with each (row, group) clamped to +-(1 - i/N_GRID) max|w| for the i whose group
    outputs x_g . w_g on the sample x [T, K] are closest to the unclipped ones. rows: bool [N], the
    rows allowed to clip (default all)."""
    w = weight.float()
    n, k = w.shape
    ng = k // group_size
    xg = x.view(-1, ng, group_size)
    out = w.clone()
    for r0 in range(0, n, chunk):
        wc = w[r0:r0 + chunk].view(-1, ng, group_size)
        org = torch.einsum("tgj,cgj->ctg", xg, wc)
        max0 = wc.abs().amax(dim=2, keepdim=True)
        best_max, best_err = max0.clone(), None
        for i in range(int(MAX_SHRINK * N_GRID)):
            mv = max0 * (1 - i / N_GRID)
            cur = torch.maximum(torch.minimum(wc, mv), -mv)
            q = fake_quant(cur.view(-1, k), group_size).view_as(wc)
            err = (torch.einsum("tgj,cgj->ctg", xg, q) - org).pow(2).mean(1)[..., None]  # [c, ng, 1]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, mv, best_max)
        clipped = torch.maximum(torch.minimum(wc, best_max), -best_max).view(-1, k)
        keep = None if rows is None else ~rows[r0:r0 + chunk]
        if keep is not None:
            clipped[keep] = w[r0:r0 + chunk][keep]
        out[r0:r0 + chunk] = clipped
    return out


def _int4(linear: nn.Linear, weight: torch.Tensor, group_size: int) -> Int4Linear:
    qweight, scales, zeros = quantize_int4(weight.to(linear.weight.dtype), group_size)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return Int4Linear(qweight, scales, zeros, bias, group_size)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def awq_quantize_model(model: nn.Module, names: list[str], calibration: list[list[int]],
                       group_size: int = GROUP_SIZE) -> None:
    """Replace the Linear layers `names` of `model` (in place) by AWQ-quantized Int4Linear; the norm
    weights and the V / up rows that absorb the scales are changed in place (same float function)."""
    stream = LayerStream(model, calibration)
    wanted = set(names)
    q_size = model.spec.num_heads * model.spec.head_dim
    kv_size = model.spec.num_kv_heads * model.spec.head_dim
    for index in range(len(model.layers) + 1):
        plan = scale_plan(model, index)
        plan = [step for step in plan if step[0] in wanted]
        stats = {name: InputStats(seed=index) for name, *_ in plan}
        stream.run({name: module for name, module, *_ in plan}, lambda name, x: stats[name].add(x))
        samples = {}
        for name, module, fold, slots in plan:  # search every scale on the unscaled weights, then fold
            x = stats[name].sample(SAMPLE_TOKENS)
            s = search_scale(module.weight, x, stats[name].mean_abs(), group_size, slots,
                             _mlp_head(model, name))
            full = s if slots is None else s[slots]
            samples[name] = x / full
            fold(s)
            module.weight.mul_(full.to(module.weight.dtype))
        for name, module, _, _ in plan:
            rows = None
            if name.endswith("qkv_proj"):
                rows = torch.arange(module.out_features, device=module.weight.device) >= q_size + kv_size
            weight = search_clip(module.weight, samples[name][:CLIP_TOKENS], group_size, rows)
            _replace(model, name, _int4(module, weight, group_size))
        del stats, samples
        if index < len(model.layers):
            stream.advance()


def _mlp_head(model: nn.Module, name: str):
    """For gate_up_proj: the rest of its MLP (activation, up product, down_proj in float) as a function
    of gate_up's outputs [T, 2I]; None for other layers."""
    if not name.endswith("mlp.gate_up_proj"):
        return None
    mlp = model.get_submodule(name.rpartition(".")[0])
    down = mlp.down_proj.weight.float()
    act = (lambda g: nn.functional.gelu(g, approximate="tanh")) if mlp.gelu else nn.functional.silu

    def head(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return (act(gate) * up) @ down.t()
    return head


def scale_plan(model: nn.Module, index: int) -> list[tuple]:
    """(name, Linear, fold, slots) for decoder layer `index` (index == num_layers: the LM head), in call
    order. fold(s) divides the Linear's input producer by s (norm weight, or the V / up rows that feed
    it); slots [in] maps each input channel to its scale (o_proj: one scale per V channel, shared by the
    query heads of its KV group), None for one scale per channel. Scaling a Linear's weight columns
    by s[slots] after fold(s) leaves the float model's function unchanged."""
    spec = model.spec
    if index == len(model.layers):
        return [("lm_head", model.lm_head, _fold_norm(model.norm), None)]
    layer = model.layers[index]
    attn, mlp = layer.self_attn, layer.mlp
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    # o_proj input channel h * D + d reads V channel (h // query heads per KV head) * D + d.
    channel = torch.arange(q_size, device=layer.input_layernorm.weight.device)
    o_slots = (channel // spec.head_dim // (spec.num_heads // spec.num_kv_heads)) * spec.head_dim + \
        channel % spec.head_dim
    p = f"layers.{index}."
    return [(p + "self_attn.qkv_proj", attn.qkv_proj, _fold_norm(layer.input_layernorm), None),
            (p + "self_attn.o_proj", attn.o_proj, _fold_rows(attn.qkv_proj, q_size + kv_size, kv_size), o_slots),
            (p + "mlp.gate_up_proj", mlp.gate_up_proj, _fold_norm(layer.post_attention_layernorm), None),
            (p + "mlp.down_proj", mlp.down_proj, _fold_rows(mlp.gate_up_proj, inter, inter), None)]


def _fold_norm(norm: nn.Module):
    def fold(s: torch.Tensor) -> None:
        norm.weight.div_(s.to(norm.weight.dtype))
    return fold


def _fold_rows(linear: nn.Linear, start: int, size: int):
    """Divide rows start..start+size of `linear` (and its bias) by s [size]: its outputs there shrink by s."""
    def fold(s: torch.Tensor) -> None:
        linear.weight[start:start + size].div_(s.to(linear.weight.dtype)[:, None])
        if linear.bias is not None:
            linear.bias[start:start + size].div_(s.to(linear.bias.dtype))
    return fold
