"""The KV cache manager of a model with sliding-window layers: one block table per KV cache group, one pool.

engine/kv/groups.py says how layers form groups. Here each group is a KVCacheManager over the one shared
BlockPool, seen through its GroupPoolView (its prefix-cache hashes chain from its own root, so a group never hits
another group's blocks); a sliding group is a SlidingWindowGroup (engine/kv/sliding_window.py), which also frees
the blocks that left its window. HybridKVCacheManager is what the scheduler sees: the KVCacheManager interface,
with every allocation checked against the pool for all groups at once (all groups get their blocks, or none does).
"""
from __future__ import annotations

from .block_pool import BlockPool
from .groups import KVCacheGroup, request_blocks
from .hashing import hash_request_blocks
from .kv_cache_manager import KVCacheManager, KVCacheSnapshot, PoolCounters, pool_snapshot
from .sliding_window import GroupPoolView, SlidingWindowGroup


class HybridKVCacheManager(PoolCounters):
    """KVCacheManager's interface over several KV cache groups sharing one BlockPool.

    Invariants:
    - groups[g] owns the block tables of group g (specs[g]); every request has a table in every group or in none,
      all of the same length (positions index every table alike).
    - An allocation (allocate_slots, allocate_draft_slots) first frees what left the sliding windows, then
      takes the blocks of every group only if the pool holds them all: a failed allocation changes no table.
    - A prefix-cache hit of n blocks is one that every group can serve: the full groups hold the first n blocks
      cached, each sliding group the blocks the window of position n * block_size reads (the older ones
      need not be cached: that request would not read them); otherwise the hit is shortened (recomputed).
    - Counters of the pool (used, free, cached, shared blocks) count blocks of every group; prefix-cache
      queries and hits count tokens once (group 0's count, every group sees the same hit).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, specs: tuple[KVCacheGroup, ...],
                 max_chunk_tokens: int):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.specs = specs
        self.windows = tuple(s.sliding_window for s in specs)
        self.max_chunk_tokens = max_chunk_tokens
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.groups: list[KVCacheManager] = []
        for g, spec in enumerate(specs):
            root = g.to_bytes(2, "little") if g else b""  # group 0 chains as a one-table engine does
            view = GroupPoolView(self.pool)
            if spec.sliding_window is None:
                self.groups.append(KVCacheManager(num_blocks, block_size, enable_prefix_caching, view, root))
            else:
                self.groups.append(SlidingWindowGroup(view, block_size, enable_prefix_caching, spec.sliding_window,
                                                      root))
        self.sliding = [m for m in self.groups if isinstance(m, SlidingWindowGroup)]
        self.num_groups = len(specs)
        # Groups of one window free the same slots at the same time (same positions, same table lengths): one of
        # each window tells whether a step frees anything.
        self._window_heads = list({m.sliding_window: m for m in self.sliding}.values())
        # request_id -> its tables (the groups' lists, which live from a request's first allocation to its free)
        self._tables: dict[str, tuple[list[int], ...]] = {}

    # ----- counters (the pool's, shared by every group) ---------------------------------------------
    @property
    def num_shared_blocks(self) -> int:
        return self.pool.num_shared_blocks

    @property
    def num_saved_blocks(self) -> int:
        return self.groups[0].num_saved_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return self.groups[0].prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.groups[0].prefix_cache_hits

    @property
    def num_cow_copies(self) -> int:
        return sum(m.num_cow_copies for m in self.groups)

    @property
    def req_to_blocks(self) -> dict:
        return self.groups[0].req_to_blocks

    def group_used_blocks(self) -> tuple[int, ...]:
        """Blocks of the pool each group's tables hold (a block shared by two tables counts once)."""
        return tuple(m.pool.num_used_blocks for m in self.groups)

    def snapshot(self, detail: bool = False) -> KVCacheSnapshot:
        pool = self.pool
        used = self.group_used_blocks()
        block_groups, group_tables = (), {}
        if detail:
            owner = [-1] * pool.num_blocks
            for g, m in enumerate(self.groups):
                for bl in m.req_to_blocks.values():
                    for b in bl:
                        if b.block_id < pool.num_blocks:
                            owner[b.block_id] = g
            block_groups = tuple(owner)
            group_tables = {rid: tuple(tuple(m.block_ids(rid)) for m in self.groups)
                            for rid in self.groups[0].req_to_block_ids}
        return pool_snapshot(self, self.groups[0].req_to_block_ids, detail, group_used_blocks=used,
                             block_groups=block_groups, group_block_tables=group_tables if detail else None)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks of the pool a request of num_tokens tokens can hold at once, over every group (a prefill chunk of
        up to max_chunk_tokens included): what the pool must hold for it to run alone."""
        return request_blocks(self.windows, num_tokens, self.block_size, min(self.max_chunk_tokens, num_tokens))

    def wasted_slots(self, requests) -> int:
        """Token slots held beyond the tokens stored, over every group (skipped slots hold no block and no token)."""
        return sum(m.wasted_slots(requests) for m in self.groups)

    # ----- allocation ----------------------------------------------------------------------------
    def get_computed_blocks(self, request) -> tuple[tuple, int]:
        """The longest prefix hit every group can serve (see the class docstring): per group, the blocks that
        start its table (null_block where a sliding group needs none), and the hit's token count."""
        if not self.enable_prefix_caching:
            return (), 0
        bs, rid, pool = self.block_size, request.request_id, self.pool
        tokens = request.all_token_ids
        n = ((request.fork_point or len(tokens)) - 1) // bs
        found = []
        for m in self.groups:
            hashes = hash_request_blocks(tokens, bs, m.req_to_hashes.setdefault(rid, []), m.hash_root)
            if isinstance(m, SlidingWindowGroup):
                found.append([pool.get_cached_block(h) for h in hashes[:n]])
            else:
                run = []
                for h in hashes[:n]:
                    block = pool.get_cached_block(h)
                    if block is None:
                        break
                    run.append(block)
                found.append(run)
        while True:  # a shorter hit may need older sliding blocks: shorten until every group agrees
            k = n
            for m, blocks in zip(self.groups, found):
                k = m.window_hits(blocks, k) if isinstance(m, SlidingWindowGroup) else min(k, len(blocks))
            if k == n:
                break
            n = k
        hits = []
        for m, blocks in zip(self.groups, found):
            if isinstance(m, SlidingWindowGroup):
                lo = m.first_needed_block(n * bs) if n else 0
                hits.append([m.null_block] * lo + blocks[lo:n])
            else:
                hits.append(blocks[:n])
        return tuple(hits), n * bs

    def allocate_slots(self, request, num_new_tokens: int, new_computed_blocks=None) -> bool:
        """As KVCacheManager.allocate_slots, for every group at once; new_computed_blocks: get_computed_blocks'
        per-group hits (empty: no hit) when a waiting request is admitted."""
        if new_computed_blocks is None:
            rid, c = request.request_id, request.num_computed_tokens
            # Fast path of a decode step (most steps): the tokens fit every table, no slot leaves a window, no
            # block fills up for the prefix cache, no copy-on-write.
            g0, bs = self.groups[0], self.block_size
            blocks = g0.req_to_blocks.get(rid)
            total = c + num_new_tokens
            if (blocks is not None and total <= len(blocks) * bs and not (g0.forked and rid in g0.forked)
                    and (not self.enable_prefix_caching or total // bs <= g0.num_cached_blocks.get(rid, 0))
                    and all(m.num_skipped.get(rid, 0) >= m.first_needed_block(c) for m in self._window_heads)):
                return True
            for m in self.sliding:
                m.remove_skipped_blocks(rid, c)
            need = sum(m.num_blocks_to_allocate(request, num_new_tokens) for m in self.groups)
            if need > self.pool.num_free_blocks:
                return False
            for m in self.groups:
                if not m.allocate_slots(request, num_new_tokens):
                    raise RuntimeError("a KV cache group failed an allocation the pool was checked for")
            return True
        hits = new_computed_blocks or ([],) * self.num_groups
        need = sum(m.num_blocks_to_allocate(request, num_new_tokens, list(h)) for m, h in zip(self.groups, hits))
        if need > self.pool.num_free_blocks:
            return False
        # Hold every group's hits first: a hit that sits free in the queue must not be handed out (evicted) as a
        # new block of an earlier group. The extra reference goes once each group has taken its own.
        held = [[b for b in h if b.block_id < self.pool.num_blocks] for h in hits]
        for m, h in zip(self.groups, held):
            m.pool.touch(h)
        for m, h in zip(self.groups, hits):
            if not m.allocate_slots(request, num_new_tokens, list(h)):
                raise RuntimeError("a KV cache group failed an allocation the pool was checked for")
        for m, h in zip(self.groups, held):
            m.pool.free_blocks(h)
        return True

    def allocate_draft_slots(self, request, num_tokens: int, keep_free: int = 0) -> bool:
        rid = request.request_id
        need = sum(max(m.blocks_needed(num_tokens) - len(m.req_to_blocks.get(rid, ())), 0) for m in self.groups)
        if need == 0:
            return True
        if need + keep_free > self.pool.num_free_blocks:
            return False
        for m in self.groups:
            m.allocate_draft_slots(request, num_tokens)
        return True

    def trim(self, request, num_tokens: int) -> None:
        for m in self.groups:
            m.trim(request, num_tokens)

    def fork(self, parent, child, num_tokens: int) -> None:
        for m in self.groups:
            m.fork(parent, child, num_tokens)

    def free(self, request) -> None:
        self._tables.pop(request.request_id, None)
        for m in reversed(self.groups):
            m.free(request)

    def forget(self, request) -> None:
        for m in self.groups:
            m.forget(request)

    def free_unowned(self, owners: set[str]) -> list[str]:
        orphans = set()
        for m in self.groups:
            orphans.update(m.free_unowned(owners))
        for rid in orphans:
            self._tables.pop(rid, None)
        return sorted(orphans)

    def commit(self) -> None:
        for m in self.groups:
            m.commit()

    def rollback(self) -> None:
        for m in self.groups:
            m.rollback()

    def drop_provisional(self, request) -> None:
        for m in self.groups:
            m.drop_provisional(request)

    def take_pending_copies(self) -> tuple[list[tuple[int, int]], list[str]]:
        copies, rids = [], []
        for m in self.groups:
            c, r = m.take_pending_copies()
            copies.extend(c)
            rids.extend(x for x in r if x not in rids)
        return copies, rids

    def block_ids(self, request_id: str) -> list[int]:
        """Group 0's block table of the request (a full group's when the model has one); do not modify."""
        return self.groups[0].block_ids(request_id)

    def group_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        """The request's block table in every group (null slots hold id num_blocks); do not modify."""
        tables = self._tables.get(request_id)
        if tables is None:
            tables = tuple(m.block_ids(request_id) for m in self.groups)
            if request_id in self.groups[0].req_to_block_ids:
                self._tables[request_id] = tables
        return tables
