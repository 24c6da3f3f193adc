"""ModelSpec: the shape of a Llama-family decoder, read from a transformers config."""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _get(cfg, name, default=None):
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model's shape (no weights)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelSpec":
        model_type = _get(cfg, "model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported: the engine runs "
                             f"{SUPPORTED_MODEL_TYPES} decoders")
        if model_type == "mistral" and _get(cfg, "sliding_window") is not None and _get(cfg, "use_sliding_window", True):
            raise ValueError("Mistral with sliding_window attention is not supported: set sliding_window=None "
                             "(Mistral 7B v0.2 and later use full attention)")
        hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
        rope = dict(_get(cfg, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", None) or _get(cfg, "rope_theta", 10000.0)
        scaling = rope or _get(cfg, "rope_scaling", None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        eos = _get(cfg, "eos_token_id", ())
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=_get(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_get(cfg, "intermediate_size"),
            num_layers=_get(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_get(cfg, "num_key_value_heads", heads),
            head_dim=_get(cfg, "head_dim", hidden // heads),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=_get(cfg, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(_get(cfg, "attention_bias", False)),
            eos_token_ids=tuple(int(e) for e in eos),
        )

    def num_params(self) -> int:
        """Parameter count (embeddings and LM head counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
