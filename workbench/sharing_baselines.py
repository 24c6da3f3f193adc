"""The allocator comparison's sharing cases: parallel sampling (n) and beam search (beam_width) over a trace,
the blocks the paged allocator holds with sharing against what allocators without it would need. Pure
Python like `workbench.baselines`: no model, no GPU.

Every request of the trace runs as a group of sequences through the engine's own `engine.kv.KVCacheManager`
(prefix caching off) in a pool large enough for all of them: nothing waits and nothing is preempted, so
with and without sharing the same sequences hold the same tokens at every step. All requests start at
step 0 (offline); the first step computes a request's prompt and forks the other sequences from it, then
every sequence gains one token per step until prompt + output tokens (ignore_eos: every sequence runs to
its request's final length).

- Parallel sampling (``n``): the n sequences share the prompt's blocks by reference count; the first time
  each writes into the shared, partly filled last prompt block it gets its own copy (copy-on-write).
- Beam search (``beam_width`` W): each step, each of the W next beams picks its parent among the W current
  beams uniformly at random (seeded) -- a STAND-IN for the model's choices, which decide how long the beams'
  common history is (the engine's real beam search is measured in notebook 01, section 2b, and by
  benchmarks/sharing_bench.py). A beam picked by no next beam dies and drops its blocks; one picked k times
  continues and forks k - 1 times, sharing its whole history.

Per step it counts, in blocks: ``shared``: blocks in use (the paged allocator with sharing); ``unshared``:
block-table entries (the paged allocator if every sequence had its own copy of every block);
``contiguous``: the Orca Oracle allocator's reservation, each sequence its own chunk of exactly the request's
final length, in block equivalents (slots / block_size): an allocator without sharing and without paging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from . import metrics
from .baselines import _lengths
from .schema import C

CASES = ("single", "parallel", "beam")
CASE_LABELS = {"single": "one sequence per request", "parallel": "parallel sampling, n={}",
               "beam": "beam search, width {} (random parents)"}
ALLOCATOR_LABELS = {"contiguous": "Orca (Oracle), no sharing", "unshared": "paged, no sharing",
                    "shared": "vLLM (paged, shared)"}


@dataclass
class _Seq:
    """One sequence as KVCacheManager reads it (request_id, num_tokens, num_computed_tokens)."""

    request_id: str
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_computed_tokens


class SharingComparisonResult(NamedTuple):
    summary: pd.DataFrame   # one row per case: peaks in blocks, the saving, copies on write
    timeline: pd.DataFrame  # one row per case and step: shared, unshared, contiguous blocks


def _replay(requests, case: str, width: int, block_size: int, seed: int) -> pd.DataFrame:
    from engine.kv import KVCacheManager

    rng = np.random.default_rng(seed)
    num_blocks = sum(width * -(-(p + o) // block_size) + width for _, p, o in requests)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    groups = {}  # request id -> (its live sequences, final length)
    for rid, p, o in requests:
        root = _Seq(f"{rid}#0")
        kv.allocate_slots(root, p, [])
        root.num_computed_tokens = p
        groups[rid] = ([root], p + o)
    rows, step, next_id = [], 0, {rid: 1 for rid, _, _ in requests}
    while groups:
        for rid, (seqs, final) in list(groups.items()):
            if len(seqs) < width:  # the first step: fork the other sequences from the prompt
                parents = [0] * width
            elif case == "beam":
                parents = sorted(rng.integers(0, width, width).tolist())
            else:
                parents = list(range(width))
            nxt, used = [], set()
            for i in parents:
                parent = seqs[i]
                if i in used:  # picked again: a fork that shares the parent's whole history
                    child = _Seq(f"{rid}#{next_id[rid]}", parent.num_computed_tokens)
                    next_id[rid] += 1
                    kv.fork(parent, child, parent.num_computed_tokens)
                    nxt.append(child)
                else:
                    used.add(i)
                    nxt.append(parent)
            for i, s in enumerate(seqs):
                if i not in used:  # a beam no next beam descends from
                    kv.free(s)
            for s in nxt:
                if not kv.allocate_slots(s, 1):
                    raise RuntimeError("the comparison's pool ran out of blocks")  # sized for every sequence
                s.num_computed_tokens += 1
            groups[rid] = (nxt, final)
        copies = kv.num_cow_copies
        contiguous = sum(len(seqs) * final for seqs, final in groups.values()) / block_size
        rows.append({"case": case, "step": step, "shared": kv.num_used_blocks,
                     "unshared": kv.num_used_blocks + kv.num_saved_blocks, "contiguous": contiguous,
                     C.num_cow_copies: copies})
        for rid, (seqs, final) in list(groups.items()):
            if seqs[0].num_computed_tokens >= final:
                for s in seqs:
                    kv.free(s)
                del groups[rid]
        step += 1
    return pd.DataFrame(rows)


def compare_sharing(trace, block_size: int = 16, n: int = 4, beam_width: int = 4, seed: int = 0,
                    cases=CASES) -> SharingComparisonResult:
    """The trace (a Workload, RequestSpecs or (prompt_len, output_len) pairs) as one sequence per request, as
    n parallel samples and as a beam search of beam_width beams (see the module docstring).

    summary columns: case, label, sequences (per request), contiguous / unshared / shared (peak blocks over the
    steps: Orca Oracle, paged without sharing, paged with sharing), saving = 1 - shared / unshared peak,
    num_cow_copies (blocks copied on write over the run)."""
    for name, v in ((C.n, n), (C.beam_width, beam_width), (C.block_size, block_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is not allowed: {name} must be an integer >= 1")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"cases {unknown} are unknown: use some of {CASES}")
    requests = _lengths(trace)
    widths = {"single": 1, "parallel": n, "beam": beam_width}
    timeline = pd.concat([_replay(requests, c, widths[c], block_size, seed) for c in cases], ignore_index=True)
    rows = []
    for c in cases:
        g = timeline[timeline["case"] == c]
        peak = {k: float(g[k].max()) for k in ALLOCATOR_LABELS}
        rows.append({"case": c, C.label: CASE_LABELS[c].format(widths[c]), "sequences": widths[c], **peak,
                     "saving": metrics.sharing_saving(peak["shared"], peak["unshared"]),
                     C.num_cow_copies: int(g[C.num_cow_copies].iloc[-1])})
    return SharingComparisonResult(pd.DataFrame(rows), timeline)
