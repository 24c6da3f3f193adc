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
    # The step timeline (engine/timeline.py): host phases in seconds, they add up to duration.
    start: float = 0.0               # perf_counter seconds at the step's start
    schedule_time: float = 0.0       # Scheduler.schedule()
    prepare_time: float = 0.0        # writing the inputs into the host buffers (and waiting for the last upload),
    #                                  after launching the step's copy-on-write block copies
    launch_time: float = 0.0         # upload + launching the forward pass (or replaying its CUDA graph)
    sample_time: float = 0.0         # the sampler, including waiting for the device to finish the forward
    output_time: float = 0.0         # updating requests, building outputs, recording this step
    device_start: float = float("nan")  # perf_counter seconds when the device began the forward pass
    device_time: float = float("nan")   # seconds of device work of the forward (CPU: its wall time); set lazily
    num_padding_tokens: int = 0      # dummy tokens added to reach a CUDA graph's batch size
    num_recompute_tokens: int = 0    # prefill tokens computed before, redone after a preemption
    num_decode_kv_tokens_read: int = 0  # of num_kv_tokens_read, what one-token rows (the decode kernel) attend
    expert_imbalance: float | None = None  # MoE models: expert_imbalance() of this step's routing, else None
    # Speculative decoding (engine/spec_decode): draft tokens verified this step, how many were accepted, and
    # the seconds the proposer took (inside schedule_time's span: proposals are made before scheduling).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    draft_time: float = 0.0
    num_shared_blocks: int = 0       # blocks held by 2+ sequences (forks, prefix-cache hits)
    num_saved_blocks: int = 0        # block-table entries - used blocks: what sharing saves
    num_cow_copies: int = 0          # blocks copied on write in this step
    # Sliding-window models (engine/kv/groups.py): blocks in use per KV cache group; () with one group.
    group_used_blocks: tuple = ()
    # Async scheduling (engine/async_step.py): the step's batch was scheduled, prepared and launched while the
    # previous step ran on the device; output_time then is the processing of the previous step's outputs (the
    # counts above, num_sampled_tokens included, are this step's batch). token_wait_time: of output_time, seconds
    # waiting for the previous step's sampled tokens. hidden_host_time: of host_time, seconds the device provably
    # had launched work to run (the previous step unfinished when the host came to wait for it, and this step's
    # unfinished when the host was done): host_time - hidden_host_time bounds what the device may have waited for
    # the host. num_discarded_tokens: tokens the processed step sampled for requests a stop token had finished one
    # step earlier (never returned).
    async_scheduling: bool = False
    token_wait_time: float = 0.0
    hidden_host_time: float = 0.0
    num_discarded_tokens: int = 0


@dataclass
class MemoryProfile:
    """How the KV pool was sized on CUDA, in bytes (engine/memory.py's rule: util x total - weights - other
    torch memory - activation peak - CUDA-graph pool - non-torch - margin).

    peak_activation_bytes = max(prefill_peak_bytes, decode_peak_bytes): a prefill of max_num_batched_tokens,
    and a decode of max_num_seqs rows with float32 logits and the sampler (top-k/top-p) over them.
    graph_pool_bytes: the largest decode graph's pool, measured before sizing; graph_pool_bytes_captured:
    the pool of every captured graph, measured after the capture (-1 until then, 0 without graphs).
    reserved_trim_bytes / num_reserved_trims: see engine.memory.reserved_trim_bytes.
    """

    total_bytes: int
    weight_bytes: int
    peak_activation_bytes: int
    non_torch_bytes: int
    kv_cache_bytes: int
    budget_bytes: int = 0
    other_bytes: int = 0
    prefill_peak_bytes: int = 0
    decode_peak_bytes: int = 0
    graph_pool_bytes: int = 0
    margin_bytes: int = 0
    graph_pool_bytes_captured: int = -1
    reserved_trim_bytes: int = 0     # engine.memory.reserved_trim_bytes: above it a step ends with empty_cache()
    num_reserved_trims: int = 0      # steps that ended so, since start-up


@dataclass
class SpecDecodeStats:
    """Speculative decoding counters since the last reset_stats() (vLLM's names where it has them).

    method: "ngram" | "draft" | "synthetic" (synthetic: acceptance chosen by the study, not earned; every result
    built from it must say so). num_drafts: verifications (request-steps with a draft); num_draft_tokens:
    tokens proposed and verified; num_accepted_tokens: of those, accepted. accepted_per_position[i] /
    drafts_per_position[i]: acceptance at draft position i, among drafts that reached position i.
    num_rejections: drafts with a rejected position (the others were accepted whole).
    draft_time: seconds in the proposer; step_time: seconds of all steps (so draft_time_share is their ratio).
    """

    method: str
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafts_per_position: list[int] = field(default_factory=list)
    draft_time: float = 0.0
    step_time: float = 0.0
    num_rejections: int = 0

    @property
    def per_token_acceptance(self) -> float:
        """The per-token acceptance probability of the speculative-decoding papers (alpha): accepted over the
        positions verification reached (accepted + one rejected per draft with a rejection)."""
        reached = self.num_accepted_tokens + self.num_rejections
        return self.num_accepted_tokens / reached if reached else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafts_per_position)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification emits on average: 1 + accepted tokens per draft (vLLM's mean acceptance length)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def draft_time_share(self) -> float:
        """Share of the engine's step time spent proposing."""
        return self.draft_time / self.step_time if self.step_time else 0.0

    def record(self, draft_len: int, accepted: int) -> None:
        grow = draft_len - len(self.drafts_per_position)
        if grow > 0:
            self.drafts_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        self.num_drafts += 1
        self.num_draft_tokens += draft_len
        self.num_accepted_tokens += accepted
        self.num_rejections += accepted < draft_len
        for i in range(draft_len):
            self.drafts_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, acceptance_rate_per_position=self.acceptance_rate_per_position,
                 mean_accepted_length=self.mean_accepted_length, draft_time_share=self.draft_time_share,
                 per_token_acceptance=self.per_token_acceptance)
        return d


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
    # (step index, request_id, "prefill" | "recompute" | "preempted", tokens): see engine.timeline.RequestLog
    request_events: list[tuple] = field(default_factory=list)
    # torch.profiler kernels of the steps profile="kernels" ran over: see engine.profiling.KernelProfile
    kernel_profile: object | None = None
    # MoE models: tokens routed to each expert, [moe layer][expert], summed over the steps (None if dense).
    expert_tokens: list[list[int]] | None = None
    # Speculative decoding counters (None when speculation is off).
    spec_decode: SpecDecodeStats | None = None
    # Whether the engine schedules asynchronously (EngineConfig.async_scheduling resolved; see engine/async_step.py).
    async_scheduling: bool = False

    @property
    def expert_imbalance(self) -> float | None:
        return expert_imbalance(self.expert_tokens)
    num_shared_blocks: int = 0
    num_saved_blocks: int = 0
    num_cow_copies: int = 0
    # Sliding-window models (engine/kv/groups.py): each KV cache group's sliding window (None: full attention;
    # each group holds len(layers) / len(kv_cache_groups) of the layers) and its blocks in use now; () otherwise.
    kv_cache_groups: tuple = ()
    group_used_blocks: tuple = ()
    # Triton kernel builds in this process since the reset (engine/kernels/compile_watch.py): a build
    # inside a measurement stalls the GPU (seconds on a cold cache), so a run with any is slower than the engine is.
    kernel_compiles: tuple = ()

    @property
    def kernel_compile_s(self) -> float:
        return sum(e.seconds for e in self.kernel_compiles)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of every layer the pool holds (a block of a sliding-window model's KV cache group holds
        1/len(kv_cache_groups) of the layers)."""
        return self.num_gpu_blocks * self.block_size // max(len(self.kv_cache_groups), 1)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("steps")
        d.pop("request_events", None)
        d.pop("kernel_profile", None)
        d["kv_capacity_tokens"] = self.kv_capacity_tokens
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        d["expert_imbalance"] = self.expert_imbalance
        d["spec_decode"] = self.spec_decode.to_dict() if self.spec_decode is not None else None
        return d

    def __repr__(self) -> str:
        """A short summary: the counters, and the per-step list summarised (it is in ``steps``)."""
        peak = max((s.kv_usage for s in self.steps), default=0.0)
        return (f"EngineStats({self.num_steps} steps ({len(self.steps)} in .steps, peak KV usage {peak:.0%}), "
                f"{self.num_prompt_tokens} prompt + {self.num_generation_tokens} generated tokens, "
                f"KV {self.num_used_blocks}/{self.num_gpu_blocks} blocks of {self.block_size} tokens in use, "
                f"prefix cache {self.prefix_cache_hits}/{self.prefix_cache_queries} tokens hit "
                f"({self.prefix_cache_hit_rate:.1%}), {self.num_preemptions} preemptions, "
                f"backend {self.attention_backend}, quantization {self.quantization}, device {self.device_name})")

def expert_imbalance(expert_tokens) -> float | None:
    """Load imbalance of MoE routing from tokens per expert ([moe layer][expert], nested lists or a tensor):
    per layer, the busiest expert's tokens over the mean tokens per expert, averaged over the layers that
    routed any token (1.0: perfectly even; num_experts / k: every token picks the same k experts). None for a
    dense model (None) or when no token was routed."""
    if expert_tokens is None or len(expert_tokens) == 0:
        return None
    import torch  # computed where the counts live (the GPU for the engine's per-step counts): one scalar read
    counts = torch.as_tensor(expert_tokens, dtype=torch.float64)
    sums = counts.sum(dim=1)
    used = sums > 0
    ratios = torch.where(used, counts.max(dim=1).values * counts.shape[1] / sums.clamp(min=1), 0.0)
    mean = float(ratios.sum() / used.sum())  # NaN (0 / 0) when no layer routed a token
    return None if mean != mean else mean
