"""ModelRunner: turns a SchedulerOutput into model inputs, runs the forward pass, samples tokens.

Host-side work is kept off the critical path: inputs are written into preallocated (pinned) host
buffers with numpy and copied to the device in one go per tensor; each running request keeps a row
of a persistent block table that only receives its new block ids. A step in which every request decodes one token
(the common step at large batches) takes a shorter path through _prepare: no sort, one token per request, and the
block-table row of a request synced only when its table grew. Pure-decode steps on CUDA replay
a CUDA graph captured for the next batch size up on a ladder (1, 2, 4, 8, 16, 24, ... max_num_seqs). With
speculative decoding, verification steps in which every request verifies a draft of exactly k tokens replay a
verification graph (k + 1 query tokens per request, through the prefill kernel) on the same ladder; other
verification steps (mixed with prefill chunks, or with shorter drafts) run eagerly.
"""
from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .config import EngineConfig
from .kernels import AttentionMetadata, select_backend
from .kernels.metadata import prefill_work, prefill_work_fits
from .kv.groups import engine_kv_groups, layer_group_slots
from .model.llama import LlamaModel
from .model.spec import ModelSpec
from .model.weights import dtype_bytes, weight_bytes
from .quant.kv_cache import kv_cache_torch_dtype
from .async_step import InFlightStep
from .sampling import Sampler
from .scheduler import SchedulerOutput
from .spec_decode.proposal import Draft
from .spec_decode.verifier import verify_draft
from .memory import (CPU_KV_BUDGET_BYTES, SCRATCH_BLOCKS, GiB, TRIM_CHECK_INTERVAL, KVCacheSizing, check_host_memory,
                     forward_activation_bytes, reserved_trim_bytes, size_kv_cache)
from .stats import MemoryProfile
from .timeline import DeviceSpan, DeviceTimer

def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph: 1, 2, 4, then every multiple of 8 up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


@dataclass
class StepPlan:
    """What a step's forward pass needs beside the input buffers (every tensor-parallel rank gets a copy)."""

    num_tokens: int
    num_seqs: int
    num_cols: int                  # block-table columns the step reads
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    graph_size: int | None         # the CUDA graph replayed (a pure-decode step padded to graph_size), or None
    sample_rows: np.ndarray | None  # the sequences whose logits are needed; None: all of them
    # Speculative steps: the token rows whose logits are needed (each sampling sequence's last row, and the
    # 1 + k rows of each verified draft), in batch order; None otherwise (sample_rows applies).
    logit_rows: np.ndarray | None = None
    # Query tokens per sequence of the graph replayed: 1 for decode graphs, k + 1 for verification graphs.
    graph_query_len: int = 1
    # Async scheduling: (index [tokens] int64 on the device, the previous step's sampled tokens): forward_step sets
    # ids = cat(ids, tokens)[index], index[i] = i for a known token and num_tokens + its row of tokens for a
    # placeholder (one gather, no scatter kernel); index None: ids = tokens (the previous step's batch, in order).
    feed: tuple | None = None
    # Items of the prefill rows' work list in the input buffers (AttentionMetadata.prefill_work); 0: none.
    num_work: int = 0

    @property
    def padded_tokens(self) -> int:
        return self.graph_size * self.graph_query_len if self.graph_size else self.num_tokens

    @property
    def padded_seqs(self) -> int:
        return self.graph_size or self.num_seqs

    @property
    def decode_rows(self) -> int:
        """The leading rows the decode attention kernel runs: a decode graph's padding rows too."""
        return self.graph_size if self.graph_size and self.graph_query_len == 1 else self.num_decodes


@dataclass
class StepResult:
    """What one forward pass produced, and what it cost the host (seconds)."""

    sampled: dict[str, int]
    num_kv_tokens_read: int        # sum over requests of the context attended (K/V tokens read per layer)
    num_attention_scores: int      # query-key pairs scored per layer and head
    device_wait: float             # seconds the host waited for the device (the sampler's read of the tokens)
    used_cuda_graph: bool
    prepare_time: float = 0.0      # host seconds writing the inputs (and waiting for the last upload)
    launch_time: float = 0.0       # host seconds uploading and launching the forward pass
    sample_time: float = 0.0       # host seconds in the sampler (waiting for the device included)
    num_padding_tokens: int = 0    # dummy rows added to reach the CUDA graph's batch size
    device_span: DeviceSpan | None = None  # the forward pass's device timing (see engine.timeline)
    num_decode_kv_tokens_read: int = 0  # of num_kv_tokens_read, what the one-token (decode) rows attend
    # Speculative decoding: request_id -> tokens emitted by verifying its draft (accepted prefix + one more);
    # such requests are not in `sampled`.
    spec_sampled: dict[str, list[int]] = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    """What LLMEngine and LLM use of a model runner: ModelRunner on one device, and TPRunner over a
    tensor-parallel group, both implement it and nothing else of theirs is read from outside.

    Start-up: determine_num_blocks (sizing, engine/memory.py), allocate_kv_cache, capture_cuda_graphs.
    A step: execute(sched) prepares the inputs from the scheduler's output (its block tables and block copies
    included), runs the forward pass and samples. release / release_all forget block-table rows; close frees the KV cache
    and the graphs (and stops a group's workers). backend, device, kv_bytes_per_token, memory, graphs and model
    are read for counters.
    """

    device: torch.device
    memory: MemoryProfile | None

    def determine_num_blocks(self) -> int: ...
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def capture_cuda_graphs(self) -> None: ...
    def execute(self, sched: SchedulerOutput) -> StepResult: ...
    def release(self, request_id: str) -> None: ...
    def release_all(self) -> None: ...
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor: ...
    def close(self) -> None: ...


class InputBuffers:
    """Preallocated inputs of one step: host arrays (pinned on CUDA) and their device twins.

    upload() costs the host three copies whatever the step: the int64 inputs (ids, positions, slots) live in one buffer
    and go in one copy, the int32 ones (query_start_loc, seq_lens, the decode rows' order, the prefill rows' work list,
    and the step's block-table columns packed compactly) in another, and one device-side copy spreads the packed table
    into tables_dev (whose row stride, max_blocks, the CUDA graphs were captured with). The order (sort_decodes) is the
    decode rows by context, longest first: the order the decode attention kernel's programs take them in; the work list
    (max_work items, ModelRunner._prepare writes it) the prefill kernel's. To keep each copy a single contiguous
    range, the regions before the last one of a buffer go whole (a few hundred KiB of int64 at most, a few KiB of
    int32).
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device,
                 num_extra_groups: int = 0, max_work: int = 0, order_decodes: bool = True):
        pin = device.type == "cuda"
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.order_decodes = order_decodes  # False: no backend reads the order, none is computed

        def pair(size, dtype):
            host = torch.zeros(size, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(size, dtype=dtype, device=device)

        # int64: [ids | positions | slots], max_tokens each.
        self.host64, self.dev64 = pair(3 * max_tokens, torch.int64)
        # int32: [query_start_loc (max_seqs + 1, padded to 16 bytes) | seq_lens (max_seqs) | decode order (max_seqs) |
        # prefill work list (max_work) | packed block-table columns]. seq_lens starts 16-byte aligned like
        # query_start_loc, so the prefill kernel's views of both behind n decodes (query_start_loc[n:], seq_lens[n:])
        # are aligned alike: Triton builds one kernel variant per combination of its pointers' 16-byte alignments, and
        # trace_replay.warm_up builds each of them before a measurement (with seq_lens at max_seqs + 1, n = 3 mod 4 made
        # a variant no warm-up built: a 2.4 s stall).
        self.lens_at = -(-(max_seqs + 1) // 4) * 4
        self.max_work = max_work
        self.host32, self.dev32 = pair(self.lens_at + 2 * max_seqs + max_work + max_seqs * max_blocks, torch.int32)
        self.host32_np = self.host32.numpy()
        t, s = max_tokens, max_seqs
        (self.ids, self.pos, self.slots), (self.ids_dev, self.pos_dev, self.slots_dev) = (
            [buf[i * t:(i + 1) * t] for i in range(3)] for buf in (self.host64, self.dev64))
        at = self.lens_at
        self.qsl, self.lens = self.host32[:s + 1], self.host32[at:at + s]
        self.qsl_dev, self.lens_dev = self.dev32[:s + 1], self.dev32[at:at + s]
        self.order, self.order_dev = self.host32[at + s:at + 2 * s], self.dev32[at + s:at + 2 * s]
        self.work, self.work_dev = (buf[at + 2 * s:at + 2 * s + max_work] for buf in (self.host32, self.dev32))
        self.ids_np, self.pos_np, self.slots_np = self.ids.numpy(), self.pos.numpy(), self.slots.numpy()
        self.qsl_np, self.lens_np, self.order_np, self.work_np = (t.numpy() for t in (self.qsl, self.lens, self.order,
                                                                                      self.work))
        self.tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, pin_memory=pin)
        self.tables_np = self.tables.numpy()
        self.tables_dev = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device)
        # KV cache groups past the first (engine/kv/groups.py): their block tables and slot mappings.
        self.num_extra_groups = num_extra_groups
        if num_extra_groups:
            self.group_tables, self.group_tables_dev = pair(num_extra_groups * max_seqs * max_blocks, torch.int32)
            self.group_tables = self.group_tables.view(num_extra_groups, max_seqs, max_blocks)
            self.group_tables_dev = self.group_tables_dev.view(num_extra_groups, max_seqs, max_blocks)
            self.group_slots, self.group_slots_dev = pair(num_extra_groups * max_tokens, torch.int64)
            self.group_slots = self.group_slots.view(num_extra_groups, max_tokens)
            self.group_slots_dev = self.group_slots_dev.view(num_extra_groups, max_tokens)
            self.group_tables_np, self.group_slots_np = self.group_tables.numpy(), self.group_slots.numpy()
        # Recorded after each upload (see ModelRunner.wait_host_buffers).
        self.copied = torch.cuda.Event() if pin else None

    def wait_copied(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def sort_decodes(self, num_decodes: int) -> None:
        """order[:num_decodes]: the decode rows by context, longest first (ties in batch order)."""
        if self.order_decodes:
            self.order_np[:num_decodes] = np.argsort(-self.lens_np[:num_decodes], kind="stable")

    def upload(self, num_tokens: int, num_seqs: int, num_cols: int, num_decodes: int) -> None:
        t, s, n = self.max_tokens, self.max_seqs, num_seqs * num_cols
        self.sort_decodes(num_decodes)
        self.dev64[:2 * t + num_tokens].copy_(self.host64[:2 * t + num_tokens], non_blocking=True)
        start = self.lens_at + 2 * s + self.max_work
        self.host32_np[start:start + n] = self.tables_np[:num_seqs, :num_cols].reshape(-1)
        self.dev32[:start + n].copy_(self.host32[:start + n], non_blocking=True)
        self.tables_dev[:num_seqs, :num_cols].copy_(self.dev32[start:start + n].view(num_seqs, num_cols))
        if self.num_extra_groups:
            self.group_tables_dev[:, :num_seqs, :num_cols].copy_(self.group_tables[:, :num_seqs, :num_cols],
                                                                 non_blocking=True)
            self.group_slots_dev[:, :num_tokens].copy_(self.group_slots[:, :num_tokens], non_blocking=True)
        if self.copied is not None:
            self.copied.record()


class ModelRunner:
    """Owns the model, the physical KV cache tensors, the input buffers and the CUDA graphs of one engine.

    Invariants: rows[rid] is the persistent block-table row of a running request, and its first
    rows_written[rid] entries equal the request's first block ids; a request loses its row when it
    is preempted or finishes (release()). One physical block past the pool (null_block) is scratch
    for the padding rows of CUDA-graph batches, so padding never touches a request's KV.
    """

    def __init__(self, model: LlamaModel, spec: ModelSpec, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.spec, self.config = model, spec, config
        self.device, self.dtype = device, dtype
        self.backend = select_backend(config.attention_backend, device)
        self.sampler = Sampler(config.seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype)  # "fp8": float8_e4m3fn, 1 byte
        self.memory: MemoryProfile | None = None
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self.graph_sizes = graph_batch_sizes(min(config.max_num_seqs, config.max_num_batched_tokens))
        # Speculative decoding: verification graphs for batches where every request verifies a draft of exactly
        # num_speculative_tokens (k + 1 query tokens each), on the same ladder of batch sizes (spec_graph_sizes).
        k = config.num_speculative_tokens if config.speculative_method is not None else 0
        self.spec_query_len = k + 1 if k else 0
        self.spec_graph_sizes = [s for s in self.graph_sizes if s * (k + 1) <= config.max_num_batched_tokens] if k else []
        self.spec_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        max_tokens = max(config.max_num_batched_tokens, self.graph_sizes[-1])
        if device.type == "cpu":
            self._check_host_activations(max_tokens)
        # KV cache groups (engine/kv/groups.py) when some layers slide (under tensor parallelism too: every rank
        # receives rank 0's per-group tables): None keeps one table for every layer.
        self.kv_groups = engine_kv_groups(spec.layer_windows, spec.num_layers, config.tensor_parallel_size)
        extra = len(self.kv_groups) - 1 if self.kv_groups else 0
        # The prefill rows' work list, for a backend whose prefill kernel takes one (query blocks of block_q tokens).
        block_q = getattr(self.backend, "prefill_block_q", None)
        self.prefill_block_q = block_q(spec.num_heads // spec.num_kv_heads, device) if block_q else 0
        if self.prefill_block_q and not prefill_work_fits(config.max_num_seqs, max_tokens, self.prefill_block_q):
            self.prefill_block_q = 0  # more than the list encodes: the kernel's own grid
        max_work = max_tokens // self.prefill_block_q + config.max_num_seqs if self.prefill_block_q else 0
        self.buffers = InputBuffers(max_tokens, config.max_num_seqs, self.max_blocks_per_seq, device, extra, max_work,
                                    order_decodes=getattr(self.backend, "orders_decodes", False))
        # Persistent rows of the groups past the first (same row index as table_rows), and how much of each is
        # written. Slots a sliding group freed keep their old ids here: the kernels never read a key outside
        # the window (a masked tile reads finite, zero-initialised KV), so rows only ever grow.
        self.group_table_rows = (np.zeros((extra, config.max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
                                 if extra else None)
        self.group_rows_written: list[dict[str, int]] = [{} for _ in range(extra)]
        # Captured decode graphs write their last hidden states here (one buffer for all sizes, so the
        # graphs' shared pool keeps no per-graph output); the LM head runs eagerly on the rows that sample.
        hidden_rows = max([self.graph_sizes[-1]] + [s * self.spec_query_len for s in self.spec_graph_sizes])
        self.graph_hidden = (torch.empty(hidden_rows, spec.hidden_size, dtype=dtype, device=device)
                             if self.uses_cuda_graphs else None)
        # Persistent block-table rows (see the class docstring).
        self.table_rows = np.zeros((config.max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self.rows: dict[str, int] = {}
        self.rows_written: dict[str, int] = {}
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        # Constant arrays _prepare slices instead of allocating them each step.
        self._arange = np.arange(max(max_tokens, config.max_num_seqs), dtype=np.int64)
        self._ones = np.ones(config.max_num_seqs, dtype=np.int64)
        # size -> (graph, the view of graph_hidden it writes)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.null_block = 0
        self.device_timer = DeviceTimer(device)
        # Async scheduling: two pinned buffers the sampled tokens of alternate steps are copied into (the host reads
        # step N's while step N+1's copy may be under way), and two pinned buffers for the gather index of the
        # device-side feed (_feed), both created at the first launch() that needs them, and the index's device twin.
        # Alternating is enough: when the host writes one for step N+1, step N-1, which read it, has been processed
        # (its tokens were waited for, and the device runs a stream's work in order).
        self._token_host: list[torch.Tensor] = []
        self._feed_host: list[torch.Tensor] = []
        self._feed_dev = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # before the memory profile
        self._batch: list = []  # the batch in the order the last _prepare laid it out
        # trim_reserved: step shapes the caching allocator has served since its last trim, steps since a check.
        self._trim_shapes: set[tuple] = set()
        self._steps_since_trim_check = 0

    # ----- KV cache sizing and allocation -------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.spec.kv_bytes_per_token(dtype_bytes(self.kv_dtype))

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.name == "triton"

    def _check_host_activations(self, max_tokens: int) -> None:
        """On the CPU: the input buffers and one forward of max_num_batched_tokens must fit the host's memory."""
        cfg, spec = self.config, self.spec
        e = torch.empty((), dtype=self.dtype).element_size()
        # InputBuffers: host and device copies of the int64 and int32 inputs, of the block table and its packed twin.
        buffers = (2 * (3 * max_tokens * 8 + (2 * cfg.max_num_seqs + 1) * 4)
                   + cfg.max_num_seqs * self.max_blocks_per_seq * 16)
        seqs = min(cfg.max_num_seqs, max_tokens)
        qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        act = forward_activation_bytes(max_tokens, seqs, spec.hidden_size, spec.intermediate_size, qkv,
                                       spec.vocab_size, e)
        check_host_memory(f"max_num_batched_tokens={cfg.max_num_batched_tokens} (with max_num_seqs={cfg.max_num_seqs})",
                          buffers + act, "lower max_num_batched_tokens or max_num_seqs")

    def determine_num_blocks(self) -> int:
        """Blocks the pool can have (engine.memory.size_kv_cache over what was measured): the config's override,
        else what the memory budget leaves. Raises ValueError, naming the settings, when it does not fit."""
        cfg = self.config
        sizing = self.kv_sizing()
        if not sizing.fits:
            raise ValueError(sizing.reason)
        if self.device.type == "cpu":
            check_host_memory(f"a KV cache of {sizing.num_blocks} blocks" + (
                f" (num_gpu_blocks={cfg.num_gpu_blocks})" if cfg.num_gpu_blocks is not None else ""),
                (sizing.num_blocks + SCRATCH_BLOCKS) * sizing.bytes_per_block,
                "lower num_gpu_blocks (or gpu_memory_utilization)")
        return sizing.num_blocks

    def kv_sizing(self) -> KVCacheSizing:
        """The pool size and its reason: on CUDA from the worst-case profile (run once), on the CPU the budget."""
        cfg, spec = self.config, self.spec
        common = dict(kv_bytes_per_token=self.kv_bytes_per_token, block_size=cfg.block_size,
                      max_model_len=cfg.max_model_len, num_gpu_blocks=cfg.num_gpu_blocks,
                      gpu_memory_utilization=cfg.gpu_memory_utilization, max_positions=spec.max_position_embeddings)
        if self.kv_groups:
            common.update(group_windows=tuple(g.sliding_window for g in self.kv_groups),
                          chunk_tokens=cfg.max_num_batched_tokens)
        if self.device.type != "cuda":
            return size_kv_cache(total_bytes=CPU_KV_BUDGET_BYTES, weight_bytes=weight_bytes(self.model),
                                 device="cpu", **common)
        if self.memory is None:
            self.memory = self._profile_cuda_memory()
        m = self.memory
        sizing = size_kv_cache(total_bytes=m.total_bytes, weight_bytes=m.weight_bytes, other_bytes=m.other_bytes,
                               activation_peak_bytes=m.peak_activation_bytes, graph_pool_bytes=m.graph_pool_bytes,
                               non_torch_bytes=m.non_torch_bytes, **common)
        m.budget_bytes, m.kv_cache_bytes = sizing.budget_bytes, sizing.kv_cache_bytes
        m.margin_bytes = sizing.margin_bytes
        m.reserved_trim_bytes = reserved_trim_bytes(budget_bytes=m.budget_bytes,
                                                    non_torch_bytes=m.non_torch_bytes,
                                                    activation_peak_bytes=m.peak_activation_bytes)
        return sizing

    def _profile_cuda_memory(self) -> MemoryProfile:
        """Measure, before the KV pool exists, the peak of everything that is not KV at the config's limits:
        a prefill of max_num_batched_tokens, a decode of max_num_seqs rows with float32 logits and the
        sampler's filters, and the largest CUDA graph's pool (see engine/memory.py for how they combine)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        # An engine nothing refers to any more but a reference cycle (a notebook's previous LLM, a finished test's)
        # still holds its weights and KV pool until the collector runs: they would count as other memory here.
        gc.collect()
        self._tune_kernels()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        non_torch = (total - free) - torch.cuda.memory_reserved(dev)
        base = torch.cuda.memory_allocated(dev)
        weights = weight_bytes(self.model)
        prefill = self._measure_peak(self._profile_prefill)
        decode = self._measure_peak(self._profile_decode)
        graph_pool = self._measure_graph_pool() if self.uses_cuda_graphs else 0
        self.kv_caches = []
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        # Memory outside torch that the profile itself brought in (NCCL buffers at the first collective, kernel
        # modules loaded, library handles) stays: count the larger of before and after.
        free, _ = torch.cuda.mem_get_info(dev)
        non_torch = max(non_torch, (total - free) - torch.cuda.memory_reserved(dev))
        return MemoryProfile(total_bytes=total, weight_bytes=weights, peak_activation_bytes=max(prefill, decode),
                             non_torch_bytes=non_torch, kv_cache_bytes=0, other_bytes=max(base - weights, 0),
                             prefill_peak_bytes=prefill, decode_peak_bytes=decode, graph_pool_bytes=graph_pool)

    def _measure_peak(self, run) -> int:
        """Peak bytes allocated by run() beyond what was allocated before it (its scratch KV blocks excluded)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        self.kv_caches = []
        num_blocks = run(prepare=True)
        self.allocate_kv_cache(num_blocks)
        with_kv = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        run(prepare=False)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - with_kv
        self.kv_caches = []
        return peak

    def _profile_prefill(self, prepare: bool) -> int:
        """A forward of max_num_batched_tokens tokens over min(max_num_seqs, tokens) sequences, with logits for
        each. Every sequence's block table points at the same few scratch blocks: the KV written collides,
        which a profile does not mind, and the pool it needs is one sequence's."""
        cfg, bs = self.config, self.config.block_size
        num_seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens))
        num_tokens = min(cfg.max_num_batched_tokens, num_seqs * cfg.max_model_len)
        lens = np.full(num_seqs, num_tokens // num_seqs)
        lens[: num_tokens % num_seqs] += 1
        blocks_per_seq = -(-int(lens.max()) // bs)
        if prepare:
            return blocks_per_seq
        tables = np.broadcast_to(np.arange(blocks_per_seq, dtype=np.int32), (num_seqs, blocks_per_seq))
        seq_idx = np.repeat(np.arange(num_seqs), lens)
        positions = np.arange(num_tokens) - np.repeat(np.cumsum(lens) - lens, lens)
        b = self.buffers
        b.ids_np[:num_tokens] = 0
        b.pos_np[:num_tokens] = positions
        b.slots_np[:num_tokens] = tables[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs
        b.qsl_np[0] = 0
        np.cumsum(lens, out=b.qsl_np[1:num_seqs + 1])
        b.lens_np[:num_seqs] = lens
        b.tables_np[:num_seqs, :blocks_per_seq] = tables
        b.upload(num_tokens, num_seqs, blocks_per_seq, 0)
        meta = self._metadata(num_tokens, num_seqs, blocks_per_seq, 0, int(lens.max()), int(lens.max()))
        with torch.inference_mode():
            hidden = self.model(b.ids_dev[:num_tokens], b.pos_dev[:num_tokens], self.kv_caches, meta, self.backend)
            logits = self.model.compute_logits(hidden[b.qsl_dev[1:num_seqs + 1].long() - 1])
            del hidden
            logits.argmax(-1)
        return 0

    def _tune_kernels(self) -> None:
        """Run once, before the memory profile, the forward of every step shape whose kernels keep a tuned choice:
        a prefill of the token budget and a decode of each CUDA-graph batch size, largest first (the order the
        profile and the capture met them in before). Quantized linears and the fused GEMVs time their candidates
        at the first call of each row bucket (engine/quant/tuning.py), in a CUDA graph of repeated launches over
        weight copies that overflow the L2. At prefill sizes that takes GB, which the profile counted as activation
        peak when the tuning ran inside it: int8 llama-3.1-8b on an H200 measured a 10.7 GB peak, 2.4 GB with this
        pass (bf16: 2.3 GB), and its KV pool grew from 113.2 to 121.1 GB. Nothing tunes once the KV pool exists
        either. Choices the disk cache holds (tuning.py) are not timed again."""
        num_blocks = self._profile_prefill(prepare=True)
        self.allocate_kv_cache(num_blocks)
        self._profile_prefill(prepare=False)
        for n in reversed(self.graph_sizes):
            self._decode_forward(n, self.config.max_model_len)
        torch.cuda.synchronize(self.device)
        self.kv_caches = []

    def _decode_forward(self, n: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's forward over n rows of one context token each (scratch block 0): (hidden, logits)."""
        b = self.buffers
        b.ids_np[:n] = 0
        b.pos_np[:n] = 0
        b.slots_np[:n] = 0
        b.qsl_np[:n + 1] = np.arange(n + 1)
        b.lens_np[:n] = 1
        b.tables_np[:n, :1] = 0
        b.upload(n, n, 1, n)
        meta = self._metadata(n, n, 1, n, 1, max_seq_len)
        with torch.inference_mode():
            hidden = self.model(b.ids_dev[:n], b.pos_dev[:n], self.kv_caches, meta, self.backend)
            return hidden, self.model.compute_logits(hidden)

    def _profile_decode(self, prepare: bool) -> int:
        """A decode step of the largest batch (max_num_seqs rows, or the token budget if smaller): the forward
        with the attention split for max_model_len (the largest a decode can see), float32 logits over the whole
        vocabulary for every row, and the sampler over them at its worst case (Sampler.profile_params)."""
        if prepare:
            return 1
        n = self.graph_sizes[-1]
        hidden, logits = self._decode_forward(n, self.config.max_model_len)
        hidden_for_spec = hidden[:1] if self.spec_query_len else None
        del hidden
        with torch.inference_mode():
            # A throwaway generator: the profile leaves the engine's own (unseeded requests) where it was.
            # The sampler's worst case at n rows (full chunks of each filter path); every row seeded.
            self.sampler(logits, self.sampler.profile_params(n, logits.shape[-1]), [torch.Generator()] * n)
            if self.spec_query_len:  # a verification step: float32 logits at k + 1 rows per request
                del logits
                rows = min(n * self.spec_query_len, self.config.max_num_batched_tokens)
                logits = self.model.compute_logits(hidden_for_spec.expand(rows, -1).contiguous())
                logits.argmax(-1).tolist()
        return 0

    def _measure_graph_pool(self) -> int:
        """Bytes the pool of the largest decode graph holds (captured over scratch KV, then dropped). Smaller
        graphs reuse that pool (they are captured after it, into it), so it is the pool of the whole ladder."""
        dev = self.device
        self.allocate_kv_cache(1)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(dev)
        size = self.graph_sizes[-1]
        graph = self._capture(size, None, max_cols=1)
        if self.spec_graph_sizes:  # the largest verification graph, into the same pool: the pool is the larger
            q = self.spec_query_len
            spec_graph = self._capture(self.spec_graph_sizes[-1], graph.pool(), -(-q // self.config.block_size), q)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the warm-up's blocks in the general pool; the graph's private pool stays
        pool = torch.cuda.memory_reserved(dev) - before
        del graph
        if self.spec_graph_sizes:
            del spec_graph
        self.kv_caches = []
        torch.cuda.empty_cache()
        return max(pool, 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """K and V tensors of every layer for num_blocks blocks, plus the scratch (null) block. With KV cache
        groups, tensor j (zero-filled) is layer j of every group: kv_caches[layer] aliases its group slot's."""
        shape = (num_blocks + 1, self.config.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        self.kv_caches = []
        if self.kv_groups:
            tensors = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                        torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                       for _ in self.kv_groups[0].layers]
            self.kv_caches = [tensors[j] for _, j in layer_group_slots(self.kv_groups)]
            self.null_block = num_blocks
            return
        for _ in range(self.spec.num_layers):
            self.kv_caches.append((torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                                   torch.empty(shape, dtype=self.kv_dtype, device=self.device)))
        self.null_block = num_blocks

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks, (source, destination) block ids, in every layer's K and V cache: the
        copy-on-write of a block two sequences shared (KVCacheManager.pending_copies)."""
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for cache in {id(c): c for c in self.kv_caches}.values():  # KV cache groups share tensors
            for t in cache:
                t = t.view(torch.uint8) if t.element_size() == 1 else t  # fp8 has no index kernels everywhere
                t[dst] = t[src]

    # ----- persistent block-table rows ----------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Forget a request's block-table row (it finished, was aborted or was preempted)."""
        row = self.rows.pop(request_id, None)
        if row is not None:
            self.rows_written.pop(request_id)
            self.free_rows.append(row)
            for written in self.group_rows_written:
                written.pop(request_id, None)

    def truncate_row(self, request_id: str, num_blocks: int) -> None:
        """The request's block table shrank to num_blocks (speculative decoding released the blocks of rejected
        tokens): entries past it are stale and are rewritten when the table grows again."""
        if request_id in self.rows_written:
            self.rows_written[request_id] = min(self.rows_written[request_id], num_blocks)
        for written in self.group_rows_written:
            if request_id in written:
                written[request_id] = min(written[request_id], num_blocks)

    def close(self) -> None:
        """Free the KV cache and the CUDA graphs (the engine is being replaced); the model stays."""
        self.graphs = {}
        self.spec_graphs = {}
        self.kv_caches = []

    def release_all(self) -> None:
        """Forget every block-table row (after a failed step, whose requests are all recomputed)."""
        for request_id in list(self.rows):
            self.release(request_id)

    def _sync_row(self, request_id: str, block_ids: list[int]) -> int:
        row = self.rows.get(request_id)
        if row is None:
            row = self.rows[request_id] = self.free_rows.pop()
            self.rows_written[request_id] = 0
        written = self.rows_written[request_id]
        if len(block_ids) > written:
            self.table_rows[row, written:len(block_ids)] = block_ids[written:]
            self.rows_written[request_id] = len(block_ids)
        return row

    def _prepare_group_tables(self, sched: SchedulerOutput, batch, rows, seq_idx, positions, num_cols: int) -> None:
        """The block tables and slot mapping of the KV cache groups past the first (sched.group_block_tables), in
        the batch order _prepare chose (rows: the requests' persistent rows, already synced for group 0)."""
        bs, b, tables = self.config.block_size, self.buffers, sched.group_block_tables
        for r, _ in batch:
            rid = r.request_id
            row = self.rows[rid]
            for g, ids in enumerate(tables[rid][1:]):
                written = self.group_rows_written[g].get(rid, 0)
                if len(ids) > written:
                    self.group_table_rows[g, row, written:len(ids)] = ids[written:]
                    self.group_rows_written[g][rid] = len(ids)
        n, t = len(batch), len(positions)
        for g in range(b.num_extra_groups):
            b.group_tables_np[g, :n, :num_cols] = self.group_table_rows[g, rows, :num_cols]
            b.group_slots_np[g, :t] = (b.group_tables_np[g, seq_idx, positions // bs].astype(np.int64) * bs
                                       + positions % bs)

    # ----- one step -----------------------------------------------------------------------------
    def _metadata(self, num_tokens, num_seqs, num_cols, num_decodes, max_query_len, max_seq_len, num_work=0):
        b = self.buffers
        on_cpu = self.device.type == "cpu"
        meta = AttentionMetadata(
            slot_mapping=b.slots_dev[:num_tokens], query_start_loc=b.qsl_dev[:num_seqs + 1],
            seq_lens=b.lens_dev[:num_seqs], block_tables=b.tables_dev[:num_seqs, :num_cols],
            num_decodes=num_decodes, max_query_len=max_query_len, max_seq_len=max_seq_len,
            decode_order=b.order_dev[:num_decodes] if b.order_decodes else None,
            prefill_work=b.work_dev[:num_work] if num_work else None, prefill_block_q=self.prefill_block_q,
            # The torch backend loops over requests on the host: give it host copies (free on the CPU).
            query_start_loc_cpu=b.qsl_np[:num_seqs + 1].tolist() if on_cpu or self.backend.name == "torch" else None,
            seq_lens_cpu=b.lens_np[:num_seqs].tolist() if on_cpu or self.backend.name == "torch" else None)
        if b.num_extra_groups:
            meta.groups = (meta,) + tuple(
                dataclasses.replace(meta, slot_mapping=b.group_slots_dev[g, :num_tokens],
                                    block_tables=b.group_tables_dev[g, :num_seqs, :num_cols])
                for g in range(b.num_extra_groups))
        return meta

    def _begin(self, sched: SchedulerOutput) -> tuple[float, tuple[StepPlan, list, int, int]]:
        """A step's work before its forward pass: wait until the last upload has read the host buffers (the seconds
        waited are returned), copy the blocks the scheduler copies on write, and lay out the inputs (_prepare)."""
        t0 = time.perf_counter()
        self.wait_host_buffers()
        waited = time.perf_counter() - t0
        if sched.block_copies:
            self.copy_blocks(sched.block_copies)
        for request_id in sched.rewritten_tables:
            self.release(request_id)  # its table changed in place: _prepare writes the row afresh
        return waited, self._prepare(sched)

    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Run one step; sampled holds a token for each request whose last token was computed. The block tables
        and the step's copies-on-write come in the scheduler's output; the copies run before the forward pass, which
        writes into them."""
        t0 = time.perf_counter()
        waited, (plan, samplers, kv_read, scores) = self._begin(sched)
        t_prepared = time.perf_counter()
        spec_sampled = {}
        with torch.inference_mode():
            span = self.device_timer.begin()
            logits = self.forward_step(plan)
            self.device_timer.end(span)
            t_launched = time.perf_counter()
            if sched.spec_drafts:
                samplers, tokens, spec_sampled = self._verify(sched, samplers, logits)
            else:
                tokens = self.sampler(logits, [r.params for r in samplers],
                                      [r.generator for r in samplers]) if samplers else []
            del logits
        self.trim_reserved((plan.padded_tokens, plan.padded_seqs,
                            len(samplers) if plan.logit_rows is None else len(plan.logit_rows)))
        t_synced = time.perf_counter()
        # The host waits for the device in wait_host_buffers and in the sampler's read; the rest is host work.
        wait = waited + t_synced - t_launched if self.device.type == "cuda" else 0.0
        return StepResult(sampled={r.request_id: t for r, t in zip(samplers, tokens)}, num_kv_tokens_read=kv_read,
                          num_attention_scores=scores, device_wait=wait, used_cuda_graph=plan.graph_size is not None,
                          prepare_time=t_prepared - t0, launch_time=t_launched - t_prepared,
                          sample_time=t_synced - t_launched, num_padding_tokens=plan.padded_tokens - plan.num_tokens,
                          device_span=span, num_decode_kv_tokens_read=self._decode_kv_tokens(plan),
                          spec_sampled=spec_sampled)

    def launch(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Async scheduling's execute: prepare, launch the forward pass and the sampler, start copying the sampled
        tokens to the host, and return without waiting for the device. Input tokens that are placeholders (all_token_ids
        holds PLACEHOLDER) are taken on the device from prev's sampled tokens. No speculative drafts."""
        t0 = time.perf_counter()
        waited, (plan, samplers, kv_read, scores) = self._begin(sched)
        plan.feed = self._feed(plan, prev)
        t_prepared = time.perf_counter()
        with torch.inference_mode():
            span = self.device_timer.begin()
            logits = self.forward_step(plan)
            self.device_timer.end(span)
            t_launched = time.perf_counter()
            if samplers:
                tokens, logprobs = self.sampler.sample_on_device(logits, [r.params for r in samplers],
                                                                 [r.generator for r in samplers])
            else:
                tokens, logprobs = torch.zeros(0, dtype=torch.int64, device=self.device), None
            del logits
        host, copied = self._copy_tokens_to_host(tokens)
        t_done = time.perf_counter()
        result = StepResult(sampled={}, num_kv_tokens_read=kv_read, num_attention_scores=scores,
                            device_wait=waited if self.device.type == "cuda" else 0.0,
                            used_cuda_graph=plan.graph_size is not None, prepare_time=t_prepared - t0,
                            launch_time=t_launched - t_prepared, sample_time=t_done - t_launched,
                            num_padding_tokens=plan.padded_tokens - plan.num_tokens, device_span=span,
                            num_decode_kv_tokens_read=self._decode_kv_tokens(plan))
        return InFlightStep(sched, samplers, tokens, logprobs, host, copied, result, self.sampler,
                            (plan.padded_tokens, plan.padded_seqs, len(samplers)))

    def _feed(self, plan: StepPlan, prev: InFlightStep | None) -> tuple | None:
        """plan.feed for the step _prepare just laid out: where its input ids hold placeholders, the rows of prev's
        sampled tokens to take instead (None when it has none). Placeholders get id 0 in the upload."""
        t = plan.num_tokens
        ids = self.buffers.ids_np[:t]
        pos = np.flatnonzero(ids < 0)
        if not len(pos):
            return None
        if prev is None:
            raise RuntimeError("a placeholder input token with no step in flight; this is a bug")
        batch, n = self._batch, plan.num_seqs
        ids[pos] = 0  # a valid id for the upload; the feed replaces it
        if len(pos) == t == len(prev.samplers) and all(r is s for (r, _), s in zip(batch, prev.samplers)):
            return None, prev.tokens  # steady decode: the previous step's batch again, in the same order
        # A placeholder is the last query token of its request.
        seqs = pos if t == n else np.searchsorted(self.buffers.qsl_np[1:n + 1], pos, side="right")
        if not self._feed_host:
            size, pin = self.buffers.max_tokens, self.device.type == "cuda"
            self._feed_host = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        host = self._feed_host.pop(0)
        self._feed_host.append(host)
        index = host.numpy()[:t]
        index[:] = self._arange[:t]
        row_of = prev.row_of
        index[pos] = [t + row_of[batch[j][0].request_id] for j in seqs]
        dev_index = self._feed_dev[:t]
        dev_index.copy_(host[:t], non_blocking=True)
        return dev_index, prev.tokens

    def _copy_tokens_to_host(self, tokens: torch.Tensor):
        """(host tensor, event): a non-blocking copy of the sampled tokens into one of two pinned buffers (alternating
        steps), and the CUDA event after it (None on the CPU, where the copy is done on return)."""
        if self.device.type != "cuda":
            return tokens.clone(), None
        if not self._token_host:
            size = max(self.config.max_num_seqs, 1)
            self._token_host = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        buf = self._token_host.pop(0)
        self._token_host.append(buf)
        host = buf[:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _verify(self, sched: SchedulerOutput, samplers: list, logits: torch.Tensor):
        """Speculative step: sample the plain rows, verify each draft on its 1 + k rows (see plan.logit_rows).
        Returns (plain samplers, their tokens, {request_id: verified tokens})."""
        drafts, plain, plain_rows, spec, row = sched.spec_drafts, [], [], {}, 0
        best = logits.float().argmax(-1).tolist()  # one device sync for every greedy verification
        # Sampled verifications filter and draw on the host: one copy for all of them (the target's logits and the
        # drafts' q rows, which stayed on the device since the proposal), not one per request.
        sampled = [r.request_id for r in samplers if not r.params.greedy and r.request_id in drafts
                   and drafts[r.request_id].forced is None]
        host = logits
        if sampled:
            with_q = [rid for rid in sampled if drafts[rid].probs is not None]
            flat = torch.cat([logits.float()] + [drafts[rid].probs.float() for rid in with_q]).cpu()
            host, start, drafts = flat[:logits.shape[0]], logits.shape[0], dict(drafts)
            for rid in with_q:
                d = drafts[rid]
                drafts[rid] = Draft(d.token_ids, flat[start:start + len(d)], d.forced)
                start += len(d)
        for r in samplers:
            draft = drafts.get(r.request_id)
            if draft is None:
                plain.append(r)
                plain_rows.append(row)
                row += 1
            else:
                gen = r.generator if r.generator is not None else self.sampler.generator
                end = row + len(draft) + 1
                spec[r.request_id] = verify_draft(host[row:end], draft, r.params, gen, best[row:end])
                row += len(draft) + 1
        tokens = self.sampler(logits[torch.as_tensor(plain_rows, device=logits.device)], [r.params for r in plain],
                              [r.generator for r in plain]) if plain else []
        return plain, tokens, spec

    def trim_reserved(self, shape: tuple | None = None) -> bool:
        """After a step on CUDA: hand the caching allocator's free blocks back to the device when what torch reserves
        has grown past memory.reserved_trim_bytes (engine/memory.py says why), counting it in num_reserved_trims.

        shape: the step's (padded tokens, padded sequences, logit rows). Reading the allocator's counters is host
        work on every step's critical path, so (engine/memory.py, TRIM_CHECK_INTERVAL) they are read only after a step
        whose shape the allocator has not served since its last trim, and at least every TRIM_CHECK_INTERVAL steps;
        shape None always reads them. Returns whether it emptied the cache (which waits for the device)."""
        m = self.memory
        if m is None or not m.reserved_trim_bytes:
            return False
        self._steps_since_trim_check += 1
        if shape is not None:
            if shape in self._trim_shapes and self._steps_since_trim_check < TRIM_CHECK_INTERVAL:
                return False
            if len(self._trim_shapes) >= 4096:  # bounded; forgetting a shape only costs one more check
                self._trim_shapes.clear()
            self._trim_shapes.add(shape)
        self._steps_since_trim_check = 0
        reserved = torch.cuda.memory_stats_as_nested_dict(self.device)["reserved_bytes"]["all"]["current"]
        if reserved > m.reserved_trim_bytes:
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()
            m.num_reserved_trims += 1
            # The cache is empty: every shape needs new segments again.
            self._trim_shapes.clear()
            floor = torch.cuda.memory_reserved(self.device)
            if floor > m.reserved_trim_bytes:
                # What empty_cache cannot return (live tensors the profile did not see, free blocks in segments a
                # live tensor pins) is past the profile: trimming at every step would only wait for the device.
                warnings.warn(f"torch still reserves {(floor - m.reserved_trim_bytes) / GiB:.2f} GiB past what the "
                              "memory profile allowed for after emptying its cache, so the KV cache leaves that much "
                              "less of the engine's margin; the engine now trims only above that. Lower "
                              "gpu_memory_utilization by as much if the GPU must keep its share.", RuntimeWarning,
                              stacklevel=2)
                m.reserved_trim_bytes = floor
            return True
        return False

    def _decode_kv_tokens(self, plan: StepPlan) -> int:
        """K/V tokens the one-token rows of the step attend (they come first in the batch, see _prepare)."""
        return int(self.buffers.lens_np[:plan.num_decodes].sum()) if plan.num_decodes else 0

    def _prepare(self, sched: SchedulerOutput) -> tuple[StepPlan, list, int, int]:
        """Write the step's inputs into the host buffers: (plan, requests that sample, KV tokens read, scores)."""
        bs, b = self.config.block_size, self.buffers
        batch, drafts = sched.scheduled, sched.spec_drafts
        n = len(batch)
        # Every request decodes one token (the common step at large batches; each request has k >= 1, so a token
        # count of n means k = 1 for all): no sort, one token each.
        all_decode = not sched.num_prefill_tokens and not drafts and sched.num_decode_tokens == n
        if not all_decode and (sched.num_prefill_tokens or any(k != 1 for _, k in batch)):
            # Decodes first, so attention backends can send them to the decode kernel as one group.
            batch = sorted(batch, key=lambda rn: rn[1] != 1)
        # One pass over the requests in Python; everything after it is numpy on whole arrays. The block-table row
        # of a request is synced only when its table grew (every block_size tokens of a decode).
        start_l, row_l, total_l, ids_l = [], [], [], []
        sync_row, block_ids, rows_get, written_get = self._sync_row, sched.block_tables, self.rows.get, \
            self.rows_written.get
        if all_decode:
            qlen_l = None
            for r, _ in batch:
                c = r.num_computed_tokens
                tokens = r.all_token_ids
                rid = r.request_id
                table = block_ids[rid]
                row = rows_get(rid)
                if row is None or len(table) > written_get(rid):
                    row = sync_row(rid, table)
                start_l.append(c)
                row_l.append(row)
                total_l.append(len(tokens))
                ids_l.append(tokens[c])
        else:
            qlen_l = []
            for r, k in batch:
                c = r.num_computed_tokens
                tokens = r.all_token_ids
                qlen_l.append(k)
                start_l.append(c)
                row_l.append(sync_row(r.request_id, block_ids[r.request_id]))
                draft = drafts.get(r.request_id) if drafts else None
                if draft is None:
                    total_l.append(len(tokens))
                else:  # the last token, then the draft: 1 + k query tokens, all of them sampled
                    total_l.append(c + k)
                    tokens, c = tokens[c:] + list(draft.token_ids), 0
                if k == 1:
                    ids_l.append(tokens[c])
                else:
                    ids_l.extend(tokens[c:c + k])
        self._batch = batch
        starts = np.array(start_l, dtype=np.int64)
        rows = np.array(row_l, dtype=np.int64)
        num_tokens = len(ids_l)
        b.ids_np[:num_tokens] = ids_l
        if num_tokens == n:  # every request decodes one token
            qlens = self._ones[:n]
            seq_lens = starts + 1
            positions, seq_idx = starts, self._arange[:n]
        else:
            qlens = np.array(qlen_l, dtype=np.int64)
            seq_lens = starts + qlens
            seq_idx = np.repeat(self._arange[:n], qlens)
            positions = self._arange[:num_tokens] - np.repeat(np.cumsum(qlens) - qlens - starts, qlens)
        sample_mask = seq_lens == np.array(total_l, dtype=np.int64)
        all_sample = bool(sample_mask.all())
        samplers = [rn[0] for rn in batch] if all_sample else [batch[i][0] for i in np.flatnonzero(sample_mask)]
        max_seq_len = int(seq_lens.max())
        num_cols = -(-max_seq_len // bs)
        b.tables_np[:n, :num_cols] = self.table_rows[rows, :num_cols]
        b.pos_np[:num_tokens] = positions
        b.slots_np[:num_tokens] = b.tables_np[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs
        if self.group_table_rows is not None:
            self._prepare_group_tables(sched, batch, rows, seq_idx, positions, num_cols)
        b.qsl_np[0] = 0
        np.cumsum(qlens, out=b.qsl_np[1:n + 1])
        b.lens_np[:n] = seq_lens
        graph_size = self._graph_size(n) if num_tokens == n else None
        graph_query_len = 1
        if graph_size is not None:
            self._pad_for_graph(n, graph_size)
        elif drafts and self.spec_graphs and len(drafts) == n and num_tokens == n * self.spec_query_len:
            # Every request verifies a full draft: a verification graph, padded like a decode graph.
            graph_size = self._graph_size(n, self.spec_graph_sizes, self.spec_graphs)
            if graph_size is not None:
                graph_query_len = self.spec_query_len
                self._pad_for_graph(n, graph_size, graph_query_len)
        plan = StepPlan(num_tokens, n, num_cols, n if qlen_l is None else qlen_l.count(1),
                        1 if num_tokens == n else int(qlens.max()), max_seq_len, graph_size,
                        None if all_sample else np.flatnonzero(sample_mask), graph_query_len=graph_query_len)
        if graph_size is None and self.prefill_block_q and plan.num_decodes < n:
            # Eager steps only: a graph's prefill kernel keeps the grid it was captured with.
            d = plan.num_decodes
            work = prefill_work(qlens[d:], seq_lens[d:], self.prefill_block_q)
            b.work_np[:len(work)] = work
            plan.num_work = len(work)
        if drafts:
            ends = np.cumsum(qlens)
            plan.logit_rows = np.concatenate(
                [np.arange(ends[i] - (len(drafts[batch[i][0].request_id]) + 1 if batch[i][0].request_id in drafts
                                      else 1), ends[i]) for i in np.flatnonzero(sample_mask)] or [np.zeros(0, int)])
        scores = int((qlens * seq_lens - qlens * (qlens - 1) // 2).sum())
        return plan, samplers, int(seq_lens.sum()), scores

    def wait_host_buffers(self) -> None:
        """Until the last upload has read the pinned host buffers (a step that samples nothing does not wait
        for the device, so the next step could rewrite them before the copy ran)."""
        self.buffers.wait_copied()

    def upload(self, plan: StepPlan) -> None:
        """Copy the step's inputs from the host buffers to the device (a tensor-parallel rank receives them)."""
        self.buffers.upload(plan.padded_tokens, plan.padded_seqs, plan.num_cols, plan.decode_rows)

    def forward_step(self, plan: StepPlan) -> torch.Tensor | None:
        """The logits of the sequences that sample (None if none does): a CUDA graph's replay, or eager."""
        b, n = self.buffers, plan.num_seqs
        self.upload(plan)
        if plan.feed is not None:  # async scheduling: tokens sampled by the previous step, still on the device
            index, tokens = plan.feed
            ids = b.ids_dev[:plan.num_tokens]
            ids.copy_(tokens if index is None else torch.cat([ids, tokens]).index_select(0, index))
        rows = None if plan.sample_rows is None else torch.as_tensor(plan.sample_rows, device=self.device)
        if plan.graph_size is not None:
            graphs = self.graphs if plan.graph_query_len == 1 else self.spec_graphs
            graph, hidden = graphs[plan.graph_size]
            graph.replay()
            # The LM head runs eagerly, on the rows that sample only (a graph's pool keeps no logits).
            if rows is not None and not len(rows):
                return None
            if plan.logit_rows is not None:
                return self.model.compute_logits(hidden[torch.as_tensor(plan.logit_rows, device=self.device)])
            hidden = hidden[:n]
            return self.model.compute_logits(hidden if rows is None else hidden[rows])
        meta = self._metadata(plan.num_tokens, n, plan.num_cols, plan.num_decodes, plan.max_query_len,
                              plan.max_seq_len, plan.num_work)
        hidden = self.model(b.ids_dev[:plan.num_tokens], b.pos_dev[:plan.num_tokens], self.kv_caches, meta,
                            self.backend)
        if rows is not None and not len(rows):
            return None
        if plan.logit_rows is not None:
            return self.model.compute_logits(hidden[torch.as_tensor(plan.logit_rows, device=self.device)])
        last = b.qsl_dev[1:n + 1].long() - 1
        return self.model.compute_logits(hidden[last if rows is None else last[rows]])

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits [len, vocab] (float32, on the CPU; LM head in float32 unless quantized) at every
        position of one sequence.

        Runs one prefill through the model and the engine's attention backend over a scratch KV
        cache, leaving the engine's own cache untouched. For quality checks (KL, perplexity).
        """
        n, bs = len(token_ids), self.config.block_size
        num_blocks = -(-n // bs)
        shape = (num_blocks, bs, self.spec.num_kv_heads, self.spec.head_dim)
        caches = [(torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                   torch.empty(shape, dtype=self.kv_dtype, device=self.device)) for _ in range(self.spec.num_layers)]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=dev), query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev)[None], num_decodes=0,
            max_query_len=n, max_seq_len=n, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
        with torch.inference_mode():
            hidden = self.model(torch.as_tensor(token_ids, device=dev), torch.arange(n, device=dev), caches, meta,
                                self.backend)
            head = self.model.lm_head
            if type(head) is torch.nn.Linear:
                # A float32 head: bf16 logits are rounded to 1/32..1/8 at typical magnitudes, too coarse
                # to tell a near-tie from a real difference.
                weight = head.weight.float()
                return self.model.cap_logits(torch.cat([(h.float() @ weight.T).cpu() for h in hidden.split(1024)]))
            return torch.cat([self.model.compute_logits(h).cpu() for h in hidden.split(1024)])

    # ----- CUDA graphs --------------------------------------------------------------------------
    def _graph_size(self, n: int, sizes: list[int] | None = None, graphs: dict | None = None) -> int | None:
        sizes, graphs = (self.graph_sizes, self.graphs) if sizes is None else (sizes, graphs)
        if not graphs or n > sizes[-1]:
            return None
        return sizes[bisect_left(sizes, n)]  # the ladder is sorted: the smallest size >= n

    def _pad_for_graph(self, n: int, size: int, query_len: int = 1) -> None:
        """Padding rows n..size-1 run query_len dummy tokens each (1: decode graphs; k + 1: verification
        graphs) whose K/V goes to the null block."""
        b = self.buffers
        start, end = int(b.qsl_np[n]), int(b.qsl_np[n]) + (size - n) * query_len
        b.ids_np[start:end] = 0
        b.pos_np[start:end] = np.tile(np.arange(query_len), size - n) if query_len > 1 else 0
        b.slots_np[start:end] = self.null_block * self.config.block_size
        b.qsl_np[n + 1:size + 1] = b.qsl_np[n] + np.arange(1, size - n + 1) * query_len
        b.lens_np[n:size] = query_len
        b.tables_np[n:size, :-(-query_len // self.config.block_size)] = self.null_block
        if b.num_extra_groups:
            b.group_slots_np[:, start:end] = self.null_block * self.config.block_size
            b.group_tables_np[:, n:size, :-(-query_len // self.config.block_size)] = self.null_block

    def capture_cuda_graphs(self) -> None:
        """Capture decode steps for every size of the ladder, largest first, sharing one memory pool; records the
        pool's size in memory.graph_pool_bytes_captured."""
        if not self.uses_cuda_graphs:
            if self.memory is not None:
                self.memory.graph_pool_bytes_captured = 0
            return
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(dev)
        pool = None
        for size in reversed(self.graph_sizes):
            graph = self._capture(size, pool, self.max_blocks_per_seq)
            pool = graph.pool()
            self.graphs[size] = (graph, self.graph_hidden[:size])
        q = self.spec_query_len
        for size in reversed(self.spec_graph_sizes):  # into the same pool: never replayed at the same time
            graph = self._capture(size, pool, self.max_blocks_per_seq, q)
            self.spec_graphs[size] = (graph, self.graph_hidden[:size * q])
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        if self.memory is not None:
            self.memory.graph_pool_bytes_captured = torch.cuda.memory_reserved(dev) - before

    def _capture(self, size: int, pool, max_cols: int, query_len: int = 1) -> torch.cuda.CUDAGraph:
        """One graph of `size` rows of query_len tokens (1: a decode graph; k + 1: a verification graph, every
        row through the prefill kernel): padding rows only (null block), max_seq_len = max_model_len (the decode
        kernel's split count comes from it). Its hidden states go to graph_hidden[:size * query_len]."""
        args = self.graph_args(size, max_cols, query_len)
        t = size * query_len
        torch.cuda.synchronize(self.device)
        with torch.inference_mode():
            self.graph_hidden[:t].copy_(self.model(*args))  # warm-up: compile kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.graph_hidden[:t].copy_(self.model(*args))
        return graph

    def graph_args(self, size: int, max_cols: int, query_len: int = 1) -> tuple:
        """The model's arguments a graph of `size` rows of query_len tokens is captured with (views of the device
        input buffers, which each replay's upload refills); the buffers hold padding rows only."""
        b, t = self.buffers, size * query_len
        b.qsl_np[:size + 1] = np.arange(size + 1) * query_len
        b.ids_np[:t] = 0
        b.pos_np[:t] = np.tile(np.arange(query_len), size)
        b.slots_np[:t] = self.null_block * self.config.block_size
        b.lens_np[:size] = query_len
        b.tables_np[:size, :max_cols] = self.null_block
        if b.num_extra_groups:
            b.group_slots_np[:, :t] = self.null_block * self.config.block_size
            b.group_tables_np[:, :size, :max_cols] = self.null_block
        num_decodes = size if query_len == 1 else 0
        b.upload(t, size, max_cols, num_decodes)
        meta = self._metadata(t, size, max_cols, num_decodes, query_len, self.config.max_model_len)
        return (b.ids_dev[:t], b.pos_dev[:t], self.kv_caches, meta, self.backend)
