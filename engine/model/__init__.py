from .llama import LlamaModel
from .presets import PRESETS, preset_config
from .spec import ModelSpec

__all__ = ["LlamaModel", "ModelSpec", "PRESETS", "preset_config"]
