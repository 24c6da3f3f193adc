"""Every counter the workbench plots, defined once: StepStats per step, EngineStats cumulative."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepStats:
    """State after one engine step. time is perf_counter seconds at the step's end, duration in seconds."""

    time: float
    duration: float
    num_running: int
    num_waiting: int
    num_batched_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    kv_usage: float                  # used blocks / total blocks
    internal_fragmentation: float    # (allocated slots - stored tokens) / allocated slots
    prefix_cache_queries: int        # this step's admissions, in tokens
    prefix_cache_hits: int
    num_preemptions: int             # preemptions in this step
    num_sampled_tokens: int          # requests that produced a token (LM-head rows computed)
    num_kv_tokens_read: int          # K/V tokens attended, summed over requests (per layer)
    num_attention_scores: int        # query-key pairs scored (per layer and head): attention FLOPs / (4 x head_dim)
    host_time: float                 # seconds of the step not spent waiting for the device
    cuda_graph: bool                 # the forward pass replayed a captured CUDA graph
    num_shared_blocks: int = 0       # blocks held by 2+ sequences (forks, prefix-cache hits)
    num_saved_blocks: int = 0        # block-table entries - used blocks: what sharing saves
    num_cow_copies: int = 0          # blocks copied on write in this step


@dataclass
class MemoryProfile:
    """How the KV pool was sized, in bytes (vLLM's rule: util x total - weights - activation peak - other)."""

    total_bytes: int
    weight_bytes: int
    peak_activation_bytes: int
    non_torch_bytes: int
    kv_cache_bytes: int


@dataclass
class EngineStats:
    """Counters since the last reset_stats(); block counts are the current state of the pool.

    `workbench.metrics.steps_frame(stats)` turns `steps` into a DataFrame (the engine imports no pandas).

    num_cached_blocks: free blocks that still hold a reusable prefix. prefix_cache_queries / _hits
    count tokens looked up / served from the cache at admission.
    num_shared_blocks: blocks held by two or more sequences now (forked sequences of parallel sampling
    and beam search, prefix-cache hits); num_saved_blocks: blocks that sharing saves now (block-table
    entries minus used blocks); num_cow_copies: blocks copied on write since the reset.
    """

    num_gpu_blocks: int
    block_size: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    num_prompt_tokens: int
    num_generation_tokens: int
    attention_backend: str
    weight_bytes: int
    kv_bytes_per_token: int
    quantization: str | None
    kv_cache_dtype: str
    device_name: str
    cuda_graphs: bool
    memory: MemoryProfile | None = None
    steps: list[StepStats] = field(default_factory=list)
    num_shared_blocks: int = 0
    num_saved_blocks: int = 0
    num_cow_copies: int = 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("steps")
        d["kv_capacity_tokens"] = self.kv_capacity_tokens
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return d
