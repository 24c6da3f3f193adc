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


def _qwen3(hidden, inter, layers, heads, kv, *, tied, max_pos=40960, **moe):
    import transformers as tf
    common = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=128, vocab_size=151936, max_position_embeddings=max_pos,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645,
                  rope_parameters=_rope(1000000.0))
    if moe:
        return tf.Qwen3MoeConfig(**common, **moe, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return tf.Qwen3Config(**common)


def _gemma3_12b():
    from transformers import Gemma3TextConfig
    # Five sliding-window layers (1024 tokens, rope base 10k) per global layer (rope base 1M, linear x8).
    return Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                            rms_norm_eps=1e-6, sliding_window=1024, query_pre_attn_scalar=256,
                            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(48)],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1000000.0}})


def _gemma2_9b():
    from transformers import Gemma2Config
    return Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                        rms_norm_eps=1e-6, sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                        rope_parameters=_rope(10000.0))


def _phi3_mini():
    from transformers import Phi3Config
    # Phi-3-mini-4k-instruct: every layer has a 2047-token window; fused qkv / gate_up in its checkpoint.
    return Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      sliding_window=2047, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
                      pad_token_id=32000, rope_parameters=_rope(10000.0))


def _mixtral_8x7b():
    from transformers import MixtralConfig
    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rope_parameters=_rope(1000000.0))


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
    "qwen3-8b": lambda: _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-30b-a3b": lambda: _qwen3(2048, 6144, 48, 32, 4, tied=False, num_experts=128, num_experts_per_tok=8,
                                    moe_intermediate_size=768),
    "gemma-2-9b": _gemma2_9b,
    "gemma-3-12b": _gemma3_12b,
    "phi-3-mini": _phi3_mini,
    "mixtral-8x7b": _mixtral_8x7b,
    "tiny": _tiny,
}


def preset_config(name: str):
    """The transformers config (PretrainedConfig) of a preset, by name (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
