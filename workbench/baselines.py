"""Naive baselines: contiguous KV allocators (the vLLM paper's Orca Max / Pow2 / Oracle) replayed beside
the paged allocator over one request trace. Pure Python: no model, no GPU, a few milliseconds per trace.

The replay (`replay_allocator`) is one loop shared by every allocator, so only the allocator differs:

- Requests are admitted first-come-first-served in trace order; arrival times are ignored (an offline
  batch keeps the pool under pressure, the regime the paper measured). A request's length is its prompt
  plus the tokens it generated; the step that admits it adds its first output token, every later step
  one more, and it leaves after the step that reaches prompt + max_tokens (its final length).
- Contiguous (``max``, ``pow2``, ``oracle``): at admission a request reserves one contiguous run of token
  slots, first fit in a pool of ``capacity_tokens`` slots: max_model_len (Max), the next power of two of
  its final length capped at max_model_len (Pow2), or exactly its final length (Oracle). It never grows
  past that, so it is never preempted.
- Paged (``paged``): the engine's own allocator, `engine.kv.KVCacheManager` (prefix caching off), with
  capacity_tokens // block_size blocks, driven directly, not through the scheduler or the model. A request
  takes a block when its tokens need one. When a running request finds no free block, the most recently
  admitted running request is preempted (blocks freed, re-admitted later with its tokens so far as
  prompt: recompute), and nothing is admitted in that step, as engine/scheduler.py does.
- At most ``max_num_seqs`` requests run at once, for every allocator.
- Sliding-window models (``group_windows``: the window of each KV cache group, engine/kv/groups.py): the paged
  allocator is the engine's `engine.kv.HybridKVCacheManager`, a pool of num_groups x capacity_tokens // block_size
  blocks of 1/num_groups of the layers each (the same memory), whose sliding groups free the blocks that left
  their window; its parts are counted in slots of every layer (a group's slot is 1/num_groups of one), and the
  timeline adds ``group<g>_blocks``, each group's blocks in use. The contiguous allocators keep every token.

Each step the pool's token slots are split into five parts that sum to capacity_tokens:

- tokens: slots holding a token of a running request;
- reservation: contiguous slots reserved for tokens the request has yet to generate;
- internal_fragmentation: allocated slots the request will never fill (contiguous: reserved - final length;
  paged: the empty tail of each request's last block);
- external_fragmentation: free slots the head of the waiting queue could not use although there were
  enough of them in total (no single hole was large enough); always 0 for paged blocks;
- free: the other free slots.

(DESIGN.md's "reservation waste" of a contiguous allocator is reservation + internal_fragmentation.)
"""
from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd

from .metrics import group_blocks_column

ALLOCATORS = ("max", "pow2", "oracle", "paged")
LABELS = {"max": "Orca (Max)", "pow2": "Orca (Pow2)", "oracle": "Orca (Oracle)", "paged": "vLLM (paged)"}
PARTS = ("tokens", "reservation", "internal_fragmentation", "external_fragmentation", "free")
TIMELINE_COLUMNS = ["allocator", "label", "step", "num_running", "num_waiting", "num_preemptions",
                    "num_finished", *PARTS, "capacity_tokens"]


def reserved_slots(policy: str, final_len: int, max_model_len: int) -> int:
    """Token slots a contiguous allocator reserves for a request of ``final_len`` tokens (prompt + output)."""
    if final_len > max_model_len:
        raise ValueError(f"a request of {final_len} tokens is longer than max_model_len={max_model_len}: "
                         "raise max_model_len or shorten the trace")
    if policy == "max":
        return max_model_len
    if policy == "pow2":
        return min(1 << (final_len - 1).bit_length(), max_model_len)
    if policy == "oracle":
        return final_len
    raise ValueError(f"policy={policy!r} is not a contiguous allocator: use 'max', 'pow2' or 'oracle'")


@dataclass
class _Seq:
    """A request as the replay sees it; request_id / num_tokens / num_computed_tokens are what
    KVCacheManager reads."""

    request_id: str
    final_len: int
    length: int                  # prompt + generated tokens so far
    num_computed_tokens: int = 0  # tokens with KV in the pool (0 while waiting)
    order: int = 0                # admission counter: the newest running request is preempted first

    @property
    def num_tokens(self) -> int:
        return self.length


class ContiguousAllocator:
    """One contiguous run of slots per request, placed first fit.

    Invariants: ``segments`` is sorted by start and its runs never overlap; free slots are capacity minus
    the summed run sizes, and a request fits only into one hole (gap between runs) at least its size.
    """

    def __init__(self, policy: str, capacity_tokens: int, max_model_len: int):
        reserved_slots(policy, 1, max_model_len)  # validates the policy
        if policy == "max" and max_model_len > capacity_tokens:
            raise ValueError(f"Max reserves max_model_len={max_model_len} slots per request but the pool has "
                             f"{capacity_tokens}: raise capacity_tokens or lower max_model_len")
        self.policy, self.capacity, self.max_model_len = policy, capacity_tokens, max_model_len
        self.segments: list[tuple[int, int, str]] = []   # (start, size, request_id)
        self.size_of: dict[str, int] = {}

    def need(self, seq: _Seq) -> int:
        return reserved_slots(self.policy, seq.final_len, self.max_model_len)

    def _holes(self):
        pos = 0
        for start, size, _ in self.segments:
            yield pos, start - pos
            pos = start + size
        yield pos, self.capacity - pos

    def admit(self, seq: _Seq) -> bool:
        size = self.need(seq)
        start = next((s for s, gap in self._holes() if gap >= size), None)
        if start is None:
            return False
        bisect.insort(self.segments, (start, size, seq.request_id))
        self.size_of[seq.request_id] = size
        return True

    def grow(self, seq: _Seq) -> bool:
        return True  # the reservation already covers the final length

    def free(self, seq: _Seq) -> None:
        del self.size_of[seq.request_id]
        self.segments = [s for s in self.segments if s[2] != seq.request_id]

    @property
    def num_free_slots(self) -> int:
        return self.capacity - sum(self.size_of.values())

    def could_fit_in_total(self, seq: _Seq) -> bool:
        return self.need(seq) <= self.num_free_slots

    def parts(self, running: list[_Seq]) -> dict:
        return {"tokens": sum(s.length for s in running),
                "reservation": sum(s.final_len - s.length for s in running),
                "internal_fragmentation": sum(self.size_of[s.request_id] - s.final_len for s in running)}


class PagedAllocator:
    """The engine's KVCacheManager with capacity_tokens // block_size blocks; a request holds
    ceil(length / block_size) blocks. Any free block serves any request, so there is no external
    fragmentation."""

    def __init__(self, capacity_tokens: int, block_size: int, max_model_len: int, group_windows=None):
        from engine.kv import HybridKVCacheManager, KVCacheManager
        from engine.kv.groups import KVCacheGroup

        self.block_size = block_size
        self.num_groups = len(group_windows) if group_windows else 1
        if group_windows:
            specs = tuple(KVCacheGroup((), w) for w in group_windows)
            self.kv = HybridKVCacheManager(self.num_groups * (capacity_tokens // block_size), block_size, False,
                                           specs, max_chunk_tokens=max_model_len)
        else:
            self.kv = KVCacheManager(capacity_tokens // block_size, block_size, enable_prefix_caching=False)
        self.capacity = self.kv.num_blocks // self.num_groups * block_size
        if self.kv.blocks_needed(max_model_len) > self.kv.num_blocks:
            raise ValueError(f"max_model_len={max_model_len} needs {self.kv.blocks_needed(max_model_len)} blocks of "
                             f"{block_size} but the pool has {self.kv.num_blocks}: raise capacity_tokens")

    def admit(self, seq: _Seq) -> bool:
        return self.kv.allocate_slots(seq, seq.length + 1, [])

    def grow(self, seq: _Seq) -> bool:
        return self.kv.allocate_slots(seq, 1)

    def free(self, seq: _Seq) -> None:
        self.kv.free(seq)

    @property
    def num_free_slots(self) -> float:
        return self.kv.num_free_blocks * self.block_size / self.num_groups

    def could_fit_in_total(self, seq: _Seq) -> bool:
        return False  # a paged request that did not fit lacked blocks in total: no external fragmentation

    def parts(self, running: list[_Seq]) -> dict:
        if self.num_groups == 1 and not hasattr(self.kv, "groups"):
            tokens = sum(s.length for s in running)
            allocated = sum(len(self.kv.block_ids(s.request_id)) for s in running) * self.block_size
            return {"tokens": tokens, "reservation": 0, "internal_fragmentation": allocated - tokens}
        # Per group: a sliding group stores no token of a slot it skipped (null); the rest as one table.
        bs, k, tokens, allocated = self.block_size, self.num_groups, 0, 0
        for m in self.kv.groups:
            skipped = getattr(m, "num_skipped", {})
            for s in running:
                gone = skipped.get(s.request_id, 0)
                tokens += s.length - gone * bs
                allocated += (len(m.block_ids(s.request_id)) - gone) * bs
        return {"tokens": tokens / k, "reservation": 0, "internal_fragmentation": (allocated - tokens) / k,
                **{group_blocks_column(g): n for g, n in enumerate(self.kv.group_used_blocks())}}


def _lengths(trace) -> list[tuple[str, int, int]]:
    """(request_id, prompt_len, output_len) of a Workload, RequestSpecs, or (prompt_len, output_len) pairs."""
    out = []
    for i, r in enumerate(getattr(trace, "requests", trace)):
        if isinstance(r, (tuple, list)):
            out.append((f"req-{i}", int(r[0]), int(r[1])))
        else:
            out.append((r.request_id, r.prompt_len, r.max_tokens))
    return out


def replay_allocator(trace, allocator: str, capacity_tokens: int, max_model_len: int, block_size: int = 16,
                     max_num_seqs: int = 256, group_windows=None) -> pd.DataFrame:
    """Replay ``trace`` through one allocator (see the module docstring); one row per step.

    trace: a Workload, a list of RequestSpec, or (prompt_len, output_len) pairs. allocator: one of
    ALLOCATORS. capacity_tokens: KV slots in the pool (the same memory for every allocator; paged uses
    capacity_tokens // block_size whole blocks). Columns: TIMELINE_COLUMNS, memory parts in token slots.
    group_windows: a sliding-window model's KV cache groups (see the module docstring; the paged allocator only).
    """
    if allocator == "paged":
        alloc = PagedAllocator(capacity_tokens, block_size, max_model_len, group_windows)
    elif allocator in ALLOCATORS:
        alloc = ContiguousAllocator(allocator, capacity_tokens, max_model_len)
    else:
        raise ValueError(f"allocator={allocator!r} is unknown: use one of {ALLOCATORS}")
    waiting = deque(_Seq(rid, p + o, p) for rid, p, o in _lengths(trace))
    for s in waiting:
        if s.final_len > max_model_len:
            raise ValueError(f"request {s.request_id!r} has {s.final_len} tokens (prompt + output), more than "
                             f"max_model_len={max_model_len}")
    running: list[_Seq] = []
    rows, admitted, step = [], 0, 0
    while waiting or running:
        preempted = []
        i = 0
        while i < len(running):
            seq = running[i]
            while not alloc.grow(seq):  # paged only: make room by preempting the newest request
                victim = running.pop()
                alloc.free(victim)
                victim.num_computed_tokens = 0
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                seq.length += 1
                seq.num_computed_tokens = seq.length
                i += 1
        waiting.extendleft(reversed(sorted(preempted, key=lambda s: s.order)))
        while not preempted and waiting and len(running) < max_num_seqs and alloc.admit(waiting[0]):
            seq = waiting.popleft()
            seq.length += 1
            seq.num_computed_tokens, seq.order = seq.length, admitted
            admitted += 1
            running.append(seq)
        if not running:
            raise RuntimeError(f"request {waiting[0].request_id!r} does not fit the empty pool")
        parts = alloc.parts(running)
        free = alloc.num_free_slots
        head = waiting[0] if waiting else None
        blocked = head is not None and not preempted and len(running) < max_num_seqs
        external = free if blocked and alloc.could_fit_in_total(head) else 0
        done = [s for s in running if s.length >= s.final_len]
        rows.append({"allocator": allocator, "label": LABELS[allocator], "step": step,
                     "num_running": len(running), "num_waiting": len(waiting), "num_preemptions": len(preempted),
                     "num_finished": len(done), **parts, "external_fragmentation": external,
                     "free": free - external, "capacity_tokens": alloc.capacity})
        for s in done:
            alloc.free(s)
        running = [s for s in running if s.length < s.final_len]
        step += 1
    paged_groups = allocator == "paged" and group_windows
    groups = [group_blocks_column(g) for g in range(len(group_windows))] if paged_groups else []
    return pd.DataFrame(rows, columns=TIMELINE_COLUMNS + groups)


def summarize(timeline: pd.DataFrame, steps: str = "loaded") -> pd.DataFrame:
    """One row per allocator from `replay_allocator` timelines (concatenated).

    steps: "loaded" averages over the steps in which a request was waiting (the pool, not the trace,
    held requests back: the serving regime the vLLM paper measured; the shares are NaN for an allocator
    whose pool never filled), "all" over every step including the final drain.
    ``<part>_share``: the part's slot-steps over capacity x steps, i.e. the time-averaged share of the KV
    pool (the five shares sum to 1); waste_share = reservation + internal + external fragmentation.
    batch_size_mean: requests running at once over the same steps; batch_size_max: over all steps.
    num_steps: steps to finish the trace; num_loaded_steps: steps with a waiting request;
    output_tokens_per_step: tokens generated over the whole trace (one per running request per step) / num_steps.
    """
    if steps not in ("loaded", "all"):
        raise ValueError(f"steps={steps!r} is not allowed: use 'loaded' or 'all'")
    rows = []
    for allocator, g in timeline.groupby("allocator", sort=False):
        w = g[g["num_waiting"] > 0] if steps == "loaded" else g
        slot_steps = float(w["capacity_tokens"].sum())
        shares = {f"{p}_share": float(w[p].sum()) / slot_steps if slot_steps else math.nan for p in PARTS}
        rows.append({
            "allocator": allocator, "label": g["label"].iloc[0], "capacity_tokens": int(g["capacity_tokens"].iloc[0]),
            "steps": steps, "num_steps": len(g), "num_loaded_steps": int((g["num_waiting"] > 0).sum()), **shares,
            "waste_share": shares["reservation_share"] + shares["internal_fragmentation_share"]
            + shares["external_fragmentation_share"],
            "batch_size_mean": float(w["num_running"].mean()) if len(w) else math.nan,
            "batch_size_max": int(g["num_running"].max()),
            "num_preemptions": int(g["num_preemptions"].sum()),
            "output_tokens_per_step": float(g["num_running"].sum()) / len(g),
        })
    return pd.DataFrame(rows)


class AllocatorComparisonResult(NamedTuple):
    summary: pd.DataFrame    # one row per allocator (see summarize)
    timeline: pd.DataFrame   # one row per allocator and step (see replay_allocator)


def compare_allocators(trace, capacity_tokens: int, max_model_len: int, block_size: int = 16,
                       max_num_seqs: int = 256, allocators=ALLOCATORS,
                       steps: str = "loaded", group_windows=None) -> AllocatorComparisonResult:
    """The same trace through each allocator in ``allocators`` with the same pool of capacity_tokens slots;
    ``steps`` as in `summarize`; group_windows: a sliding-window model's KV cache groups (the paged allocator
    keeps per-group tables, see the module docstring)."""
    timeline = pd.concat([replay_allocator(trace, a, capacity_tokens, max_model_len, block_size, max_num_seqs,
                                           group_windows) for a in allocators], ignore_index=True)
    return AllocatorComparisonResult(summarize(timeline, steps), timeline)


# ----- HF transformers' own continuous batching (a second throughput baseline of `bench`) ---------------------------
HF_CB_LABEL = "HF continuous batching"


def _hf_cb_manager(hf_model, generation_config, num_blocks: int | None, max_batch_tokens: int | None):
    """transformers' ContinuousBatchingManager for hf_model, across the 5.x versions: the batching config goes in
    its own argument where init_continuous_batching takes one (5.1x+), else inside the GenerationConfig."""
    import inspect

    from transformers.generation import configuration_utils as cu
    kwargs = {}
    cbc_cls = getattr(cu, "ContinuousBatchingConfig", None)
    if cbc_cls is not None:
        fields = inspect.signature(cbc_cls).parameters
        cb_args = {k: v for k, v in (("num_blocks", num_blocks), ("max_batch_tokens", max_batch_tokens),
                                     # the same attention family as the model was loaded with (sdpa), not a
                                     # flash-attention switch that depends on what else is installed
                                     ("auto_switch_to_flash", False)) if v is not None and k in fields}
        cbc = cbc_cls(**cb_args)
        if "continuous_batching_config" in inspect.signature(hf_model.init_continuous_batching).parameters:
            kwargs["continuous_batching_config"] = cbc
        else:
            generation_config.continuous_batching_config = cbc
    else:  # older: the sizes are GenerationConfig attributes
        generation_config.num_blocks, generation_config.max_batch_tokens = num_blocks, max_batch_tokens
    try:
        return hf_model.init_continuous_batching(generation_config=generation_config, **kwargs)
    except ValueError as exc:  # a transformers that wants a paged attention name for continuous batching
        if "implementation" not in str(exc):
            raise
        for name in ("paged|sdpa", "sdpa_paged"):
            try:
                hf_model.set_attn_implementation(name)
                return hf_model.init_continuous_batching(generation_config=generation_config, **kwargs)
            except (ValueError, KeyError):
                continue
        raise


def run_hf_cb_baseline(hf_model, workload, num_blocks: int | None = None, max_batch_tokens: int | None = None,
                       timeout_s: float = 1800.0):
    """HF transformers' continuous batching (`init_continuous_batching`: its paged KV cache, scheduler and
    attention) over the workload's requests, all queued at once as in the engine's offline run: greedy, each
    request exactly its max_tokens output tokens (EOS disabled, per-request max_new_tokens).

    num_blocks / max_batch_tokens: the KV pool (blocks of transformers' page size) and per-step token budget;
    None lets transformers size them from the free GPU memory. Returns a workbench.bench.RunResult whose
    requests frame also holds each request's generated token ids (column token_ids); the wall time runs from
    the first request queued to the last finished (a CUDA-graph warm-up, where transformers has one, runs
    before). Raises RuntimeError if a request fails or the manager stops before every request finished.
    """
    import torch
    from transformers import GenerationConfig

    from .bench import RunResult
    from .metrics import throughput

    reqs = list(workload.requests)
    if num_blocks is None and not next(hf_model.parameters()).is_cuda:
        # transformers sizes its pool from the memory of a GPU; on the CPU, enough for every request at once
        # (pages of 16 tokens or more), and a budget of 2048 tokens per step
        num_blocks = sum(-(-(r.prompt_len + r.max_tokens) // 16) for r in reqs) + 1
        max_batch_tokens = max_batch_tokens or 2048
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_new_tokens=max((r.max_tokens for r in reqs), default=1))
    manager = _hf_cb_manager(hf_model, gen, num_blocks, max_batch_tokens)
    if next(hf_model.parameters()).is_cuda and hasattr(manager, "warmup"):
        manager.warmup()
    results, finished_at = {}, {}
    with torch.inference_mode():
        manager.start()
        try:
            start = time.perf_counter()
            for r in reqs:
                manager.add_request(list(r.prompt_token_ids), request_id=r.request_id, max_new_tokens=r.max_tokens)
            deadline = start + timeout_s
            while len(results) < len(reqs) and time.perf_counter() < deadline:
                out = manager.get_result(timeout=1)
                if out is None:
                    if not manager.is_running():
                        break
                    continue
                if out.is_finished():
                    if out.error is not None:
                        raise RuntimeError(f"HF continuous batching failed request {out.request_id}: {out.error}")
                    results[out.request_id] = out
                    finished_at[out.request_id] = time.perf_counter()
            duration = time.perf_counter() - start
        finally:
            manager.stop(block=True)
            if hasattr(manager, "destroy"):
                manager.destroy()  # its KV cache goes back to the device now (the engine is sized after this)
    missing = [r.request_id for r in reqs if r.request_id not in results]
    if missing:
        raise RuntimeError(f"HF continuous batching finished {len(results)} of {len(reqs)} requests "
                           f"(first missing: {missing[0]})")
    rows = [{"request_id": r.request_id, "num_prompt_tokens": r.prompt_len,
             "num_output_tokens": len(results[r.request_id].generated_tokens),
             "e2e": finished_at[r.request_id] - start, "token_ids": list(results[r.request_id].generated_tokens)}
            for r in reqs]
    frame = pd.DataFrame(rows)
    summary = throughput(frame, duration)
    summary["num_length_mismatches"] = int(sum(row["num_output_tokens"] != r.max_tokens for row, r in zip(rows, reqs)))
    return RunResult(HF_CB_LABEL, frame, duration, summary=summary)
