"""Per-request block tables on top of the block pool, with prefix-cache lookups."""
from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, KVBlock
from .hashing import BlockHash, hash_request_blocks


@dataclass(frozen=True)
class KVCacheSnapshot:
    """A read-only copy of the pool's state, for counters and pictures (taking one changes nothing).

    blocks: (ref_count, cached) per physical block, cached meaning it holds a prefix-cache hash; block_tables:
    {request_id: block ids in sequence order}. Both are empty unless asked for (snapshot(detail=True)).
    num_cached_blocks: free blocks that still hold a reusable prefix.
    """

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    blocks: tuple = ()
    block_tables: dict = None


class KVCacheManager:
    """Owns every request's block table and the counters of the prefix cache.

    Invariants:
    - req_to_blocks[r] covers at least r.num_computed_tokens token slots, in sequence order; the
      blocks of r hold one reference each (shared prefix blocks are referenced once per owner).
    - The first num_cached_blocks[r] blocks of r are registered in the prefix cache under
      req_to_hashes[r]; only full blocks whose tokens are all scheduled are registered.
    - A request with no entry owns no block: free() returns every reference.
    - Blocks registered since the last commit() are provisional: the step that writes their KV has not
      completed. (A request admitted in the same step may hit them: every layer writes the step's KV
      before its attention reads it.) rollback() un-registers them, so a failed or interrupted step
      never leaves a half-written block in the prefix cache; commit() makes them permanent.
    prefix_cache_queries / prefix_cache_hits count tokens, as vLLM does: every admission looks up
    the request's whole token sequence (queries) and reuses the longest run of cached full blocks
    (hits), capped one token short of the end so that the last token is computed and gives logits.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}  # the block table, as ints, for the runner
        self.req_to_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Provisional registrations (see the class docstring): (block, its hash), and each touched
        # request's num_cached_blocks before the first of them.
        self._uncommitted: list[tuple[KVBlock, BlockHash]] = []
        self._cached_before: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return self.pool.num_cached_free_blocks

    def snapshot(self, detail: bool = False) -> KVCacheSnapshot:
        """The pool's counters, and with detail=True every block's (ref_count, cached) and every block table."""
        pool = self.pool
        return KVCacheSnapshot(
            num_blocks=pool.num_blocks, num_free_blocks=pool.num_free_blocks, num_used_blocks=self.num_used_blocks,
            num_cached_blocks=pool.num_cached_free_blocks, prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            blocks=tuple((b.ref_count, b.block_hash is not None) for b in pool.blocks) if detail else (),
            block_tables={rid: tuple(ids) for rid, ids in self.req_to_block_ids.items()} if detail else {})

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks matching the request's tokens, and their token count."""
        if not self.enable_prefix_caching:
            return [], 0
        tokens = request.all_token_ids
        hashes = hash_request_blocks(tokens, self.block_size, self.req_to_hashes.setdefault(request.request_id, []))
        # Leave at least one token to compute: the step must produce logits for the last token.
        max_blocks = (len(tokens) - 1) // self.block_size
        hits = []
        for h in hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None) -> bool:
        """Make room for num_new_tokens more tokens of `request` (after any new prefix hits).

        new_computed_blocks is given when a waiting request is admitted (possibly empty): those blocks
        become the start of its table and the lookup is counted. Returns False, changing nothing,
        when the free queue cannot supply the blocks.
        """
        admitting = new_computed_blocks is not None
        blocks = self.req_to_blocks.get(request.request_id, [])
        if not admitting:
            # Fast path of a decode step: the new token fits the last block already held.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * self.block_size:
                if total // self.block_size > self.num_cached_blocks.get(request.request_id, 0):
                    self._cache_full_blocks(request, total)
                return True
        new_computed_blocks = new_computed_blocks or []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(blocks) - len(new_computed_blocks)
        # Hits on free cached blocks come out of the free queue too.
        free_hits = sum(1 for b in new_computed_blocks if b.ref_count == 0)
        if max(needed, 0) + free_hits > self.pool.num_free_blocks:
            return False
        if admitting:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        self.pool.touch(new_computed_blocks)
        new_blocks = new_computed_blocks + (self.pool.get_new_blocks(needed) if needed > 0 else [])
        self.req_to_blocks.setdefault(request.request_id, []).extend(new_blocks)
        self.req_to_block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new_blocks)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _cache_full_blocks(self, request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = num_tokens // self.block_size
        start = self.num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        hashes = hash_request_blocks(request.all_token_ids, self.block_size, self.req_to_hashes.setdefault(rid, []))
        blocks = self.req_to_blocks[rid]
        self._cached_before.setdefault(rid, start)
        for i in range(start, num_full):
            if self.pool.cache_block(blocks[i], hashes[i]):
                self._uncommitted.append((blocks[i], hashes[i]))
        self.num_cached_blocks[rid] = num_full

    def allocate_draft_slots(self, request, num_tokens: int, keep_free: int = 0) -> bool:
        """Speculative decoding: make the request's table cover num_tokens slots, the tail of which will hold
        the K/V of proposed tokens that verification may reject. Registers nothing in the prefix cache (the
        tokens are not the request's yet). Returns False, changing nothing, unless the pool can supply the
        blocks and still keep keep_free blocks free."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        needed = self.blocks_needed(num_tokens) - len(blocks)
        if needed <= 0:
            return True
        if needed + keep_free > self.pool.num_free_blocks:
            return False
        new_blocks = self.pool.get_new_blocks(needed)
        self.req_to_blocks.setdefault(request.request_id, []).extend(new_blocks)
        self.req_to_block_ids.setdefault(request.request_id, []).extend(b.block_id for b in new_blocks)
        return True

    def trim(self, request, num_tokens: int) -> None:
        """Free the request's blocks past the first blocks_needed(num_tokens) (the slots of rejected proposals),
        tail first. Never touches a block registered in the prefix cache (those hold accepted tokens only)."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        keep = max(self.blocks_needed(num_tokens), self.num_cached_blocks.get(rid, 0))
        if blocks is None or len(blocks) <= keep:
            return
        extra = blocks[keep:]
        del blocks[keep:]
        del self.req_to_block_ids[rid][keep:]
        self.pool.free_blocks(reversed(extra))

    def commit(self) -> None:
        """The step that wrote the provisional blocks completed: they are now regular prefix-cache entries."""
        self._uncommitted.clear()
        self._cached_before.clear()

    def rollback(self) -> None:
        """The step failed: un-register every provisional block (its KV may be half-written), and make
        each request re-register its blocks from its last committed count."""
        for block, block_hash in reversed(self._uncommitted):
            self.pool.uncache_block(block, block_hash)
        for rid, count in self._cached_before.items():
            if rid in self.num_cached_blocks:
                self.num_cached_blocks[rid] = count
        self.commit()

    def free(self, request) -> None:
        """Return every block of the request to the pool, tail first (so prefixes are evicted last)."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, [])
        self.req_to_block_ids.pop(rid, None)
        self.pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(rid, None)

    def forget(self, request) -> None:
        """Drop the request's memoised block hashes (it has finished for good)."""
        self.req_to_hashes.pop(request.request_id, None)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (physical block ids in sequence order); do not modify."""
        return self.req_to_block_ids.get(request_id, [])
