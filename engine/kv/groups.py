"""KV cache groups: which layers share a block table, and how many blocks a request holds in each.

A model whose layers all attend to the whole context has one group: every layer keeps every block of a
request, and the engine runs exactly as it always has. A model with sliding-window layers (Gemma 2/3,
Mistral's window) splits its layers into groups, as vLLM v1's hybrid KV cache manager does:

- Layers of one attention type (full, or one window size W) are cut, in layer order, into groups of
  G = gcd(layer counts of the types) layers. Every group has the same number of layers, so a physical
  block has one size whatever the group it serves: one pool of blocks serves every group, and physical
  KV tensor j (K and V, [num_blocks + 1, block_size, kv_heads, head_dim]) holds layer j of every group.
  gemma-3-12b (48 layers, 8 global, window 1024): 6 groups of 8 layers (1 full, 5 sliding).
- Each group has its own block table per request. A full group keeps every block; a sliding group frees
  a block once every token in it is older than the window of the oldest token still to be computed
  (position - W + 1), and its table keeps the null block (id num_blocks, the scratch block past the pool)
  in that slot so positions still index the table.

So a request of n tokens holds, between steps, cdiv(n, block_size) blocks in a full group and at most
cdiv(W - 1, block_size) + 1 in a sliding one (the window's tokens can straddle one more block than they
fill); while a chunk of C tokens is computed a sliding group holds at most cdiv(W - 1 + C, block_size) + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheGroup:
    """One group: the model layers it holds (in layer order) and their sliding window (None: full attention)."""

    layers: tuple[int, ...]
    sliding_window: int | None


def kv_cache_groups(layer_windows, num_layers: int) -> tuple[KVCacheGroup, ...]:
    """The groups of a model with the given per-layer windows (empty or all None: one full group of every
    layer). Full groups come first, then sliding ones by window size; each type's layers in layer order."""
    windows = tuple(layer_windows) if layer_windows else (None,) * num_layers
    by_type: dict = {}
    for i, w in enumerate(windows):
        by_type.setdefault(w, []).append(i)
    size = math.gcd(*(len(v) for v in by_type.values()))
    groups = []
    for w in sorted(by_type, key=lambda w: (w is not None, w or 0)):
        layers = by_type[w]
        groups.extend(KVCacheGroup(tuple(layers[i:i + size]), w) for i in range(0, len(layers), size))
    return tuple(groups)


def layer_group_slots(groups) -> list[tuple[int, int]]:
    """For each layer, (its group, its index j inside the group): layer j of every group shares KV tensor j."""
    out = {}
    for g, group in enumerate(groups):
        for j, layer in enumerate(group.layers):
            out[layer] = (g, j)
    return [out[i] for i in range(len(out))]


def needs_groups(groups) -> bool:
    """Whether the engine needs the group-aware KV manager: some group frees blocks (a sliding window)."""
    return any(g.sliding_window is not None for g in groups)


def engine_kv_groups(layer_windows, num_layers: int, tensor_parallel_size: int = 1) -> tuple[KVCacheGroup, ...] | None:
    """The groups the engine keeps for a model (the runner and the planner both ask here): None when it keeps one
    table for every layer, because no layer slides. The same at any tensor_parallel_size: a rank holds its KV heads
    of every layer, so rank 0's per-group tables (broadcast each step, engine/distributed/step_broadcast.py) serve
    every rank; the parameter stays so that callers say which engine they mean."""
    groups = kv_cache_groups(layer_windows, num_layers)
    return groups if needs_groups(groups) else None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_blocks(window: int | None, num_tokens: int, block_size: int, chunk_tokens: int = 1) -> int:
    """The most blocks one group holds for a request of num_tokens tokens computed chunk_tokens at a time
    (1: between decode steps; a prefill chunk of C tokens needs the whole chunk's blocks while it runs)."""
    full = _cdiv(num_tokens, block_size)
    if window is None:
        return full
    return min(full, _cdiv(window - 1 + min(chunk_tokens, num_tokens), block_size) + 1)


def request_blocks(windows, num_tokens: int, block_size: int, chunk_tokens: int = 1) -> int:
    """Blocks of the shared pool one request of num_tokens tokens holds at most, over every group (windows: one
    per group)."""
    return sum(group_blocks(w, num_tokens, block_size, chunk_tokens) for w in windows)


def largest_request_tokens(windows, num_blocks: int, block_size: int, chunk_tokens: int,
                           max_positions: int) -> int:
    """The longest request (tokens, at most max_positions) whose peak request_blocks fits num_blocks blocks."""
    def fits(n):
        return request_blocks(windows, n, block_size, min(chunk_tokens, n)) <= num_blocks
    if fits(max_positions):
        return max_positions
    lo, hi = 0, max_positions  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
