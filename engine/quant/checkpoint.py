"""AWQ and GPTQ checkpoints as the Hub publishes them: reading them into the engine's int4 layers,
and writing the engine's int4 layers back out.

A quantized HF folder is an ordinary one whose config.json carries a `quantization_config`, and whose
quantized Linear layers `<name>` hold, instead of `<name>.weight` [out, in]:
  AWQ  (quant_method "awq", version "gemm", zero_point true; AutoAWQ's WQLinear_GEMM):
    qweight int32 [in, out/8]       codes packed along `out` in AWQ's interleaved nibble order
    qzeros  int32 [in/G, out/8]     zero points, packed the same way
    scales  fp16  [in/G, out]       w = (code - zero) * scale
  GPTQ (quant_method "gptq", bits 4, group_size G, desc_act, sym; AutoGPTQ's v1 layout):
    qweight int32 [in/8, out]       codes packed along `in`, sequential nibbles
    qzeros  int32 [in/G, out/8]     zero - 1, sequential nibbles (so 4 bits store zeros 1..16)
    scales  fp16  [in/G, out]
    g_idx   int32 [in]              group of each input feature (i // G, or any order with desc_act)
  (packing.py has the bit orders.) Both become the engine's Int4Linear exactly (no re-rounding):
codes transposed to [out, in/2] bytes, scales and zeros to [out, groups]. A GPTQ g_idx other than
i // G (act-order) becomes Int4Linear.perm: input features sorted by group, so groups are contiguous.
q/k/v and gate/up are fused into the engine's qkv_proj and gate_up_proj; parts whose act-order
permutations differ stay separate Linears behind one `FusedParts` module.

Loading gives a `Prequantized` (the int4 modules, by the engine's names) and the float state the
codes stand for (so the LLM can still be reconfigured to other modes, or None). Saving writes the
engine's Int4Linear layers in either layout; a quantized LM head is written packed too, with
"lm_head": true in quantization_config (GPTQModel's and vLLM's convention).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .embedding import Int8Embedding
from .int4 import Int4Linear, pack_int4, unpack_int4
from .int8 import Int8Linear, dequantize_int8
from .packing import pack_awq, pack_last, pack_rows, unpack_awq, unpack_last, unpack_rows

HUB_METHODS = ("awq", "gptq")


@dataclass(frozen=True)
class HubQuantConfig:
    """The quantization_config of an AWQ or GPTQ folder (4-bit only)."""

    method: str
    group_size: int = 128
    desc_act: bool = False  # GPTQ: act-order
    sym: bool = False       # GPTQ: every zero point is 8
    lm_head: bool = False   # the LM head is quantized too

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "HubQuantConfig | None":
        """None for an unquantized config; ValueError naming the field for a layout the engine cannot read."""
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else getattr(cfg, "quantization_config", None)
        if not qc:
            return None
        method = qc.get("quant_method")
        if method not in HUB_METHODS:
            raise ValueError(f"quantization_config.quant_method={method!r} is not supported: the engine loads "
                             f"{HUB_METHODS} checkpoints")
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"quantization_config.bits={bits!r} is not supported: only 4-bit {method} loads")
        group = qc.get("group_size", qc.get("q_group_size", 128))
        if not isinstance(group, int) or group < 8 or group % 8:
            raise ValueError(f"quantization_config.group_size={group!r} is not supported: use a multiple of 8 "
                             "(per-column GPTQ, group_size -1, is not)")
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"quantization_config.version={version!r} is not supported: AWQ loads the 'gemm' "
                                 "layout")
            if not qc.get("zero_point", True):
                raise ValueError("quantization_config.zero_point=False is not supported: AWQ loads with zero points")
        fmt = qc.get("checkpoint_format", "gptq")
        if method == "gptq" and fmt != "gptq":
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported: GPTQ loads the "
                             "'gptq' (v1) layout")
        return cls(method, group, bool(qc.get("desc_act", False)), bool(qc.get("sym", False)),
                   bool(qc.get("lm_head", False)))

    def to_dict(self) -> dict:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None, "lm_head": self.lm_head}
        return {"quant_method": "gptq", "bits": 4, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym, "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
                "checkpoint_format": "gptq", "lm_head": self.lm_head}


@dataclass
class Prequantized:
    """A checkpoint's int4 layers, by the engine's module names (on the CPU), and the method they came from.
    float_embedding: keep the embedding table as the checkpoint has it (16 bits, as vLLM runs a Hub
    checkpoint), rather than in int8 as the engine's own modes store it."""

    method: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    float_embedding: bool = True


class FusedParts(nn.Module):
    """Linears that share an input, their outputs concatenated (fused q/k/v or gate/up whose GPTQ
    act-order permutations differ, so they cannot be one Int4Linear)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantized_weight(dtype) for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


# --- one layer ----------------------------------------------------------------------------------

def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Linear:
    """AWQ tensors of one Linear -> the Int4Linear with the same codes, zeros and scales."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group = k // scales.shape[0]
    if scales.shape != (k // group, n) or qzeros.shape != (k // group, n // 8) or k % group:
        raise ValueError(f"AWQ tensors do not fit together: qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    codes = unpack_awq(qweight)  # [in, out]
    zeros = unpack_awq(qzeros)   # [groups, out]
    return Int4Linear(pack_int4(codes.t().contiguous()), scales.t().contiguous(), zeros.t().contiguous(), None, group)


def int4_to_awq(layer: Int4Linear) -> dict[str, torch.Tensor]:
    """An Int4Linear -> AWQ's qweight, qzeros, scales (ValueError if it has an act-order permutation)."""
    if layer.perm is not None:
        raise ValueError("an act-order (permuted) int4 layer has no AWQ layout: save it as GPTQ")
    codes = unpack_int4(layer.qweight).t()  # [in, out]
    return {"qweight": pack_awq(codes), "qzeros": pack_awq(layer.zeros.t()),
            "scales": layer.scales.t().contiguous()}


def gptq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, group_size: int) -> Int4Linear:
    """GPTQ v1 tensors of one Linear -> the Int4Linear with the same codes, zeros (stored + 1), scales;
    a g_idx other than i // G becomes the layer's input permutation."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = -(-k // group_size)
    if k % group_size or scales.shape != (groups, n) or qzeros.shape != (groups, n // 8):
        raise ValueError(f"GPTQ tensors do not fit group_size={group_size}: qweight {tuple(qweight.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    codes = unpack_rows(qweight)                       # [in, out]
    zeros = unpack_last(qzeros).to(torch.int16) + 1    # [groups, out], 1..16
    perm = None
    natural = torch.arange(k) // group_size
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), natural):
        perm = torch.argsort(g_idx.long().cpu(), stable=True)
        if not torch.equal(g_idx.long().cpu()[perm], natural):
            raise ValueError(f"g_idx does not put exactly {group_size} input features in each group")
        codes = codes[perm]
    return Int4Linear(pack_int4(codes.t().contiguous()), scales.t().contiguous(),
                      zeros.t().contiguous().to(torch.uint8), None, group_size, perm)


def int4_to_gptq(layer: Int4Linear) -> dict[str, torch.Tensor]:
    """An Int4Linear -> GPTQ v1's qweight, qzeros, scales, g_idx (ValueError if a zero point is 0,
    which v1 cannot store)."""
    codes = unpack_int4(layer.qweight).t()  # [in, out], stored order
    k = codes.shape[0]
    g_idx = (torch.arange(k) // layer.group_size).to(torch.int32)
    if layer.perm is not None:
        perm = layer.perm.cpu()
        orig = torch.empty_like(codes)
        orig[perm] = codes
        codes = orig
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = (torch.arange(k) // layer.group_size).to(torch.int32)
    zeros = layer.zeros.t().to(torch.int16)
    if bool(((zeros < 1) | (zeros > 16)).any()):
        raise ValueError("GPTQ's v1 layout stores zero - 1 in 4 bits: a layer with a zero point 0 (or above 16) "
                         "cannot be saved as GPTQ; save it as AWQ")
    return {"qweight": pack_rows(codes), "qzeros": pack_last(zeros - 1), "scales": layer.scales.t().contiguous(),
            "g_idx": g_idx}


# --- a whole model ------------------------------------------------------------------------------

def hf_parts(name: str, spec) -> list[tuple[str, int]]:
    """(HF name prefix, rows) of the checkpoint Linears behind one of the engine's Linears."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if name == "lm_head":
        return [("lm_head", spec.vocab_size)]
    prefix = "model." + name.rsplit(".", 1)[0] + "."
    if name.endswith("qkv_proj"):
        return [(prefix + "q_proj", q), (prefix + "k_proj", kv), (prefix + "v_proj", kv)]
    if name.endswith("gate_up_proj"):
        return [(prefix + "gate_proj", spec.intermediate_size), (prefix + "up_proj", spec.intermediate_size)]
    return [("model." + name, None)]


def linear_names(spec) -> list[str]:
    """The engine's Linear module names, in model order."""
    names = [f"layers.{i}.{s}" for i in range(spec.num_layers)
             for s in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    return names + ([] if spec.tie_word_embeddings else ["lm_head"])


def _fuse(parts: list[Int4Linear]) -> nn.Module:
    if len(parts) == 1:
        return parts[0]
    perms = [p.perm for p in parts]
    same = all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(perms, perms[1:]))
    if not same or len({(p.group_size, p.scales.dtype) for p in parts}) != 1:
        return FusedParts(parts)
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
    return Int4Linear(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                      torch.cat([p.zeros for p in parts]), bias, parts[0].group_size, perms[0])


def load_prequantized(state: dict, qc: HubQuantConfig, spec) -> Prequantized:
    """Take the packed tensors out of an HF-named `state` (in place): each quantized Linear's
    qweight/qzeros/scales(/g_idx) become an int4 module of the result, and `<name>.weight` in `state`
    becomes the float weight they stand for (in the scales' dtype), so the usual loader still works."""
    out = Prequantized(qc.method)
    for name in linear_names(spec):
        parts = []
        for prefix, _ in hf_parts(name, spec):
            if f"{prefix}.qweight" not in state:
                break
            qweight, qzeros, scales = (state.pop(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales"))
            g_idx = state.pop(f"{prefix}.g_idx", None)
            if qc.method == "awq":
                layer = awq_to_int4(qweight, qzeros, scales)
            else:
                layer = gptq_to_int4(qweight, qzeros, scales, g_idx, qc.group_size)
            bias = state.get(f"{prefix}.bias")
            if bias is not None:
                layer.bias = bias.clone()
            state[f"{prefix}.weight"] = layer.dequantized_weight(scales.dtype)
            parts.append(layer)
        else:
            out.modules[name] = _fuse(parts)
            continue
        if parts:
            raise ValueError(f"checkpoint quantizes only some of the parts of {name}: {hf_parts(name, spec)}")
    if not out.modules:
        raise ValueError(f"config.json says quant_method={qc.method!r} but no layer holds a qweight")
    return out


def _split_rows(module: nn.Module, sizes: list[int]) -> list[Int4Linear]:
    if isinstance(module, FusedParts):
        return list(module.parts)
    if len(sizes) == 1:
        return [module]
    out, start = [], 0
    for rows in sizes:
        sl = slice(start, start + rows)
        bias = None if module.bias is None else module.bias[sl]
        out.append(Int4Linear(module.qweight[sl], module.scales[sl], module.zeros[sl], bias, module.group_size,
                              module.perm))
        start += rows
    return out


def save_quantized(model: nn.Module, hf_config: dict, folder: str | Path, method: str) -> HubQuantConfig:
    """Write `model` (an engine LlamaModel whose Linears are Int4Linear) as an HF folder in `method`'s
    layout ("awq" or "gptq"): config.json (hf_config + quantization_config) and model.safetensors.
    Float Linears (e.g. an unquantized LM head) are written as weights, an int8 one (the LM head under
    awq/gptq) as the float weight it stands for, as Hub checkpoints keep it. Returns the config written."""
    from safetensors.torch import save_file

    if method not in HUB_METHODS:
        raise ValueError(f"method={method!r} is not allowed: choose one of {HUB_METHODS}")
    spec = model.spec
    to_hub = int4_to_awq if method == "awq" else int4_to_gptq
    state: dict[str, torch.Tensor] = {}
    quantized, perms, zeros = set(), False, []
    for name in linear_names(spec):
        module = model.get_submodule(name)
        parts = hf_parts(name, spec)
        if isinstance(module, (Int4Linear, FusedParts)):
            for (prefix, _), layer in zip(parts, _split_rows(module, [r for _, r in parts])):
                for key, t in to_hub(layer).items():
                    state[f"{prefix}.{key}"] = t
                if layer.bias is not None:
                    state[f"{prefix}.bias"] = layer.bias
                perms |= layer.perm is not None
                zeros.append(layer.zeros)
            quantized.add(name)
        elif isinstance(module, (nn.Linear, Int8Linear)):
            weight = module.weight if isinstance(module, nn.Linear) else \
                dequantize_int8(module.weight_int8, module.scales, model.norm.weight.dtype)
            weights = weight.split([r for _, r in parts]) if len(parts) > 1 else [weight]
            biases = module.bias.split([r for _, r in parts]) if module.bias is not None and len(parts) > 1 \
                else [module.bias] * len(parts)
            for (prefix, _), w, b in zip(parts, weights, biases):
                state[f"{prefix}.weight"] = w
                if b is not None:
                    state[f"{prefix}.bias"] = b
        else:
            raise ValueError(f"{name} is a {type(module).__name__}: only int4 (awq/gptq/int4) layers can be saved "
                             f"as {method}")
    if not quantized:
        raise ValueError(f"the model has no int4 layers to save as {method}: quantize it first")
    for pname, p in model.named_parameters():
        if pname.endswith(("norm.weight",)) or pname == "embed_tokens.weight":
            state["model." + pname] = p
    if isinstance(model.embed_tokens, Int8Embedding):  # Hub checkpoints hold the table in 16 bits
        state["model.embed_tokens.weight"] = model.embed_tokens.dequantized_weight()
    group = {model.get_submodule(n).group_size if isinstance(model.get_submodule(n), Int4Linear)
             else model.get_submodule(n).parts[0].group_size for n in quantized}
    if len(group) != 1:
        raise ValueError(f"layers use different group sizes {sorted(group)}: one checkpoint holds one group_size")
    sym = all(bool((z == 8).all()) for z in zeros)
    qc = HubQuantConfig(method, group.pop(), desc_act=perms, sym=sym, lm_head="lm_head" in quantized)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(hf_config)
    cfg["quantization_config"] = qc.to_dict()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return qc


def load_prequantized_checkpoint(state: dict, hf_config: dict, spec, config):
    """For LLM.from_pretrained: (config, Prequantized or None). A folder without quantization_config
    passes through; an AWQ/GPTQ one has its packed tensors taken out of `state` (replaced by the float
    weights they stand for) and, when config.quantization is None, the config set to its method (as
    vLLM does)."""
    qc = HubQuantConfig.from_hf_config(hf_config)
    if qc is None:
        return config, None
    pre = load_prequantized(state, qc, spec)
    if config.quantization is None:
        config = config.replace(quantization=qc.method)
    return config, pre
