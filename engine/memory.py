"""The engine's memory arithmetic, in one place: how many KV blocks a memory budget holds, and why.

`size_kv_cache` is pure (bytes in, blocks out, with the reason). The runner calls it with what it measured
on the device (or the CPU budget), and workbench.planner calls it with its estimates, so the planner and
the engine cannot disagree on the rule, only on the inputs. On CUDA the rule is vLLM's, with the parts
vLLM's profile leaves out added:

    kv_cache_bytes = gpu_memory_utilization x total - weights - other torch memory - activation peak
                     - CUDA-graph pool - non-torch memory - MEMORY_MARGIN_BYTES
    num_blocks     = kv_cache_bytes // (kv_bytes_per_token x block_size / num_groups) - SCRATCH_BLOCKS

With KV cache groups (sliding-window models, engine/kv/groups.py) a block holds one group's layers, 1/num_groups
of every layer's K and V, and a request of n tokens needs request_blocks(group_windows, n) blocks: all of its
blocks in a full group, at most its window's in a sliding one (the whole chunk's while a prefill chunk runs).

The activation peak is the larger of a prefill of max_num_batched_tokens and a decode of max_num_seqs rows
with float32 logits and the sampler's temporaries (measured at the sampler's worst case, Sampler.profile_params:
it works a chunk of rows at a time, so they are bounded by sampler_temporary_bytes whatever max_num_seqs is); the
graph pool is what the largest captured decode graph keeps (every graph shares its pool). That bounds what torch
allocates; what its caching allocator reserves can grow past it (freed blocks stay cached), so a step that ends with
more than reserved_trim_bytes reserved empties the cache. Reading what is reserved (torch.cuda.memory_stats_as_nested_dict
builds every statistic of the allocator into nested dicts) is host work on every step's critical path, so the runner
reads it only after a step of a shape (tokens, sequences, logit rows) the allocator has not served since its last
trim, and at least every TRIM_CHECK_INTERVAL steps: a shape served before finds its blocks in the cache and takes no
new segment, so the steps skipped are those that leave it as it was, and the interval bounds how late a growth from
elsewhere is seen (after a trim every shape counts as new again). The sampler's temporaries are not in the shape (the
same rows may be greedy one step and random the next), but they are bounded by its chunk, far inside the margin for
the few steps until the next read. On the CPU the budget is gpu_memory_utilization x
CPU_KV_BUDGET_BYTES, and every allocation is first checked against the host memory available (check_host_memory).
"""
from __future__ import annotations

from dataclasses import dataclass

from .kv.groups import largest_request_tokens, request_blocks

GiB, MiB = 2**30, 2**20
CPU_KV_BUDGET_BYTES = 512 * MiB  # on the CPU, the pool is sized from this budget x gpu_memory_utilization
SCRATCH_BLOCKS = 1  # one block past the pool: the padding rows of CUDA-graph batches write their KV there
# Kept free inside the budget for what the profile cannot see: the caching allocator's fragmentation across
# step shapes, cuBLAS/cuDNN workspaces of streams first used later, and CUDA-context growth as kernels load.
MEMORY_MARGIN_BYTES = 1 * GiB

# Steps between two reads of the caching allocator's reserved bytes when every step's shape was served before
# (see the module docstring and ModelRunner.trim_reserved).
TRIM_CHECK_INTERVAL = 16

VERDICTS = ("fits", "weights do not fit", "max_model_len needs more KV than is left", "num_gpu_blocks does not fit")


@dataclass(frozen=True)
class KVCacheSizing:
    """The outcome of size_kv_cache (bytes unless named otherwise).

    num_blocks: KV blocks of the pool (the override when num_gpu_blocks is given). largest_max_model_len:
    the longest request the pool holds alone (num_blocks x block_size, capped at max_positions).
    verdict: one of VERDICTS; reason: a sentence naming the settings to change when it is not "fits".
    """

    total_bytes: int
    budget_bytes: int
    weight_bytes: int
    other_bytes: int
    activation_peak_bytes: int
    graph_pool_bytes: int
    non_torch_bytes: int
    margin_bytes: int
    kv_cache_bytes: int
    bytes_per_block: int
    num_blocks: int
    max_blocks: int
    largest_max_model_len: int
    verdict: str
    reason: str

    @property
    def fits(self) -> bool:
        return self.verdict == VERDICTS[0]


def _per_group(windows) -> str:
    if len(windows) == 1 and windows[0] is None:
        return ""
    full = sum(w is None for w in windows)
    return (f" shared by {len(windows)} KV cache groups ({full} full, {len(windows) - full} sliding-window, "
            f"1/{len(windows)} of the layers each)")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def size_kv_cache(*, total_bytes: int, gpu_memory_utilization: float, weight_bytes: int, kv_bytes_per_token: int,
                  block_size: int, max_model_len: int, other_bytes: int = 0, activation_peak_bytes: int = 0,
                  graph_pool_bytes: int = 0, non_torch_bytes: int = 0, margin_bytes: int | None = None,
                  num_gpu_blocks: int | None = None, load_bytes: int | None = None,
                  max_positions: int | None = None, device: str = "cuda",
                  host_available_bytes: int | None = None, group_windows: tuple | None = None,
                  chunk_tokens: int | None = None) -> KVCacheSizing:
    """How many KV blocks fit, by the rule in the module docstring; never raises for a config that does not fit
    (the verdict says so). total_bytes: device memory (cudaMemGetInfo total), or CPU_KV_BUDGET_BYTES on the CPU,
    where only the budget counts. load_bytes: peak bytes of loading the weights (the model dtype, before any
    quantization), default weight_bytes. max_positions: the model's context length, caps largest_max_model_len.
    host_available_bytes: on the CPU, what a num_gpu_blocks override is checked against (default: this machine's
    available memory, available_host_bytes()). group_windows: the sliding window of each KV cache group (None: full
    attention), when the engine keeps KV per group (see the module docstring); kv_bytes_per_token stays every
    layer's. chunk_tokens: the longest prefill chunk (max_num_batched_tokens), for what one request needs at most.
    """
    margin = MEMORY_MARGIN_BYTES if margin_bytes is None else margin_bytes
    on_cpu = device == "cpu"
    budget = int(gpu_memory_utilization * total_bytes)
    windows = tuple(group_windows) if group_windows else (None,)
    bytes_per_block = kv_bytes_per_token * block_size // len(windows)
    if on_cpu:
        weights = other = peak = graphs = non_torch = margin = 0
        kv_bytes = budget
        if num_gpu_blocks is not None:  # an override is bounded by the host's memory, not the budget
            kv_bytes = available_host_bytes() if host_available_bytes is None else host_available_bytes
    else:
        weights, other, peak, graphs, non_torch = (weight_bytes, other_bytes, activation_peak_bytes,
                                                   graph_pool_bytes, non_torch_bytes)
        kv_bytes = budget - weights - other - peak - graphs - non_torch - margin
    max_blocks = max(kv_bytes // bytes_per_block - SCRATCH_BLOCKS, 0)
    num_blocks = max_blocks if num_gpu_blocks is None else num_gpu_blocks
    largest = num_blocks * block_size if max_positions is None else min(num_blocks * block_size, max_positions)
    load = weight_bytes if load_bytes is None else load_bytes
    need = -(-max_model_len // block_size)
    steady = need  # blocks a request of max_model_len holds between steps
    if group_windows:
        chunk = min(chunk_tokens or max_model_len, max_model_len)
        need = request_blocks(windows, max_model_len, block_size, chunk)
        steady = request_blocks(windows, max_model_len, block_size)
        largest = largest_request_tokens(windows, num_blocks, block_size, chunk_tokens or max_model_len,
                                         max_positions or max(max_model_len, num_blocks * block_size))
    if not on_cpu and load > budget:
        verdict = VERDICTS[1]
        reason = (f"the weights need {_gib(load)} but gpu_memory_utilization={gpu_memory_utilization} of "
                  f"{_gib(total_bytes)} is {_gib(budget)}: quantize the weights, use more GPUs "
                  "(tensor_parallel_size) or a smaller model")
    elif num_gpu_blocks is not None and on_cpu and num_gpu_blocks > max_blocks:
        verdict = VERDICTS[3]
        reason = (f"num_gpu_blocks={num_gpu_blocks} needs "
                  f"{_gib((num_gpu_blocks + SCRATCH_BLOCKS) * bytes_per_block)} of host memory; this machine has "
                  f"{_gib(kv_bytes)} available: lower num_gpu_blocks to {max_blocks} or less, or leave it None")
    elif num_gpu_blocks is not None and num_gpu_blocks > max_blocks:
        verdict = VERDICTS[3]
        reason = (f"num_gpu_blocks={num_gpu_blocks} needs {_gib((num_gpu_blocks + SCRATCH_BLOCKS) * bytes_per_block)}"
                  f" of KV but {_gib(max(kv_bytes, 0))} is left after weights {_gib(weights)}, activation peak "
                  f"{_gib(peak)}, CUDA graphs {_gib(graphs)}, other {_gib(other + non_torch)} and the margin "
                  f"{_gib(margin)}: lower num_gpu_blocks to {max_blocks} or less, or leave it None")
    elif num_blocks < need:
        verdict = VERDICTS[2]
        left = (f"the budget gpu_memory_utilization={gpu_memory_utilization} x {_gib(total_bytes)}" if on_cpu else
                f"what is left after weights {_gib(weights)}, activation peak {_gib(peak)}, CUDA graphs "
                f"{_gib(graphs)}, other {_gib(other + non_torch)} and the margin {_gib(margin)}")
        source = f"num_gpu_blocks={num_gpu_blocks}" if num_gpu_blocks is not None else left
        fix = (f"lower max_model_len to {largest} or less" if largest > 0 else "lower max_model_len")
        reason = (f"the KV cache has {num_blocks} blocks of {block_size} tokens{_per_group(windows)} "
                  f"({num_blocks * block_size // len(windows)} tokens{' of every layer' if group_windows else ''}, "
                  f"from {source}) but max_model_len={max_model_len} needs {need} blocks "
                  f"({_gib(need * bytes_per_block)}) for one request, short by "
                  f"{_gib((need - num_blocks) * bytes_per_block)}: {fix} (the largest max_model_len that fits "
                  f"is {largest}), raise gpu_memory_utilization or num_gpu_blocks, quantize the weights or the KV "
                  "cache, or use more GPUs")
    else:
        verdict = VERDICTS[0]
        reason = (f"{num_blocks} KV blocks{_per_group(windows)} ({num_blocks * block_size // len(windows)} tokens) hold "
                  f"{num_blocks // steady} requests of max_model_len={max_model_len} at once")
    return KVCacheSizing(
        total_bytes=total_bytes, budget_bytes=budget, weight_bytes=weights, other_bytes=other,
        activation_peak_bytes=peak, graph_pool_bytes=graphs, non_torch_bytes=non_torch, margin_bytes=margin,
        kv_cache_bytes=kv_bytes, bytes_per_block=bytes_per_block, num_blocks=num_blocks, max_blocks=max_blocks,
        largest_max_model_len=largest, verdict=verdict, reason=reason)


def reserved_trim_bytes(*, budget_bytes: int, non_torch_bytes: int, activation_peak_bytes: int) -> int:
    """Bytes reserved by torch's caching allocator above which the runner returns its free cached blocks to the
    device after a step (CUDA): budget - non-torch - activation peak.

    Why: the allocator keeps every freed block cached and, on a GPU with room past the share, takes a new segment
    whenever no cached block is large enough, so steps whose shapes grow (a decode batch filling up, logits of a
    few more rows each step) pile up segments: 5.7 GB reserved beyond the allocated peak at max_num_seqs=2048
    on an H200, while the allocated peak matched the profile. A step needs about its activation peak in new segments
    when nothing cached fits, so a step that starts at or below this many reserved bytes ends within the share;
    the margin is left for what that estimate misses (segment rounding above the allocated peak, non-torch growth
    after the profile: together up to 130 MB on an H200 at max_num_batched_tokens=32768 when the margin itself was
    counted here). With the pool sized by size_kv_cache this keeps up to one margin of free blocks cached between
    steps beyond the weights, the pool and the graph pool, so steps whose activations need less (repeating shapes)
    never trim.
    """
    return budget_bytes - non_torch_bytes - activation_peak_bytes


DRAFT_EXTRA_SHARE = 0.15  # a draft model's engine: this share of the device on top of what is in use


def draft_memory_share(*, gpu_memory_utilization: float, total_bytes: int, free_bytes: int, reserved_bytes: int,
                       allocated_bytes: int, extra: float = DRAFT_EXTRA_SHARE) -> float:
    """The gpu_memory_utilization a draft model's engine gets (CUDA): what is in use now, live torch tensors
    (allocated_bytes) and memory outside torch (total - free - reserved, cudaMemGetInfo against torch's reserved
    bytes), plus `extra` of the device, at most the target's gpu_memory_utilization. The draft's own sizing
    (size_kv_cache) takes that in-use memory off again, so its pool comes out at about `extra` of the device.

    Why not total - free: what torch's allocator holds cached but unallocated is not in use, and the draft's pool can
    be served from it. empty_cache() cannot return a segment that still holds one live block (an earlier engine's
    KV pool segment that a later tensor was carved from). After the PDL and sharing GPU tests in one process the
    draft of a 6M model took 45.5 GiB and the target 23.8 of an 80 GB H100 (gpu_tests_spec_share_h100.log), not
    about 12 and 59: about 34 GiB counted as in use when the draft's share was read, yet the two pools together
    used the whole 0.9, so nothing held those 34 GiB once the pools existed. Cached segments fit that; it is
    inferred from those figures. With such a segment made on purpose, the draft keeps its share on an H200
    (tests/gpu/test_spec_decode_gpu.py, gpu_tests_draft_share_6cb1323_h200.log).
    """
    in_use = allocated_bytes + max(total_bytes - free_bytes - reserved_bytes, 0)
    return min(gpu_memory_utilization, in_use / total_bytes + extra)


# ----- host memory (the CPU device, and every load) ------------------------------------------------

def available_host_bytes() -> int:
    """Memory this process can still allocate on the host without swapping (MemAvailable), in bytes."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: do not refuse


def check_host_memory(setting: str, need_bytes: int, advice: str, available: int | None = None) -> None:
    """Raise ValueError naming `setting`, the bytes needed and the bytes available, when need > available."""
    have = available_host_bytes() if available is None else available
    if need_bytes > have:
        raise ValueError(f"{setting} needs {need_bytes / GiB:.1f} GiB of host memory; this machine has "
                         f"{have / GiB:.1f} GiB available: {advice}")


def forward_activation_bytes(num_tokens: int, num_seqs: int, hidden_size: int, intermediate_size: int,
                             qkv_size: int, vocab_size: int, dtype_bytes: int) -> int:
    """An upper estimate of one eager forward's activation peak (bytes): the residual stream and its normed
    copy, q/k/v, the gate/up projection and its SwiGLU output, the down projection, the LM head over
    num_seqs rows in the model dtype plus its float32 copy, and the sampler's temporaries over them
    (sampler_temporary_bytes at the default chunk sizes). For host-memory checks before any allocation."""
    from .sampling import Sampler
    per_token = 4 * hidden_size + qkv_size + 3 * intermediate_size
    default = Sampler()
    sampler = sampler_temporary_bytes(num_seqs, vocab_size, default.chunk_rows, default.sort_rows)
    return num_tokens * per_token * dtype_bytes + num_seqs * vocab_size * (dtype_bytes + 4 + 4) + sampler


# Bytes per element of a chunk of rows x vocab that the sampler (engine.sampling.Sampler) holds at its peak, beyond
# the logits. Top-k/plain path: the float32 copy x (4), the exponentials q (4), one bool mask (1), and a 16-bit
# gather before the float32 copy (2) when the logits are not float32; the logprobs pass (x and log_softmax, 8) is
# smaller. Sort path: x (4), torch.sort's values (4) and int64 indices (8), and what torch.sort allocates inside: on
# CUDA, for fewer than 128 rows, two int2 (index, segment) arrays (16), a keys buffer (4) and cub's double buffers
# of keys and values (12), so 48 in all; after the sort, x, the sorted values, their exponentials, the cumulative
# sum and a bool mask (17), then x and q (8); top-p alone first probes its largest values (x, two float32 buffers
# and a mask: 13) and sorts only if its nucleus is not among them. (torch.topk of at most 10 rows of >= 100000 sorts them too: the sort
# path's bytes over at most 10 rows, below a top-k chunk's.)
SAMPLER_TOPK_BYTES_PER_ELEMENT = 4 + 4 + 1 + 2
# +8: the count above (48) was 52.2 bytes per element measured on an H200 (torch 2.11, 32 rows of 128256): an int64
# buffer inside the segmented sort it misses.
SAMPLER_SORT_BYTES_PER_ELEMENT = 4 + 4 + 8 + 16 + 4 + 12 + 8


def sampler_temporary_bytes(num_rows: int, vocab_size: int, chunk_rows: int, sort_rows: int) -> int:
    """An upper estimate (bytes) of the sampler's device temporaries over num_rows rows of logits, which exist beside
    the logits themselves: the larger of a full top-k/plain chunk (min(num_rows, chunk_rows) rows) and a full sort
    chunk (min(num_rows, sort_rows) rows), plus the argmax and token vector (16 bytes a row). Bounded by the chunk
    sizes whatever num_rows is (see the constants above for the bytes per element). The engine does not size the
    KV cache with it: its memory profile measures the sampler at Sampler.profile_params(max_num_seqs)."""
    topk = min(num_rows, chunk_rows) * vocab_size * SAMPLER_TOPK_BYTES_PER_ELEMENT
    sort = min(num_rows, sort_rows) * vocab_size * SAMPLER_SORT_BYTES_PER_ELEMENT
    return max(topk, sort) + 16 * num_rows
