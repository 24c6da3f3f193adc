"""EngineConfig: every serving setting the workbench sweeps, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

QUANTIZATION_MODES = (None, "int8", "int4", "awq", "gptq", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
# "synthetic": a performance-study proposer (engine/spec_decode/synthetic.py), never a real speed-up claim.
SPECULATIVE_METHODS = (None, "ngram", "draft", "synthetic")


class ConfigError(ValueError):
    """A setting is outside its allowed range; the message names the field and what is allowed."""


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed: {field} must be {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Batch limits for a config that leaves them at None, by vLLM's rule for its offline LLM class (EngineArgs'
# batch defaults, usage context LLM_CLASS): a GPU of at least 70 GiB that is not an A100 (H100, H200, MI300X)
# gets a large batch, whose GEMMs are compute-bound; vLLM measured large budgets to lose throughput on A100s.
LARGE_GPU_BYTES = 70 * 2**30
LARGE_GPU_BATCH_LIMITS = (1024, 16384)   # (max_num_seqs, max_num_batched_tokens)
DEFAULT_BATCH_LIMITS = (256, 8192)       # other GPUs and the CPU


def default_batch_limits(total_bytes: int | None = None, device_name: str = "") -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) the engine picks for a device of total_bytes memory named
    device_name: LARGE_GPU_BATCH_LIMITS from 70 GiB up unless an A100, else DEFAULT_BATCH_LIMITS.
    total_bytes None: no GPU (the CPU)."""
    if total_bytes is not None and total_bytes >= LARGE_GPU_BYTES and "a100" not in device_name.lower():
        return LARGE_GPU_BATCH_LIMITS
    return DEFAULT_BATCH_LIMITS


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine instance.

    block_size: tokens per KV-cache block (power of two, 1..256).
    max_num_batched_tokens: token budget of one step (prefill chunks + decodes); None: the engine picks it
        from the device (16384 on GPUs of >= 70 GiB other than the A100, else 8192; see default_batch_limits).
    max_num_seqs: most requests running at once; None: picked from the device likewise (1024, else 256).
        LLM resolves both (LLM.resolve_config), so llm.config holds numbers.
    enable_prefix_caching: reuse full KV blocks whose token prefix was seen before.
    quantization: weight quantization, None | "int8" | "int4" | "awq" | "gptq" | "fp8".
    kv_cache_dtype: "auto" (the model dtype) | "fp8".
    gpu_memory_utilization: share of total device memory the engine may use (weights, activations, KV).
    max_model_len: longest sequence (prompt + output) in tokens; None: the model's context length
        (max_position_embeddings), as vLLM derives it. LLM resolves it, so llm.config holds the number.
    num_gpu_blocks: override the memory-derived number of KV blocks.
    attention_backend: "auto" (Triton on CUDA, torch elsewhere) | "torch" | "triton".
    tensor_parallel_size: number of GPUs one model is split over.
    enforce_eager: True turns CUDA graphs off.
    device: "cuda" | "cpu" | None (CUDA when present).
    seed: seed of the engine's sampler for requests without their own seed.
    speculative_method: None (off) | "ngram" (prompt lookup) | "draft" (speculative_model proposes) |
        "synthetic" (performance studies: proposals accepted with probability speculative_acceptance per
        position; see engine/spec_decode/synthetic.py).
    num_speculative_tokens: tokens proposed per decoding request and step (k), 1..16.
    speculative_model: the draft, a preset name or an HF checkpoint folder with the target's vocabulary
        ("draft" only; "synthetic" runs it, when given, to charge its cost).
    speculative_acceptance: "synthetic" only, the per-position acceptance probability in [0, 1].
    async_scheduling: schedule and prepare step N+1 (and process step N's outputs) on the host while step N runs
        on the device, as vLLM v1's async scheduling (engine/async_step.py). None (auto): on for CUDA when
        tensor_parallel_size is 1, speculative decoding is off and the model has one KV cache group (no sliding
        window); the engine falls back to synchronous steps while a request of several sequences (n > 1,
        best_of, beam search) runs. True: on, on the CPU too (same bookkeeping; what tests exercise); a request
        of several sequences is then rejected. False: synchronous steps.
    """

    block_size: int = 16
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = True
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    num_gpu_blocks: int | None = None
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    device: str | None = None
    seed: int = 0
    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    speculative_model: str | None = None
    speculative_acceptance: float = 0.8
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        bs = self.block_size
        _check(_is_int(bs) and 1 <= bs <= 256 and bs & (bs - 1) == 0, "block_size", bs,
               "a power of two from 1 to 256 (e.g. 8, 16, 32)")
        _check(self.max_num_batched_tokens is None or (_is_int(self.max_num_batched_tokens)
                                                       and self.max_num_batched_tokens >= 1),
               "max_num_batched_tokens", self.max_num_batched_tokens,
               "None (picked from the device) or an integer >= 1")
        _check(self.max_num_seqs is None or (_is_int(self.max_num_seqs) and self.max_num_seqs >= 1),
               "max_num_seqs", self.max_num_seqs, "None (picked from the device) or an integer >= 1")
        _check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
               self.enable_prefix_caching, "True or False")
        _check(self.quantization in QUANTIZATION_MODES, "quantization", self.quantization,
               f"one of {QUANTIZATION_MODES}")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
               f"one of {KV_CACHE_DTYPES}")
        u = self.gpu_memory_utilization
        _check(isinstance(u, (int, float)) and not isinstance(u, bool) and 0 < u <= 1,
               "gpu_memory_utilization", u, "a number in (0, 1]")
        _check(self.max_model_len is None or (_is_int(self.max_model_len) and self.max_model_len >= 1),
               "max_model_len", self.max_model_len, "None (the model's context length) or an integer >= 1")
        _check(self.num_gpu_blocks is None or (_is_int(self.num_gpu_blocks) and self.num_gpu_blocks >= 1),
               "num_gpu_blocks", self.num_gpu_blocks, "None (derived from memory) or an integer >= 1")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               self.attention_backend, f"one of {ATTENTION_BACKENDS}")
        _check(_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1,
               "tensor_parallel_size", self.tensor_parallel_size, "an integer >= 1")
        _check(isinstance(self.enforce_eager, bool), "enforce_eager", self.enforce_eager, "True or False")
        _check(self.device is None or str(self.device).split(":")[0] in ("cuda", "cpu"),
               "device", self.device, "None, 'cpu' or 'cuda'")
        _check(_is_int(self.seed) and -2**63 <= self.seed < 2**64, "seed", self.seed,
               "an integer from -2**63 to 2**64 - 1")
        self._check_speculative()
        a = self.async_scheduling
        _check(a is None or isinstance(a, bool), "async_scheduling", a, "None (auto), True or False")
        if a:
            _check(self.speculative_method is None, "async_scheduling", a,
                   "None or False when speculative decoding is on (speculative_method is not None)")
            _check(self.tensor_parallel_size == 1, "async_scheduling", a,
                   "None or False when tensor_parallel_size > 1")

    def _check_speculative(self) -> None:
        m = self.speculative_method
        _check(m in SPECULATIVE_METHODS, "speculative_method", m, f"one of {SPECULATIVE_METHODS}")
        k = self.num_speculative_tokens
        _check(_is_int(k) and 1 <= k <= 16, "num_speculative_tokens", k, "an integer from 1 to 16")
        _check(self.speculative_model is None or isinstance(self.speculative_model, str), "speculative_model",
               self.speculative_model, "None or a preset name / checkpoint folder (str)")
        if m == "draft":
            _check(self.speculative_model is not None, "speculative_model", None,
                   "a preset name or checkpoint folder when speculative_method='draft'")
        a = self.speculative_acceptance
        _check(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1, "speculative_acceptance",
               a, "a number in [0, 1]")
        if m is not None:
            _check(self.tensor_parallel_size == 1, "tensor_parallel_size", self.tensor_parallel_size,
                   "1 when speculative decoding is on (speculative_method is not None)")

    def with_batch_limits(self, total_bytes: int | None = None, device_name: str = "") -> "EngineConfig":
        """This config with max_num_seqs / max_num_batched_tokens that are None set by default_batch_limits
        for the device (total_bytes None: the CPU); itself when both are set."""
        if self.max_num_seqs is not None and self.max_num_batched_tokens is not None:
            return self
        seqs, tokens = default_batch_limits(total_bytes, device_name)
        return self.replace(max_num_seqs=self.max_num_seqs or seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens or tokens)

    def replace(self, **changes) -> "EngineConfig":
        """A copy with some fields changed (validated like any new config)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_value(text: str):
    """A config value written on a command line, as Python: true/false (on/off, yes/no) -> bool, none/null ->
    None, then int, float, else the (stripped) string."""
    low = text.strip().lower()
    if low in ("true", "false", "on", "off", "yes", "no"):
        return low in ("true", "on", "yes")
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()
