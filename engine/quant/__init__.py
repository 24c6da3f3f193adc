"""Weight and KV-cache quantization, gpt-fast style: the model stays a plain model, and
`quantize_model` swaps its nn.Linear modules for quantized ones.

Modes (EngineConfig.quantization):
    "int8": weight-only, symmetric per output channel (int8.py)
    "int4": weight-only, group 128 along the input dim, scale + zero point per group (int4.py)
    "fp8":  W8A8, e4m3 weights per channel, activations per token, torch._scaled_mm (fp8.py)
    "awq":  int4's format, codes chosen by AWQ (per-channel scales searched on calibration activations,
            folded into the norms / V / up rows, then clipped groups; awq.py)
    "gptq": int4's format, codes chosen by GPTQ (second-order error compensation column by column,
            each group's range searched for the least rounding error; gptq.py). Act-order (and
            static groups) are options of gptq.gptq_quantize_model, off in the mode: on the shipped
            model act-order did worse (+1.90% vs +1.80% perplexity, both with a 4-bit LM head,
            before the range search) and would add an input permutation to every layer;
            checkpoints with act-order (desc_act) load and run
"awq" and "gptq" calibrate on `calibration` (token-id sequences; calibration.py) unless the model
came from a Hub AWQ/GPTQ checkpoint of that method: then its codes are used as they are
(`prequantized`, checkpoint.py). All three int4 modes run the same Int4Linear and kernels; under
"awq"/"gptq" an untied LM head they quantize themselves is int8 (LM_HEAD_MODE), one a checkpoint
leaves in 16 bits stays so.
What is quantized: every nn.Linear of the decoder layers (qkv_proj, o_proj, gate_up_proj,
down_proj) and the LM head. An untied embedding table becomes int8 per row under every mode
(embedding.py: a lookup reads one row per token, so that saves memory, not time; int4's bytes target
needs it); a tied one stays in the model dtype. The LM head is quantized like the decoder, as
gpt-fast does, unless it is tied to the embeddings (then quantizing would add a copy, not save
one): on Llama-3.1-8B it is 1/15 of the weights read per decode step, and the memory targets
(int8 <= 0.55x, int4 <= 0.30x of bf16) cannot be approached with it in 16 bits. AWQ/GPTQ
checkpoints keep it in 16 bits for quality; set quantize_lm_head=False for that.
The KV cache in fp8 is kv_cache.py.
On CUDA, which kernel runs a quantized linear is measured per shape and row bucket (tuning.py): the fused
dequantizing kernels for decode sizes; from 65 rows int8 / int4 also time dequantizing into a float weight
slice for one cuBLAS matmul (dequant_mm.py), which is the untuned default above 256 rows (prefill chunks),
where fp8 keeps to torch._scaled_mm.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.weights import weight_bytes
from .embedding import Int8Embedding
from .fp8 import Fp8Linear, check_fp8_supported
from .int4 import GROUP_SIZE, Int4Linear, check_int4_shape
from .int8 import Int8Linear

QUANTIZED_LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}
CALIBRATED_MODES = ("awq", "gptq")  # int4 layers whose codes come from a calibrated method
# What the (untied) LM head becomes under a mode when it differs from the decoder's format. Hub AWQ/GPTQ
# checkpoints keep the head in 16 bits; on the shipped model 4-bit groups there cost as much perplexity
# as all decoder layers together (GPTQ +0.94% -> +1.80%), int8 per channel next to nothing, at about
# half the bytes of 16 bits. workbench.planner sizes the head by this too.
LM_HEAD_MODE = {"awq": "int8", "gptq": "int8"}


def linears_to_quantize(model: nn.Module, quantize_lm_head: bool = True) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every Linear that quantize_model replaces, in model order."""
    out = []
    tied = getattr(getattr(model, "spec", None), "tie_word_embeddings", False)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == "lm_head" and (tied or not quantize_lm_head):
            continue
        out.append((name, module))
    return out


def check_quantization(model: nn.Module, mode: str | None, device: torch.device | None,
                       quantize_lm_head: bool = True) -> None:
    """Raise ValueError (naming `quantization`) if `mode` cannot run on this model and device (None: any device)."""
    if mode is None:
        return
    if mode not in QUANTIZED_LINEARS and mode not in CALIBRATED_MODES:
        raise ValueError(f"quantization={mode!r} is not allowed: choose None, 'int8', 'int4', 'awq', 'gptq' or 'fp8'")
    if mode == "fp8" and device is not None:
        check_fp8_supported(device)
    if mode in ("int4",) + CALIBRATED_MODES:
        for name, linear in linears_to_quantize(model, quantize_lm_head):
            check_int4_shape(name, linear.in_features, GROUP_SIZE)


def quantize_model(model: nn.Module, mode: str | None, quantize_lm_head: bool = True,
                   calibration: list[list[int]] | None = None, prequantized=None,
                   quantize_embedding: bool = True) -> int:
    """Replace the model's Linear layers (in place) by `mode`'s quantized modules; returns the model's
    weight bytes afterwards. Every check runs before the first layer is touched.

    Layers are replaced one at a time and the float weight is dropped right after, so the peak
    memory is the float model plus one quantized layer.
    For "awq"/"gptq": `prequantized` (a checkpoint.Prequantized of the same method) supplies the
    layers as loaded, else the method runs on `calibration` (token-id sequences; None: seeded random
    tokens, see calibration.default_calibration).
    quantize_embedding: under any mode, an untied embedding table becomes int8 per row (embedding.py),
    except when the layers come from a checkpoint (`prequantized`, unless its float_embedding is off).
    """
    device = next(model.parameters()).device
    check_quantization(model, mode, device, quantize_lm_head)
    if mode in CALIBRATED_MODES:
        _quantize_calibrated(model, mode, quantize_lm_head, calibration, prequantized)
    elif mode is not None:
        cls = QUANTIZED_LINEARS[mode]
        with torch.no_grad():
            # Names only: holding the modules in a list would keep every float weight alive.
            names = [name for name, _ in linears_to_quantize(model, quantize_lm_head)]
            for name in names:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                linear = getattr(parent, attr)
                setattr(parent, attr, cls.from_linear(linear, name) if cls is Int4Linear else cls.from_linear(linear))
                del linear
    from_checkpoint = prequantized is not None and prequantized.method == mode and prequantized.float_embedding
    if mode is not None and quantize_embedding and not from_checkpoint:  # last: calibration reads its dtype
        _quantize_embedding(model)
    if mode is not None and device.type == "cuda":
        compact_on_device(model, device)
    return weight_bytes(model)


def compact_on_device(model: nn.Module, device: torch.device) -> bool:
    """Move the model's tensors to the host and back, so that each sits in a segment of its own size.

    Quantizing layer by layer allocates each quantized tensor while the caching allocator holds the freed float
    weights and float32 temporaries of the layers before it, so it is carved out of one of their segments and keeps
    the rest of that segment from ever being returned: 3.2 GB of an int8 llama-3.1-8b on an H200 (a 501 MB int8
    table in a 2 GB segment, int8 layers in the segments of float32 copies of weights; torch.cuda.memory._snapshot),
    which the memory profile does not see. Through the host, with the cache emptied in between, the tensors come
    back in fresh segments. A tensor tied across modules stays tied; distinct tensors viewing one storage are left
    in place. Skipped (False) when the host has not twice the bytes available. `device`: the tensors moved are
    those on it."""
    from ..memory import available_host_bytes
    entries = [(table, name, id(t)) for module in model.modules() for table in (module._parameters, module._buffers)
               for name, t in table.items() if t is not None and t.device == device]
    tensors = {key: table[name] for table, name, key in entries}
    owners: dict[int, set[int]] = {}  # storage -> the tensors on it: views of one storage stay where they are
    for key, t in tensors.items():
        owners.setdefault(t.untyped_storage().data_ptr(), set()).add(key)
    shared = set().union(*(keys for keys in owners.values() if len(keys) > 1))
    entries = [e for e in entries if e[2] not in shared]
    tensors = {key: t for key, t in tensors.items() if key not in shared}
    if not tensors or 2 * sum(t.numel() * t.element_size() for t in tensors.values()) > available_host_bytes():
        return False
    grads = {key: t.requires_grad if isinstance(t, nn.Parameter) else None for key, t in tensors.items()}
    host = {key: t.detach().to("cpu", copy=True) for key, t in tensors.items()}
    for table, name, _ in entries:  # no reference to a device copy may remain when the cache is emptied
        table[name] = None
    del tensors
    torch.cuda.empty_cache()
    back = {}
    for key, t in host.items():
        t = t.to(device, copy=True)
        back[key] = t if grads[key] is None else nn.Parameter(t, requires_grad=grads[key])
    for table, name, key in entries:
        table[name] = back[key]
    return True


def _quantize_embedding(model: nn.Module) -> None:
    """An untied nn.Embedding `embed_tokens` -> Int8Embedding (a tied one is the LM head's weight too;
    a vocabulary-parallel one is left alone: quantization is single-GPU)."""
    emb = getattr(model, "embed_tokens", None)
    tied = getattr(getattr(model, "spec", None), "tie_word_embeddings", False)
    if type(emb) is nn.Embedding and not tied:
        with torch.no_grad():
            model.embed_tokens = Int8Embedding.from_embedding(emb)


def _quantize_calibrated(model: nn.Module, mode: str, quantize_lm_head: bool, calibration, prequantized) -> None:
    import copy

    from .calibration import check_calibration, default_calibration
    device = next(model.parameters()).device
    if prequantized is not None and prequantized.method == mode:
        dtype = model.embed_tokens.weight.dtype
        with torch.no_grad():
            for name, module in prequantized.modules.items():
                module = copy.deepcopy(module).to(device)
                for layer in module.modules():  # scales keep the checkpoint's dtype; a bias joins the model's
                    if isinstance(layer, Int4Linear) and layer.bias is not None:
                        layer.bias = layer.bias.to(dtype)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, module)
        return
    names = [name for name, _ in linears_to_quantize(model, quantize_lm_head)]
    seqs = default_calibration(model.spec.vocab_size) if calibration is None else \
        check_calibration(calibration, model.spec.vocab_size)
    head = "lm_head" in names and mode in LM_HEAD_MODE
    if head:
        names.remove("lm_head")
    if mode == "awq":
        from .awq import awq_quantize_model
        awq_quantize_model(model, names, seqs)
    else:
        from .gptq import gptq_quantize_model
        gptq_quantize_model(model, names, seqs)
    if head:
        with torch.no_grad():
            model.lm_head = QUANTIZED_LINEARS[LM_HEAD_MODE[mode]].from_linear(model.lm_head)


__all__ = ["quantize_model", "check_quantization", "linears_to_quantize", "Int8Linear", "Int4Linear", "Int8Embedding",
           "Fp8Linear", "QUANTIZED_LINEARS", "CALIBRATED_MODES", "LM_HEAD_MODE"]
