"""The decoder (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, Mixtral, Qwen3-MoE), its weights and its presets."""
from .llama import LlamaModel
from .presets import PRESETS, preset_config
from .spec import ModelSpec

__all__ = ["LlamaModel", "ModelSpec", "PRESETS", "preset_config"]
