"""Building a LlamaModel (any supported family): from a transformers state dict, an HF checkpoint folder, or random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .llama import LlamaModel
from .spec import ModelSpec


def _fuse(state: dict, prefix: str, names: list[str], target: str, out: dict, suffix: str) -> None:
    keys = [f"{prefix}{n}.{suffix}" for n in names]
    if all(k in state for k in keys):
        out[f"{prefix}{target}.{suffix}"] = torch.cat([state.pop(k) for k in keys], dim=0)


def _stack_experts(state: dict, moe: str, names: tuple[str, str, str], num_experts: int, out: dict, p: str) -> None:
    """Per-expert tensors as saved on disk (Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj) stacked
    into w13 [E, 2I, H] and w2 [E, H, I]."""
    gate, up, down = (f"{moe}experts.{{}}.{n}.weight" for n in names)
    if gate.format(0) not in state:
        return
    out[p + "mlp.w13"] = torch.stack([torch.cat([state.pop(gate.format(e)), state.pop(up.format(e))])
                                      for e in range(num_experts)])
    out[p + "mlp.w2"] = torch.stack([state.pop(down.format(e)) for e in range(num_experts)])


# A multimodal checkpoint's vision tower and projector (Gemma 3), which a text engine does not load.
MULTIMODAL_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _our_name(name: str) -> str:
    # Gemma 3's multimodal checkpoints nest the language model: language_model.model.* on disk,
    # model.language_model.* in transformers 5's memory.
    for prefix in ("language_model.model.", "model.language_model.", "language_model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def convert_hf_state_dict(state: dict, spec: ModelSpec) -> dict:
    """Map HF *ForCausalLM tensor names to ours: q/k/v and gate/up fused (or taken fused, as Phi-3 stores
    them), experts stacked (from per-expert tensors on disk, or transformers' in-memory stacked ones), and
    Gemma's (1 + w) norm weights stored as 1 + w."""
    state = {_our_name(k): v for k, v in state.items() if not k.startswith(MULTIMODAL_PARTS)}
    out = {}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        for suffix in ("weight", "bias"):
            _fuse(state, p + "self_attn.", ["q_proj", "k_proj", "v_proj"], "qkv_proj", out, suffix)
        _fuse(state, p + "mlp.", ["gate_proj", "up_proj"], "gate_up_proj", out, "weight")
        if spec.is_moe_layer(i):
            # transformers 5 in memory: mlp.gate.weight, mlp.experts.gate_up_proj / down_proj (stacked).
            moe = p + ("block_sparse_moe." if p + "block_sparse_moe.gate.weight" in state else "mlp.")
            out[p + "mlp.gate.weight"] = state.pop(moe + "gate.weight")
            if moe + "experts.gate_up_proj" in state:
                out[p + "mlp.w13"] = state.pop(moe + "experts.gate_up_proj")
                out[p + "mlp.w2"] = state.pop(moe + "experts.down_proj")
            names = ("w1", "w3", "w2") if spec.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            _stack_experts(state, moe, names, spec.num_experts, out, p)
    for name, tensor in state.items():
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        if name.startswith(("layers.", "embed_tokens.", "norm.", "lm_head.")):
            out.setdefault(name, tensor)
    if spec.gemma_norms:
        for name in out:
            if name.endswith("norm.weight"):
                out[name] = out[name] + 1.0
    return out


def init_random_(name: str, tensor: torch.Tensor, gen: torch.Generator) -> None:
    """HF's init, in place: normal(0, 0.02) for linear and embedding weights, zero biases, unit norms."""
    if name.endswith("norm.weight"):
        tensor.fill_(1.0)
    elif name.endswith(".bias"):
        tensor.zero_()
    else:
        tensor.normal_(0.0, 0.02, generator=gen)


def build_model(spec: ModelSpec, state: dict | None, dtype: torch.dtype, device: torch.device,
                max_positions: int, seed: int = 0) -> LlamaModel:
    """A model on `device` in `dtype`, loaded from our-named `state` or, if None, randomly initialised
    (init_random_, drawn on the target device from a generator seeded with `seed`, so an 8B model
    initialises in seconds).
    """
    with torch.device("meta"):
        model = LlamaModel(spec, max_positions).to(dtype)  # cast on meta: no float32 copy is ever allocated
    model = model.to_empty(device=device)
    # Rotary tables are buffers computed at construction; rebuild them on the device in float32.
    model.init_rotary_(device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if state is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                init_random_(name, p, gen)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (spec.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def full_weights(spec: ModelSpec, state: dict | None, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(name, tensor) of every parameter, in the order of a model's named_parameters (a tied LM head once),
    one at a time: from `state` as stored, or drawn as build_model(spec, None, dtype, device, seed=seed)
    draws them (the same values). For cutting tensor-parallel shards without a whole model in memory."""
    with torch.device("meta"):
        model = LlamaModel(spec, 1)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed) if state is None else None
    for name, p in model.named_parameters():
        if state is not None:
            if name not in state:
                raise ValueError(f"checkpoint does not match the model: missing {name}")
            yield name, state[name]
            continue
        tensor = torch.empty(p.shape, dtype=dtype, device=device)
        init_random_(name, tensor, gen)
        yield name, tensor


def load_checkpoint_state(folder: str | Path) -> dict:
    """All tensors of an HF checkpoint folder (safetensors preferred, else pytorch_model*.bin), on the CPU."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    state = {}
    if files:
        from safetensors.torch import load_file
        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(folder.glob("pytorch_model*.bin")) + sorted(folder.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def load_hf_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an HF checkpoint folder: config.json is missing")
    return json.loads(path.read_text())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers that are weights (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith(("cos", "sin"))]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["build_model", "convert_hf_state_dict", "load_checkpoint_state", "load_hf_config", "weight_bytes",
           "dtype_bytes"]
