"""Published shapes of common open-weight models, as transformers configs (weights are random)."""
from __future__ import annotations

# transformers is imported inside the builders: importing it costs about 1.5 s, which every
# tensor-parallel worker process would pay just to reach the engine.

_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def _rope(theta: float, **scaling) -> dict:
    return {"rope_theta": theta, "rope_type": "default", **scaling}


def _llama3(hidden, inter, layers, heads, kv, *, factor, tied, head_dim=128, max_pos=131072):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       vocab_size=128256, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
                       tie_word_embeddings=tied, bos_token_id=128000, eos_token_id=128001,
                       rope_parameters=_rope(500000.0, **_LLAMA3_ROPE, factor=factor))


def _mistral_7b():
    from transformers import MistralConfig
    return MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         sliding_window=None, bos_token_id=1, eos_token_id=2,
                         rope_parameters=_rope(1000000.0))


def _qwen25_7b():
    from transformers import Qwen2Config
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151645, rope_parameters=_rope(1000000.0))


def _tiny():
    from transformers import LlamaConfig
    # Small enough for CPU tests: 2 layers, grouped-query attention (4 query heads, 2 KV heads).
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       rope_parameters=_rope(10000.0))


PRESETS = {
    "llama-3.1-8b": lambda: _llama3(4096, 14336, 32, 32, 8, factor=8.0, tied=False),
    "llama-3.1-70b": lambda: _llama3(8192, 28672, 80, 64, 8, factor=8.0, tied=False),
    "llama-3.2-1b": lambda: _llama3(2048, 8192, 16, 32, 8, factor=32.0, tied=True, head_dim=64),
    "llama-3.2-3b": lambda: _llama3(3072, 8192, 28, 24, 8, factor=32.0, tied=True),
    "mistral-7b": _mistral_7b,
    "qwen2.5-7b": _qwen25_7b,
    "tiny": _tiny,
}


def preset_config(name: str):
    """The transformers config (PretrainedConfig) of a preset, by name (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
