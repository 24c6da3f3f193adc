"""The int8 embedding table (engine/quant/embedding.py) and quantize_model's use of it."""
from __future__ import annotations

import torch
from torch import nn

from engine.quant import quantize_model
from engine.quant.embedding import Int8Embedding, quantized_embedding_bytes
from engine.quant.int8 import quantize_int8


def test_lookup_is_the_dequantized_row_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(50, 64)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(50, 64, generator=g) * torch.logspace(-3, 1, 50)[:, None])
    q = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])
    out = q(ids)
    codes, scales = quantize_int8(emb.weight)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    assert torch.equal(out, codes[ids].float() * scales[ids][..., None])
    assert ((out - emb(ids)).abs() <= scales[ids][..., None] / 2 + 1e-7).all()
    assert torch.equal(q.dequantized_weight()[ids], out)
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == quantized_embedding_bytes(50, 64)


def _tiny_model(tied: bool) -> nn.Module:
    from transformers import LlamaConfig

    from engine import LLM, EngineConfig
    hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, vocab_size=96, max_position_embeddings=64,
                     tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    cfg = EngineConfig(device="cpu", gpu_memory_utilization=0.01, max_model_len=32)
    return LLM.random(hf, cfg, dtype=torch.float32, seed=0).model


def test_quantize_model_stores_an_untied_table_in_int8_and_leaves_a_tied_one():
    ids = torch.tensor([1, 5, 95])
    for tied in (False, True):
        model = _tiny_model(tied)
        ref = model.embed_tokens(ids).detach()
        quantize_model(model, "int8")
        assert isinstance(model.embed_tokens, nn.Embedding if tied else Int8Embedding), tied
        if not tied:
            assert torch.allclose(model.embed_tokens(ids), ref, atol=ref.abs().max().item() / 127)


def test_the_table_saves_its_float_bytes_less_the_int8_ones_and_can_be_kept():
    with_table, without = _tiny_model(False), _tiny_model(False)
    saved = quantize_model(without, "int8", quantize_embedding=False) - quantize_model(with_table, "int8")
    assert type(without.embed_tokens) is nn.Embedding
    assert saved == 96 * 64 * 4 - quantized_embedding_bytes(96, 64)
    plain = _tiny_model(False)
    quantize_model(plain, None)
    assert type(plain.embed_tokens) is nn.Embedding
