"""int8 embedding table: symmetric, one scale per row (token), looked up and dequantized per token.

Format (table E [V, H]):
    weight_int8: [V, H] int8, q = round(E / scale) clamped to [-127, 127] (int8.quantize_int8)
    scales:      [V] float32, scale = max_h |E[v, h]| / 127
forward(ids) = weight_int8[ids] * scales[ids] in the model dtype; rounding error per element <= scale / 2.

Why: a lookup reads one row per token, so the table costs no decode time in any format, but it is
memory: on Llama-3.1-8B the bf16 table is 1.05 GB, a fifth of what int4 leaves of the weights, and
the int4 target (<= 0.30x the bf16 bytes) cannot be met with it in 16 bits (0.310x). quantize_model
stores an untied table this way under every weight quantization mode; a tied one is the LM head's
weight too and stays as it is.
"""
from __future__ import annotations

import torch
from torch import nn

from .int8 import dequantize_int8, quantize_int8


def quantized_embedding_bytes(vocab_size: int, hidden_size: int) -> int:
    """Bytes of an Int8Embedding of that shape: one byte per entry and a float32 scale per row."""
    return vocab_size * hidden_size + vocab_size * 4


class Int8Embedding(nn.Module):
    """Drop-in for nn.Embedding holding int8 rows; weight_int8 and scales are buffers, so
    engine.model.weights.weight_bytes counts them. `dtype` is the dtype lookups return (the model's)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.dtype = dtype
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        q, scales = quantize_int8(embedding.weight)
        return cls(q, scales, embedding.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float table [V, H] the codes stand for (default: the lookup dtype)."""
        return dequantize_int8(self.weight_int8, self.scales, dtype or self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[input_ids].float() * self.scales[input_ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"
