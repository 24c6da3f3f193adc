"""Calibration for AWQ and GPTQ: run token sequences through the model and show chosen Linear
layers their inputs.

A calibration set is a list of token-id sequences. `LayerStream` walks them through the decoder
one layer at a time (each sequence a single prefill over a scratch paged KV cache, with the
pure-torch attention backend, on any device), calling `on_input(name, x)` with the input rows
x [tokens, in_features] (float32) of the layers being calibrated. The methods quantize a layer,
then advance the stream through it, so every layer is calibrated on the outputs of the layers
before it as they are after quantization (GPTQ's "sequential" calibration).

Without a calibration set, `default_calibration` draws seeded random token ids: it keeps the
methods runnable on any model (say a random one in a benchmark), but it says nothing about real
activations, so pass text from the model's training distribution for quality (never its test text).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..kernels import AttentionMetadata, TorchBackend

DEFAULT_SEQUENCES = 16
DEFAULT_SEQ_LEN = 256


def default_calibration(vocab_size: int, num_sequences: int = DEFAULT_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN,
                        seed: int = 0) -> list[list[int]]:
    """Seeded random token ids: num_sequences lists of seq_len ids in [0, vocab_size)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=gen).tolist()


def check_calibration(calibration, vocab_size: int) -> list[list[int]]:
    """The sequences as lists of ints; ValueError naming `calibration` if any id is out of range or a
    sequence is empty."""
    seqs = [list(map(int, s)) for s in calibration]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("calibration must be a non-empty list of non-empty token-id sequences")
    bad = [t for s in seqs for t in s if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"calibration holds token id {bad[0]}, outside [0, {vocab_size}) of this model")
    return seqs


class LayerStream:
    """The calibration sequences walked through the decoder one layer at a time.

    Invariant: `states[j]` is sequence j's (x, residual) at the input of decoder layer `next_layer`,
    as computed by the model's layers 0..next_layer-1 as they are when `advance` ran over them (so
    layers quantized before `advance` pass on their quantized outputs). `run` calls a layer without
    moving on (its hooks see the inputs), `advance` moves every sequence past it.
    """

    def __init__(self, model: nn.Module, sequences: list[list[int]]):
        self.model, self.backend = model, TorchBackend()
        device = next(model.parameters()).device
        self.ids = [torch.as_tensor(s, device=device) for s in sequences]
        self.positions = [torch.arange(len(s), device=device) for s in sequences]
        self.metas = [_prefill_metadata(len(s), device) for s in sequences]
        self.states = [(model.embed_tokens(ids), None) for ids in self.ids]
        self.next_layer = 0

    def _layer_outputs(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layer, spec = self.model.layers[index], self.model.spec
        dtype = self.model.embed_tokens.weight.dtype
        out = []
        for (x, residual), pos, meta in zip(self.states, self.positions, self.metas):
            shape = (len(pos), 1, spec.num_kv_heads, spec.head_dim)  # block size 1: slot = position
            cache = (torch.empty(shape, dtype=dtype, device=x.device), torch.empty(shape, dtype=dtype, device=x.device))
            out.append(layer(pos, x, residual, cache, meta, self.backend))
        return out

    @torch.no_grad()
    def run(self, watched: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> None:
        """Call the next layer on every sequence with on_input(name, x [tokens, in] float32) hooked to the
        watched modules (of that layer); after the last layer, `model.lm_head` may be watched: it is fed
        the final hidden states."""
        if self.next_layer == len(self.model.layers):
            for name in watched:
                for x, residual in self.states:
                    on_input(name, self.model.norm(x, residual, self.backend)[0].float())
            return
        hooks = [module.register_forward_pre_hook(
            lambda mod, args, name=name: on_input(name, args[0].reshape(-1, args[0].shape[-1]).float()))
            for name, module in watched.items()]
        try:
            self._layer_outputs(self.next_layer)
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def advance(self) -> None:
        """Move every sequence past the next layer, with that layer's current (maybe quantized) weights."""
        self.states = self._layer_outputs(self.next_layer)
        self.next_layer += 1


def _prefill_metadata(n: int, device: torch.device) -> AttentionMetadata:
    """One prefill of n tokens over a cache of n blocks of one slot each (slot = position)."""
    return AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(n, dtype=torch.int32, device=device)[None], num_decodes=0,
        max_query_len=n, max_seq_len=n, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
