"""Per-request block tables on top of the block pool, with prefix-cache lookups."""
from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, KVBlock
from .hashing import ROOT_HASH, BlockHash, hash_request_blocks


@dataclass(frozen=True)
class KVCacheSnapshot:
    """A read-only copy of the pool's state, for counters and pictures (taking one changes nothing).

    blocks: (ref_count, cached) per physical block, cached meaning it holds a prefix-cache hash; block_tables:
    {request_id: block ids in sequence order}. Both are empty unless asked for (snapshot(detail=True)).
    num_cached_blocks: free blocks that still hold a reusable prefix. num_shared_blocks: blocks held by two or
    more sequences; num_saved_blocks: block-table entries minus used blocks (what sharing saves).
    """

    num_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    blocks: tuple = ()
    block_tables: dict = None
    num_shared_blocks: int = 0
    num_saved_blocks: int = 0
    # KV cache groups (engine/kv/groups.py; empty with one group): blocks in use per group, each physical
    # block's group (-1: free) and every request's table per group, the latter two with detail=True only.
    group_used_blocks: tuple = ()
    block_groups: tuple = ()
    group_block_tables: dict = None


class _RequestId:
    """Stands in for a request where only its id is known (KVCacheManager.free_unowned)."""

    def __init__(self, request_id: str):
        self.request_id = request_id


def pool_snapshot(manager, tables: dict, detail: bool, **extra) -> KVCacheSnapshot:
    """A KVCacheSnapshot of a manager over one pool (KVCacheManager, HybridKVCacheManager): its counters and, with
    detail=True, every block's (ref_count, cached) and the block tables `tables` (request_id -> block ids)."""
    pool = manager.pool
    return KVCacheSnapshot(
        num_blocks=pool.num_blocks, num_free_blocks=pool.num_free_blocks, num_used_blocks=manager.num_used_blocks,
        num_cached_blocks=pool.num_cached_free_blocks, prefix_cache_queries=manager.prefix_cache_queries,
        prefix_cache_hits=manager.prefix_cache_hits, num_shared_blocks=manager.num_shared_blocks,
        num_saved_blocks=manager.num_saved_blocks,
        blocks=pool.blocks.states() if detail else (),
        block_tables={rid: tuple(ids) for rid, ids in tables.items()} if detail else {}, **extra)


class PoolCounters:
    """The block counters of a manager over one BlockPool (self.pool): KVCacheManager's and the hybrid one's."""

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


class KVCacheManager(PoolCounters):
    """Owns every request's block table and the counters of the prefix cache.

    Invariants:
    - req_to_blocks[r] covers at least r.num_computed_tokens token slots, in sequence order; the
      blocks of r hold one reference each (shared prefix blocks are referenced once per owner).
    - The first num_cached_blocks[r] blocks of r are registered in the prefix cache under
      req_to_hashes[r]; only full blocks whose tokens are all scheduled and known are registered (under async
      scheduling a token sampled by a step in flight is a placeholder until the host reads it).
    - A request with no entry owns no block: free() returns every reference.
    - Blocks registered since the last commit() are provisional: the step that writes their KV has not
      completed. (A request admitted in the same step may hit them: every layer writes the step's KV
      before its attention reads it.) rollback() un-registers them, so a failed or interrupted step
      never leaves a half-written block in the prefix cache; commit() makes them permanent.
      Copies-on-write since the last commit() are provisional too: rollback() drops the queued copies and
      gives a request that still holds a copy its shared block back (the copy's KV was never written).
    - Sharing beyond prefixes (parallel sampling, beam search): fork() gives a sequence the blocks of
      another by reference. A sequence never writes into a block it shares: allocate_slots first gives
      it a private copy of that block (copy-on-write), queued in pending_copies for the runner to copy
      on the device before the step's forward pass. Only the partly filled last block can be shared and
      written, so a copy is at most one block per sequence and step; only sequences in `forked` (those
      that took part in a fork and hold blocks) can hold one.
    prefix_cache_queries / prefix_cache_hits count tokens, as vLLM does: every admission looks up
    the request's whole token sequence (queries) and reuses the longest run of cached full blocks
    (hits), capped one token short of the end so that the last token is computed and gives logits.
    """

    num_groups = 1  # KV cache groups (engine/kv/hybrid.py manages several)

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, pool: BlockPool | None = None,
                 hash_root: BlockHash = ROOT_HASH):
        """pool: share another manager's pool (one KV cache group of several, engine/kv/hybrid.py), whose
        hashes then chain from their own hash_root so that groups never hit each other's blocks."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching) if pool is None else pool
        self.hash_root = hash_root
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
        self.pending_copies: list[tuple[int, int]] = []  # (source block id, copy's block id), for the runner
        self.copied_requests: list[str] = []  # requests whose block table changed in place (by a copy)
        self.num_cow_copies = 0
        self.forked: set[str] = set()  # sequences that took part in a fork and still hold blocks
        # Copies-on-write since the last commit: (request_id, table index, shared block, copy).
        self._uncommitted_copies: list[tuple[str, int, KVBlock, KVBlock]] = []

    def snapshot(self, detail: bool = False) -> KVCacheSnapshot:
        """The pool's counters, and with detail=True every block's (ref_count, cached) and every block table."""
        return pool_snapshot(self, self.req_to_block_ids, detail)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request) -> tuple[list[KVBlock], int]:
        """The longest run of cached full blocks matching the request's tokens, and their token count."""
        if not self.enable_prefix_caching:
            return [], 0
        tokens = request.all_token_ids
        hashes = hash_request_blocks(tokens, self.block_size, self.req_to_hashes.setdefault(request.request_id, []),
                                     self.hash_root)
        # Leave at least one token to compute: the step must produce logits for the last token (or, for
        # the root of a sequence group, the token at its fork point).
        max_blocks = ((request.fork_point or len(tokens)) - 1) // self.block_size
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
        # Only a forked sequence can write into a shared block (prefix-cache hits are full blocks); the empty
        # set costs the decode steps of everything else next to nothing.
        if not admitting and self.forked and request.request_id in self.forked \
                and self._writes_shared_block(request, blocks):
            if not self._copy_on_write(request, num_new_tokens):
                return False
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

    def num_blocks_to_allocate(self, request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None
                               ) -> int:
        """Free blocks allocate_slots(request, num_new_tokens, new_computed_blocks) would take from the pool (new
        blocks, free prefix-cache hits and a copy-on-write), without changing anything."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, ())
        n = 0
        if new_computed_blocks is None:
            hits = ()
            if self.forked and rid in self.forked and self._writes_shared_block(request, blocks):
                n = 1
        else:
            hits = new_computed_blocks
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        n += max(self.blocks_needed(num_computed + num_new_tokens) - len(blocks) - len(hits), 0)
        return n + sum(1 for b in hits if b.ref_count == 0)

    def group_used_blocks(self) -> tuple[int, ...]:
        """Blocks in use per KV cache group: () with one group (num_used_blocks says it all)."""
        return ()

    def wasted_slots(self, requests) -> int:
        """Token slots the requests' block tables hold beyond their computed tokens (internal fragmentation's
        numerator; a block shared by k tables counts k times). Called every step with the running requests."""
        ids, bs = self.req_to_block_ids, self.block_size
        computed = sum([r.num_computed_tokens for r in requests])
        if len(ids) == len(requests):
            # Every given request holds a table and no one else does: sum them all without a lookup per request.
            return sum(map(len, ids.values())) * bs - computed
        return sum([len(ids.get(r.request_id, ())) for r in requests]) * bs - computed

    def _cache_full_blocks(self, request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        tokens = request.all_token_ids
        if getattr(request, "num_output_placeholders", 0):
            # Async scheduling: a block is registered once its tokens are known (a later step's allocation
            # catches up); the placeholders at the end of all_token_ids are never hashed.
            num_tokens = min(num_tokens, request.num_known_tokens)
            tokens = tokens[:num_tokens - num_tokens % self.block_size]
        num_full = num_tokens // self.block_size
        start = self.num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        hashes = hash_request_blocks(tokens, self.block_size, self.req_to_hashes.setdefault(rid, []),
                                     self.hash_root)
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
        self._uncommitted_copies.clear()

    def rollback(self) -> None:
        """The step failed: un-register every provisional block (its KV may be half-written), and make
        each request re-register its blocks from its last committed count."""
        for block, block_hash in reversed(self._uncommitted):
            self.pool.uncache_block(block, block_hash)
        for rid, count in self._cached_before.items():
            if rid in self.num_cached_blocks:
                self.num_cached_blocks[rid] = count
        self.take_pending_copies()
        # A request the failed step scheduled was freed by Scheduler.rollback (its copy with it); one still holding
        # its copy was interrupted between its allocation and the forward pass, before anything else was freed or
        # allocated, so the shared block is still held by its other owners and unchanged.
        for rid, i, shared, copy in reversed(self._uncommitted_copies):
            blocks = self.req_to_blocks.get(rid)
            if blocks is not None and i < len(blocks) and blocks[i] is copy:
                self.pool.touch([shared])
                blocks[i] = shared
                self.req_to_block_ids[rid][i] = shared.block_id
                self.pool.free_blocks([copy])
        self.commit()

    def drop_provisional(self, request) -> None:
        """Un-register the request's provisional blocks: it leaves the current step before the forward pass
        (a sequence group preempted as a whole), so the step will not write their KV. Call before free()."""
        mine = {id(b) for b in self.req_to_blocks.get(request.request_id, ())}
        if not mine or not self._uncommitted:
            return
        keep = []
        for block, block_hash in self._uncommitted:
            if id(block) in mine:
                self.pool.uncache_block(block, block_hash)
            else:
                keep.append((block, block_hash))
        self._uncommitted = keep

    def free_unowned(self, owners: set[str]) -> list[str]:
        """Free the block tables of every request not in `owners` (after a rolled-back step: whatever an
        interrupted fork left behind); returns their ids."""
        orphans = [rid for rid in self.req_to_blocks if rid not in owners]
        for rid in orphans:
            self.free(_RequestId(rid))
            self.req_to_hashes.pop(rid, None)
        return orphans

    def free(self, request) -> None:
        """Return every block of the request to the pool, tail first (so prefixes are evicted last)."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, [])
        self.req_to_block_ids.pop(rid, None)
        self.forked.discard(rid)
        self.pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(rid, None)

    def forget(self, request) -> None:
        """Drop the request's memoised block hashes (it has finished for good)."""
        self.req_to_hashes.pop(request.request_id, None)

    # ----- sharing between the sequences of one request (parallel sampling, beam search) ------------
    def fork(self, parent, child, num_tokens: int) -> None:
        """Give `child` (which holds no block) the blocks of `parent` that hold its first num_tokens tokens,
        by reference: nothing is copied until one of them writes into a shared block. The two must agree
        on those tokens; child.num_computed_tokens is the caller's to set (to num_tokens)."""
        cid = child.request_id
        if self.req_to_blocks.get(cid):
            raise RuntimeError(f"fork into {cid!r}, which already holds KV blocks")
        blocks = self.req_to_blocks.get(parent.request_id, [])[:self.blocks_needed(num_tokens)]
        if len(blocks) * self.block_size < num_tokens:
            raise RuntimeError(f"fork of {num_tokens} tokens from {parent.request_id!r}, which holds "
                               f"{len(blocks)} blocks")
        self.pool.touch(blocks)
        self.forked.update((parent.request_id, cid))
        self.req_to_blocks[cid] = list(blocks)
        self.req_to_block_ids[cid] = [b.block_id for b in blocks]
        full = num_tokens // self.block_size
        self.req_to_hashes[cid] = list(self.req_to_hashes.get(parent.request_id, [])[:full])
        self.num_cached_blocks[cid] = min(self.num_cached_blocks.get(parent.request_id, 0), full)

    def _writes_shared_block(self, request, blocks: list[KVBlock]) -> bool:
        i = request.num_computed_tokens // self.block_size
        return i < len(blocks) and blocks[i].ref_count > 1

    def _copy_on_write(self, request, num_new_tokens: int) -> bool:
        """Replace the shared block the request writes next by a private copy (queued for the runner);
        False, changing nothing, when the pool cannot also supply the blocks the step then needs."""
        rid = request.request_id
        blocks = self.req_to_blocks[rid]
        more = max(self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(blocks), 0)
        if 1 + more > self.pool.num_free_blocks:
            return False
        i = request.num_computed_tokens // self.block_size
        shared, [copy] = blocks[i], self.pool.get_new_blocks(1)
        blocks[i] = copy
        self.req_to_block_ids[rid][i] = copy.block_id
        self.pool.free_blocks([shared])  # still held by the other sequences: never reaches 0 here
        self.pending_copies.append((shared.block_id, copy.block_id))
        self._uncommitted_copies.append((rid, i, shared, copy))
        self.copied_requests.append(rid)
        self.num_cow_copies += 1
        return True

    def take_pending_copies(self) -> tuple[list[tuple[int, int]], list[str]]:
        """The block copies queued since the last call, and the requests whose tables they changed."""
        copies, rids = self.pending_copies, self.copied_requests
        self.pending_copies, self.copied_requests = [], []
        return copies, rids

    @property
    def num_shared_blocks(self) -> int:
        """Blocks held by two or more sequences (forks and prefix-cache hits)."""
        return self.pool.num_shared_blocks

    @property
    def num_saved_blocks(self) -> int:
        """Blocks that sharing saves: the sequences' block tables hold this many more entries than there
        are blocks in use."""
        return self.pool.num_block_refs - self.num_used_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (physical block ids in sequence order); do not modify."""
        return self.req_to_block_ids.get(request_id, [])
