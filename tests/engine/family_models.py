"""Tiny random-weight transformers models of every supported family beyond Llama/Mistral/Qwen2 (float32)."""
import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 21  # sliding window of the tiny Gemma / Phi-3 models: no multiple of a block size; long prompts outgrow it


def tiny_family_config(kind: str):
    import transformers as tf
    if kind == "qwen3":
        return tf.Qwen3Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=False)
    if kind == "phi3":  # Phi-3 mini's config has a window on every layer (2047); ours is tiny
        c = {k: v for k, v in COMMON.items() if k != "head_dim"}
        return tf.Phi3Config(**c, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)
    if kind == "mistral_window":  # Mistral 7B v0.1's 4096-token window on every layer (the engine used to refuse it)
        return tf.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)
    if kind == "gemma2":
        return tf.Gemma2Config(**COMMON, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=24,
                               attn_logit_softcapping=2.0, final_logit_softcapping=20.0)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**COMMON, num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                "sliding_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 1000000.0}})
    if kind == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 96}, num_hidden_layers=2, num_local_experts=4,
                                num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, num_hidden_layers=3, moe_intermediate_size=48, num_experts=8,
                                 num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
                                 tie_word_embeddings=False)
    raise ValueError(kind)


FAMILIES = ["qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe", "mistral_window"]


def make_family_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(kind), dtype=torch.float32).eval()
    return perturb_weights(model)


def perturb_weights(model):
    """Larger weights than HF's init (well-separated greedy choices, as tests/engine/conftest.py); norm
    weights perturbed too, so that Gemma's (1 + w) and the q/k norms are exercised. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model


def assert_case_counters(stats, case: str, max_batched_tokens: int) -> None:
    """The engine counters every parity case shares: no block leaked, and the case did what it is named for."""
    assert stats.num_used_blocks == 0, "blocks leaked after every request finished"
    if case == "preemption":
        assert stats.num_preemptions > 0
    if case == "chunked-prefill":
        assert max(s.num_batched_tokens for s in stats.steps) <= max_batched_tokens
    if case == "block16-prefix-cache":
        assert stats.prefix_cache_hits >= 64  # the shared 64-token prefix: 4 full blocks of 16
