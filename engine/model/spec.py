"""ModelSpec: the shape of a decoder, read from a transformers config.

One generalised decoder runs every supported family; the spec carries the per-family options
(q/k norms, Gemma's norms and scalings, sliding-window layers, soft-capping, mixture of experts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral",
                         "qwen3_moe")
GEMMA_TYPES = ("gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen3_moe")
NEWER_TYPES = ("qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe")


def _get(cfg, name, default=None):
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


def _rope(params: dict | None, cfg) -> tuple[float, dict | None]:
    """(theta, scaling or None) from one rope_parameters dict (transformers 5) or the legacy fields."""
    rope = dict(params or {})
    theta = rope.pop("rope_theta", None) or _get(cfg, "rope_theta", 10000.0)
    rope.pop("partial_rotary_factor", None)
    scaling = rope or _get(cfg, "rope_scaling", None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), dict(scaling) if scaling else None


def _layer_windows(cfg, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """The sliding window of each layer (None: full attention), as transformers masks it."""
    window = _get(cfg, "sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not _get(cfg, "use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = _get(cfg, "layer_types")
    if layer_types is None:  # Mistral, Phi-3, Mixtral: one window for every layer
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model's shape (no weights).

    Per-family options (defaults are Llama's):
    qk_norm: RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3).
    gemma_norms: RMSNorms scale by (1 + w) (the loader adds the 1), the embeddings are multiplied by
        sqrt(hidden_size), and each layer has pre/post feedforward norms besides the post-attention one.
    layer_windows: per layer, the sliding window W (a token attends to the last W positions, itself
        included) or None for full attention.
    rope_local_theta: rope base of the sliding layers when it differs from the global one (Gemma 3).
    attn_softcap / final_softcap: tanh soft-capping of attention scores / logits (Gemma 2).
    query_pre_attn_scalar: the attention scale is its -1/2 power instead of head_dim's.
    num_experts > 0: the MLP of layer i is a mixture of experts when moe_layers[i]: a router over
        num_experts experts of moe_intermediate_size, top num_experts_per_tok of them per token, their
        softmax weights renormalised over the chosen k when norm_topk_prob (Mixtral always does).
    """

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
    hidden_act: str = "silu"
    qk_norm: bool = False
    gemma_norms: bool = False
    layer_windows: tuple = ()
    rope_local_theta: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple = ()

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelSpec":
        model_type = _get(cfg, "model_type", "llama")
        if model_type == "gemma3":  # the multimodal Gemma 3 checkpoint: its language model (weights.py drops the rest)
            text = _get(cfg, "text_config")
            if text is None:
                raise ValueError("model_type 'gemma3' without a text_config: not a Gemma 3 checkpoint")
            cfg, model_type = ({**text, "model_type": "gemma3_text"} if isinstance(text, dict) else text), "gemma3_text"
        if isinstance(cfg, dict) and model_type in NEWER_TYPES:
            # A config.json as the Hub has it may predate transformers 5's fields (layer_types, rope_parameters):
            # let transformers' own config class fill them in (Gemma 2 alternating windows, Gemma 3's pattern).
            from transformers import AutoConfig
            cfg = AutoConfig.for_model(**cfg)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported: the engine runs "
                             f"{SUPPORTED_MODEL_TYPES} decoders")
        hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
        num_layers = _get(cfg, "num_hidden_layers")
        params = _get(cfg, "rope_parameters", None)
        local_theta = None
        if isinstance(params, dict) and "full_attention" in params:  # Gemma 3: one rope per layer type
            theta, scaling = _rope(params["full_attention"], cfg)
            local_theta, local_scaling = _rope(params.get("sliding_attention"), cfg)
            if local_scaling is not None:
                raise ValueError(f"rope scaling of the sliding layers ({local_scaling}) is not supported")
        else:
            theta, scaling = _rope(params, cfg)
        partial = (params or {}).get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0)) \
            if isinstance(params, dict) else _get(cfg, "partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
        eos = _get(cfg, "eos_token_id", ())
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        gemma = model_type in GEMMA_TYPES
        num_experts = int(_get(cfg, "num_local_experts", 0) or _get(cfg, "num_experts", 0)) \
            if model_type in MOE_TYPES else 0
        moe_layers = ()
        if num_experts:
            step, dense = int(_get(cfg, "decoder_sparse_step", 1)), set(_get(cfg, "mlp_only_layers", []))
            moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        head_dim = _get(cfg, "head_dim", hidden // heads)
        return cls(
            model_type=model_type,
            vocab_size=_get(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_get(cfg, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=_get(cfg, "num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_get(cfg, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(_get(cfg, "attention_bias", False)),
            eos_token_ids=tuple(int(e) for e in eos),
            hidden_act=_get(cfg, "hidden_activation", None) or _get(cfg, "hidden_act", "silu"),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            gemma_norms=gemma,
            layer_windows=_layer_windows(cfg, model_type, num_layers),
            rope_local_theta=local_theta if local_theta is not None and local_theta != theta else None,
            attn_softcap=_get(cfg, "attn_logit_softcapping") if gemma else None,
            final_softcap=_get(cfg, "final_logit_softcapping") if gemma else None,
            query_pre_attn_scalar=float(_get(cfg, "query_pre_attn_scalar")) if gemma else None,
            num_experts=num_experts,
            num_experts_per_tok=int(_get(cfg, "num_experts_per_tok", 0)) if num_experts else 0,
            moe_intermediate_size=int(_get(cfg, "moe_intermediate_size", 0) or _get(cfg, "intermediate_size"))
            if num_experts else 0,
            norm_topk_prob=True if model_type == "mixtral" else bool(_get(cfg, "norm_topk_prob", True)),
            moe_layers=moe_layers,
        )

    def __post_init__(self):
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if self.rope_scaling is not None and kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3): "
                             f"{self.model_type} checkpoints with it (e.g. Phi-3 128k's longrope) cannot be loaded")

    # ----- per-layer options --------------------------------------------------------------------
    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window in tokens, or None for full attention."""
        return self.layer_windows[i] if self.layer_windows else None

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[i]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and any(self.moe_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(bool(m) for m in self.moe_layers)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # ----- sizes --------------------------------------------------------------------------------
    def _attn_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        return h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0) + (2 * d if self.qk_norm else 0)

    def _layer_params(self, i: int, active: bool) -> int:
        h = self.hidden_size
        norms = (4 if self.gemma_norms else 2) * h
        if self.is_moe_layer(i):
            experts = self.num_experts_per_tok if active else self.num_experts
            mlp = self.num_experts * h + experts * 3 * h * self.moe_intermediate_size
        else:
            mlp = 3 * h * self.intermediate_size
        return self._attn_params() + mlp + norms

    def num_params(self) -> int:
        """Parameter count (embeddings and LM head counted once when tied; every expert)."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return sum(self._layer_params(i, False) for i in range(self.num_layers)) + embed + self.hidden_size

    def num_active_params(self) -> int:
        """Parameters one decode token reads: the router and its k chosen experts instead of every expert,
        one embedding row instead of the table (the LM head is read whole)."""
        head = self.vocab_size * self.hidden_size
        return sum(self._layer_params(i, True) for i in range(self.num_layers)) + head + self.hidden_size

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of all weights in a dtype of dtype_bytes bytes (no quantization)."""
        return self.num_params() * dtype_bytes

    def active_weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes one batch-1 decode step must read (num_active_params), the bound its time is held to."""
        return self.num_active_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers (what the paged pool allocates per token:
        every layer keeps every block, sliding layers included)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_bytes_for_tokens(self, num_tokens: int, dtype_bytes: int, block_size: int = 1) -> int:
        """Bytes of K and V a request of num_tokens tokens needs when each sliding layer keeps only the
        blocks its window reaches (at most cdiv(W - 1, block_size) + 1 blocks) and full layers keep all."""
        per_layer_token = 2 * self.num_kv_heads * self.head_dim * dtype_bytes
        full_blocks = math.ceil(num_tokens / block_size)
        total = 0
        for i in range(self.num_layers):
            w = self.layer_window(i)
            blocks = full_blocks if w is None else min(full_blocks, math.ceil((w - 1) / block_size) + 1)
            total += blocks * block_size * per_layer_token
        return total
