"""A vLLM-style paged inference engine: paged KV cache, prefix caching, continuous batching."""
from .config import EngineConfig
from .llm import LLM, LLMEngine
from .model.spec import ModelSpec
from .request import CompletionOutput, RequestMetrics, RequestOutput
from .sampling import BeamSearchParams, SamplingParams
from .stats import EngineStats, StepStats

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "BeamSearchParams", "RequestOutput",
           "CompletionOutput", "RequestMetrics",
           "EngineStats", "StepStats", "ModelSpec"]
