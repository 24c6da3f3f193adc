import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from engine.model.presets import preset_config


def tiny_hf_config(kind: str):
    """Tiny random-weight configs of the three families, float32, GQA."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if kind == "llama":
        # Llama-3 style rope scaling exercises the frequency adjustment.
        return LlamaConfig(**common, head_dim=16, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    if kind == "mistral":
        return MistralConfig(**common, head_dim=16, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": True})
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind), dtype=torch.float32).eval()
    # HF's init (std 0.02) gives nearly flat logits; a larger scale makes greedy choices well separated
    # so that float32 rounding differences between implementations cannot flip them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="session")
def hf_models():
    return {kind: make_hf_model(kind) for kind in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def tiny_config():
    return preset_config("tiny")
