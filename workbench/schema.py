"""The results schema: every column of a results row, defined once.

A results row (one per grid point, or one per repeat of a point in the results file) holds the point's
identity, its EngineConfig, the workload and the metrics `workbench.metrics` computes. Each column is one
`Column` entry below: its name, a human label, the unit, which direction is better, and how repeats of
a point are summarised. Everything else in the workbench reads columns through this module: code spells
a column as ``C.output_throughput`` (an AttributeError for a typo), tables and axes use `title(name)`.

To add a column: append one `Column(...)` to COLUMNS (and compute it in `workbench.metrics`).

Aggregation over repeats (``agg``): "median" columns are measured numbers that vary from run to run;
the summary row holds their median and, beside it, ``<name>_min`` / ``<name>_max`` (see `spread`).
"first" columns are the same for every repeat (config, counts fixed by the workload) or are text.
"""
from __future__ import annotations

from dataclasses import dataclass

HIGHER, LOWER = "higher", "lower"
OK, ERROR, OOM = "ok", "error", "oom"  # values of the status column
MEDIAN, FIRST = "median", "first"
ID, CONFIG, WORKLOAD, METRIC, ENGINE, TELEMETRY, PROFILE = ("id", "config", "workload", "metric", "engine",
                                                            "telemetry", "profile")


@dataclass(frozen=True)
class Column:
    """One results column. unit: what the number counts, shown after the label (None: text or a flag);
    better: "higher" | "lower" | None; agg: "median" | "first"; fmt: str.format pattern for tables;
    short: the name used in point labels (config columns only)."""

    name: str
    label: str
    unit: str | None = None
    better: str | None = None
    agg: str = FIRST
    kind: str = METRIC
    fmt: str = "{:.4g}"
    short: str | None = None

    @property
    def title(self) -> str:
        """Label with unit, as an axis or table header: "output throughput (tokens/s)"."""
        return f"{self.label} ({self.unit})" if self.unit else self.label


def _attribution() -> list[Column]:
    """The gap-to-limit attribution of a run (workbench.profiling.attribution): seconds per part."""
    parts = [("gap_measured_s", "measured wall time of the run"), ("gap_ideal_s", "ideal time: the trace's absolute limit"),
             ("gap_host_s", "host time not hidden behind the device"),
             ("gap_kernel_s", "device time over each step's roofline"),
             ("gap_underfill_s", "time lost to steps below the token budget"),
             ("gap_recompute_s", "roofline time of preemption recompute"),
             ("gap_padding_s", "roofline time of CUDA-graph padding"),
             ("gap_profiler_s", "host time of the deep-mode profiler"), ("gap_attributed_s", "sum of the parts")]
    phases = [(f"host_{p}_s", f"host time in the {p} phase, summed over steps")
              for p in ("schedule", "prepare", "launch", "sample", "output")]
    kinds = [(f"gap_kernel_{k}_s", f"device time over roofline in {k} steps") for k in ("prefill", "decode", "mixed")]
    return [Column(n, label, "s", LOWER, MEDIAN, kind=PROFILE, fmt="{:.3g}") for n, label in parts + phases + kinds] + [
        Column("ideal_over_measured", "ideal / measured time", "ratio", HIGHER, MEDIAN, kind=PROFILE, fmt="{:.2f}"),
        Column("device_busy_share", "share of the run the device was busy", "ratio", HIGHER, MEDIAN, kind=PROFILE,
               fmt="{:.0%}")]


def _latencies() -> list[Column]:
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "end-to-end latency"}
    return [Column(f"{m}_{s}_ms", f"{names[m]} {s}", "ms", LOWER, MEDIAN, fmt="{:.1f}")
            for m in names for s in ("mean", "p50", "p90", "p99")]


COLUMNS: list[Column] = [
    # --- identity of a point and of one run of it
    Column("point_id", "point id", kind=ID),
    Column("label", "setting", kind=ID),
    Column("repeat", "repeat", "index", kind=ID, fmt="{}"),
    Column("repeats", "repeats", "count", kind=ID, fmt="{}"),
    Column("status", "status", kind=ID),
    Column("error", "error", kind=ID),
    Column("timestamp", "finished at", kind=ID),
    Column("point_duration_s", "time to run the point", "s", agg=MEDIAN, kind=ID, fmt="{:.1f}"),
    Column("on_pareto_front", "on the throughput / TTFT p99 Pareto front", kind=ID),
    # metrics.speedup_over's view: a point's metric over that of its baseline twin (the same other settings)
    Column("speedup", "speed-up over the baseline setting", "x", HIGHER, kind=ID, fmt="{:.3f}"),
    Column("model", "model", kind=WORKLOAD),
    # --- workload
    Column("workload", "workload", kind=WORKLOAD),
    Column("workload_id", "workload fingerprint", kind=WORKLOAD),
    Column("num_requests", "requests", "count", kind=WORKLOAD, fmt="{}"),
    Column("arrival", "arrival process", kind=WORKLOAD),
    Column("request_rate", "request rate", "requests/s", kind=WORKLOAD),
    Column("concurrency", "concurrency", "requests in flight", kind=WORKLOAD, fmt="{}"),
    # the workload's sampling, sweepable like a config field (workbench.grid.SAMPLING_KEYS): n completions per
    # request (parallel sampling, SamplingParams(n)) or beam search of beam_width beams (None: no beam search)
    Column("n", "completions per request (parallel sampling)", "count", kind=WORKLOAD, fmt="{}", short="n"),
    Column("beam_width", "beam width (beam search)", "beams", kind=WORKLOAD, fmt="{}", short="beam"),
    Column("slo_ttft_s", "TTFT SLO", "s", kind=WORKLOAD),
    Column("slo_tpot_s", "TPOT SLO", "s", kind=WORKLOAD),
    Column("slo_e2e_s", "end-to-end SLO", "s", kind=WORKLOAD),
    # --- EngineConfig (one column per field; the grid sweeps these)
    Column("block_size", "KV block size", "tokens", kind=CONFIG, fmt="{}", short="bs"),
    Column("max_num_batched_tokens", "batched-token budget", "tokens", kind=CONFIG, fmt="{}", short="tokens"),
    Column("max_num_seqs", "max running requests", "count", kind=CONFIG, fmt="{}", short="seqs"),
    Column("enable_prefix_caching", "prefix caching", kind=CONFIG, short="prefix"),
    Column("quantization", "weight quantization", kind=CONFIG, short="quant"),
    Column("kv_cache_dtype", "KV cache dtype", kind=CONFIG, short="kv"),
    Column("gpu_memory_utilization", "GPU memory share", "share of GPU memory", kind=CONFIG, fmt="{:.2f}",
           short="mem"),
    Column("max_model_len", "max model length", "tokens", kind=CONFIG, fmt="{}", short="len"),
    Column("num_gpu_blocks", "KV blocks (override)", "count", kind=CONFIG, fmt="{}", short="blocks"),
    Column("attention_backend", "attention backend", kind=CONFIG, short="attn"),
    Column("tensor_parallel_size", "tensor-parallel size", "GPUs", kind=CONFIG, fmt="{}", short="tp"),
    Column("enforce_eager", "eager mode (no CUDA graphs)", kind=CONFIG, short="eager"),
    Column("device", "device", kind=CONFIG, short="device"),
    Column("seed", "sampling seed", kind=CONFIG, fmt="{}", short="seed"),
    Column("speculative_method", "speculative decoding method", kind=CONFIG, short="spec"),
    Column("num_speculative_tokens", "speculative tokens per step", "tokens", kind=CONFIG, fmt="{}", short="k"),
    Column("speculative_model", "draft model", kind=CONFIG, short="draft"),
    Column("speculative_acceptance", "synthetic acceptance rate", "probability", kind=CONFIG, fmt="{:.2f}",
           short="accept"),
    Column("async_scheduling", "async scheduling (None: auto)", kind=CONFIG, short="async"),
    # --- throughput and goodput
    Column("duration_s", "run time", "s", LOWER, MEDIAN, fmt="{:.2f}"),
    Column("num_finished", "finished requests", "count", HIGHER, fmt="{}"),
    Column("total_prompt_tokens", "prompt tokens", "tokens", fmt="{}"),
    Column("total_output_tokens", "output tokens", "tokens", fmt="{}"),
    Column("request_throughput", "request throughput", "requests/s", HIGHER, MEDIAN, fmt="{:.2f}"),
    Column("output_throughput", "output throughput", "tokens/s", HIGHER, MEDIAN, fmt="{:.1f}"),
    Column("total_token_throughput", "total token throughput", "tokens/s", HIGHER, MEDIAN, fmt="{:.1f}"),
    Column("request_goodput", "goodput (requests meeting the SLO)", "requests/s", HIGHER, MEDIAN, fmt="{:.2f}"),
    Column("slo_attainment", "SLO attainment", "share of requests", HIGHER, MEDIAN, fmt="{:.0%}"),
    # --- latency
    *_latencies(),
    # --- engine steps and counters
    Column("kv_usage_mean", "KV usage (mean over steps)", "share of blocks", agg=MEDIAN, fmt="{:.0%}"),
    Column("kv_usage_peak", "KV usage (peak)", "share of blocks", agg=MEDIAN, fmt="{:.0%}"),
    Column("internal_fragmentation_mean", "internal fragmentation", "share of allocated slots", LOWER, MEDIAN,
           fmt="{:.2%}"),
    Column("batch_size_mean", "running requests per step (mean)", "count", agg=MEDIAN, fmt="{:.1f}"),
    Column("batch_size_p50", "running requests per step (median)", "count", agg=MEDIAN, fmt="{:.0f}"),
    Column("batch_size_max", "running requests per step (max)", "count", agg=MEDIAN, fmt="{:.0f}"),
    Column("batched_tokens_mean", "batched tokens per step (mean)", "tokens", agg=MEDIAN, fmt="{:.0f}"),
    Column("batched_tokens_max", "batched tokens per step (max)", "tokens", agg=MEDIAN, fmt="{:.0f}"),
    Column("host_time_p50_ms", "host time per step (median)", "ms", LOWER, MEDIAN, fmt="{:.2f}"),
    Column("prefix_cache_queries", "prefix-cache lookups", "tokens", agg=MEDIAN, kind=ENGINE, fmt="{:.0f}"),
    Column("prefix_cache_hits", "prefix-cache hits", "tokens", HIGHER, MEDIAN, kind=ENGINE, fmt="{:.0f}"),
    Column("prefix_cache_hit_rate", "prefix-cache hit rate", "share of prompt tokens", HIGHER, MEDIAN, kind=ENGINE,
           fmt="{:.1%}"),
    Column("num_preemptions", "preemptions", "count", LOWER, MEDIAN, kind=ENGINE, fmt="{:.0f}"),
    Column("num_steps", "engine steps", "count", LOWER, MEDIAN, kind=ENGINE, fmt="{:.0f}"),
    Column("kv_blocks", "KV blocks", "count", HIGHER, kind=ENGINE, fmt="{}"),
    Column("kv_capacity_tokens", "KV capacity", "tokens", HIGHER, kind=ENGINE, fmt="{}"),
    # Sliding-window models (engine/kv/groups.py): each KV cache group, "full" or its window in tokens; None with
    # one group. Per-step blocks of each group: workbench.metrics.group_blocks_column.
    Column("kv_cache_group_windows", "KV cache groups (full or sliding window, tokens)", kind=ENGINE),
    Column("weight_bytes", "weight memory", "bytes", LOWER, kind=ENGINE, fmt="{:.3g}"),
    Column("kv_bytes_per_token", "KV memory per token", "bytes", LOWER, kind=ENGINE, fmt="{}"),
    Column("attention_backend_used", "attention backend that ran", kind=ENGINE),
    Column("cuda_graphs", "CUDA graphs", kind=ENGINE),
    Column("device_name", "device name", kind=ENGINE),
    Column("run_host", "host that ran the point", kind=ID),
    Column("num_cow_copies", "KV blocks copied on write (n > 1, beam search)", "count", agg=MEDIAN, kind=ENGINE,
           fmt="{:.0f}"),
    # KV block sharing (forks of parallel sampling and beam search, prefix-cache hits), peaks over the steps:
    # blocks in use, block-table entries (what an allocator without sharing would hold at that step), the
    # difference (blocks saved), blocks held by 2+ sequences, and 1 - used peak / unshared peak.
    Column("num_used_blocks_peak", "KV blocks in use (peak)", "count", agg=MEDIAN, kind=ENGINE, fmt="{:.0f}"),
    Column("num_unshared_blocks_peak", "KV blocks needed without sharing (peak)", "count", agg=MEDIAN, kind=ENGINE,
           fmt="{:.0f}"),
    Column("num_saved_blocks_peak", "KV blocks saved by sharing (peak)", "count", HIGHER, MEDIAN, kind=ENGINE,
           fmt="{:.0f}"),
    Column("num_shared_blocks_peak", "KV blocks held by 2+ sequences (peak)", "count", agg=MEDIAN, kind=ENGINE,
           fmt="{:.0f}"),
    Column("sharing_saving", "KV memory saved by sharing (peak blocks)", "share of the blocks needed without sharing",
           HIGHER, MEDIAN, kind=ENGINE, fmt="{:.1%}"),
    Column("spec_acceptance_rate", "speculative tokens accepted (per token)", "share of proposed tokens", HIGHER,
           MEDIAN, kind=ENGINE, fmt="{:.0%}"),
    Column("spec_mean_accepted_length", "tokens per verification step", "tokens", HIGHER, MEDIAN, kind=ENGINE,
           fmt="{:.2f}"),
    # Triton kernels built during the run (engine/kernels/compile_watch.py): each stalls the GPU; a point
    # with builds reads slower than the engine is (the report flags it).
    Column("kernel_compiles", "kernel builds during the run", "count", LOWER, MEDIAN, kind=ENGINE, fmt="{:.0f}"),
    Column("kernel_compile_s", "time building kernels during the run", "s", LOWER, MEDIAN, kind=ENGINE,
           fmt="{:.2f}"),
    Column("kernels_built", "kernels built during the run (name x builds)", kind=ENGINE),
    Column("expert_imbalance", "MoE expert load imbalance (busiest / mean)", "ratio", LOWER, MEDIAN, kind=ENGINE,
           fmt="{:.2f}"),
    # --- GPU telemetry (NVML; NaN without a GPU)
    Column("gpu_util_mean", "GPU utilisation (mean)", "%", HIGHER, MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("gpu_util_peak", "GPU utilisation (peak)", "%", agg=MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("power_w_mean", "power (mean)", "W", agg=MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("power_w_peak", "power (peak)", "W", agg=MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("mem_used_peak_bytes", "GPU memory used (peak)", "bytes", agg=MEDIAN, kind=TELEMETRY, fmt="{:.3g}"),
    Column("sm_clock_mhz_mean", "SM clock (mean)", "MHz", agg=MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("temperature_c_peak", "temperature (peak)", "°C", agg=MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("energy_j", "energy", "J", LOWER, MEDIAN, kind=TELEMETRY, fmt="{:.4g}"),
    Column("energy_source", "energy source", kind=TELEMETRY),
    Column("num_telemetry_samples", "NVML samples", "count", agg=MEDIAN, kind=TELEMETRY, fmt="{:.0f}"),
    Column("energy_per_output_token_j", "energy per output token", "J/token", LOWER, MEDIAN, kind=TELEMETRY,
           fmt="{:.3g}"),
    # --- where the time went (workbench.profiling)
    *_attribution(),
]

BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
assert len(BY_NAME) == len(COLUMNS), "a column is defined twice"


class _Names:
    """``C.output_throughput == "output_throughput"``; a name not in the schema is an AttributeError."""

    def __getattr__(self, name: str) -> str:
        if name in BY_NAME:
            return name
        raise AttributeError(f"{name!r} is not a results column (see workbench.schema.COLUMNS)")


C = _Names()

# Objectives the report recommends a setting for: (column, shown name). Goodput needs an SLO.
OBJECTIVES = [(C.output_throughput, "throughput"), (C.ttft_p99_ms, "TTFT p99"),
              (C.request_goodput, "goodput under the SLO"), (C.energy_per_output_token_j, "energy per token")]

# Columns of the compact tables (CLI, panel) and the report's results table, in order.
SUMMARY_COLUMNS = [C.label, C.status, C.output_throughput, C.ttft_p99_ms, C.tpot_p99_ms,
                   C.prefix_cache_hit_rate, C.internal_fragmentation_mean]
PANEL_COLUMNS = [C.output_throughput, C.ttft_p99_ms, C.tpot_p50_ms, C.kv_usage_peak, C.prefix_cache_hit_rate,
                 C.internal_fragmentation_mean, C.num_preemptions]
SAMPLING_COLUMNS = [C.n, C.beam_width]  # grid dimensions besides the config columns (workbench.grid.SAMPLING_KEYS)
SHARING_COLUMNS = [C.num_used_blocks_peak, C.num_unshared_blocks_peak, C.num_saved_blocks_peak,
                   C.num_shared_blocks_peak, C.num_cow_copies, C.sharing_saving]
NVML_COLUMNS = [c.name for c in COLUMNS if c.kind == TELEMETRY and c.unit and c.name != C.num_telemetry_samples]
REPORT_COLUMNS = [C.label, C.status, C.workload, C.block_size, C.max_num_batched_tokens, C.max_num_seqs,
                  C.enable_prefix_caching, C.quantization, C.kv_cache_dtype, C.attention_backend_used,
                  C.request_throughput, C.output_throughput, C.total_token_throughput, C.request_goodput,
                  C.ttft_p50_ms, C.ttft_p99_ms, C.tpot_p50_ms, C.tpot_p99_ms, C.itl_p99_ms, C.e2e_p99_ms,
                  C.kv_usage_mean, C.kv_usage_peak, C.internal_fragmentation_mean, C.prefix_cache_hit_rate,
                  C.num_preemptions, C.batch_size_mean, C.kv_blocks, C.duration_s, C.repeats,
                  C.kernel_compiles, C.device_name, C.run_host]


def column(name: str) -> Column:
    """The Column of ``name``; a KeyError naming the known columns for an unknown one."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a results column; known: {sorted(BY_NAME)}") from None


def title(name: str) -> str:
    """Axis / header text of a column: its label with the unit; an unknown name is returned as is."""
    return BY_NAME[name].title if name in BY_NAME else name


def latency(metric: str, stat: str) -> str:
    """The column of one latency statistic: latency("ttft", "p99") -> "ttft_p99_ms"."""
    return column(f"{metric}_{stat}_ms").name


def gap(part: str) -> str:
    """The column of one part of the gap-to-limit attribution: gap("host") -> "gap_host_s"."""
    return column(f"gap_{part}_s").name


def gap_kernel(kind: str) -> str:
    """The column of the device time over roofline in steps of one kind: gap_kernel("decode")."""
    return column(f"gap_kernel_{kind}_s").name


def spread(name: str) -> tuple[str, str]:
    """The columns holding the min and max over repeats of a "median" column."""
    if column(name).agg != MEDIAN:
        raise ValueError(f"{name!r} is not summarised over repeats (agg={column(name).agg!r})")
    return f"{name}_min", f"{name}_max"


def is_missing(value) -> bool:
    """None, or NaN (what a None setting becomes in a float column or a stored file)."""
    return value is None or (isinstance(value, float) and value != value)


def as_text(values):
    """A column's values (a pandas Series) as text, None and NaN alike as "None": under pandas 3 astype(str)
    keeps NaN as NaN, and a grid value of None would then not count as a value."""
    return values.map(lambda v: "None" if is_missing(v) else str(v))


def fmt(name: str, value) -> str:
    """A value formatted for a table ("-" for None / NaN)."""
    if is_missing(value):
        return "-"
    try:
        return BY_NAME[name].fmt.format(value) if name in BY_NAME else str(value)
    except (ValueError, TypeError):
        return str(value)


def config_columns() -> list[str]:
    return [c.name for c in COLUMNS if c.kind == CONFIG]


def median_columns() -> list[str]:
    return [c.name for c in COLUMNS if c.agg == MEDIAN]
