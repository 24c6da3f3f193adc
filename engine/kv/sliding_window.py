"""One sliding-window KV cache group's block tables, and a group's view of the shared block pool.

See engine/kv/groups.py for the groups and engine/kv/hybrid.py for the manager that drives them together.
"""
from __future__ import annotations

from .block_pool import BlockPool, KVBlock
from .kv_cache_manager import KVCacheManager

NULL_HASH = b"null block"  # never a real hash (those are 16 bytes): the null block is never registered


class GroupPoolView:
    """One KV cache group's view of the shared BlockPool: forwards everything to it, and counts the blocks this
    group holds (num_used_blocks: blocks with a reference from this group's tables; a block serves one group
    at a time, so the groups' counts add up to the pool's used blocks)."""

    def __init__(self, pool: BlockPool):
        self._pool = pool
        self.num_used_blocks = 0

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        out = self._pool.get_new_blocks(n)
        self.num_used_blocks += n
        return out

    def touch(self, blocks) -> None:
        self.num_used_blocks += sum(1 for b in blocks if b.ref_count == 0)
        self._pool.touch(blocks)

    def free_blocks(self, blocks) -> None:
        blocks = list(blocks)
        self._pool.free_blocks(blocks)
        self.num_used_blocks -= sum(1 for b in blocks if b.ref_count == 0)


class SlidingWindowGroup(KVCacheManager):
    """The block tables of one sliding-window group (window W tokens: position p attends to p - W + 1 .. p).

    Invariants, beyond KVCacheManager's:
    - Before a request computes tokens from position c on, every block of its table whose tokens all lie
      before c - W + 1 is freed and its slot holds null_block (id num_blocks, the scratch block past the pool;
      never in the free queue, never cached, never counted in ref counts). The first num_skipped[r] slots of r
      are exactly those (plus the slots a prefix hit left null): a table stays indexable by position.
    - So between steps a request holds at most cdiv(W - 1, block_size) + 1 blocks here.
    """

    def __init__(self, pool, block_size: int, enable_prefix_caching: bool, window: int, hash_root: bytes):
        super().__init__(pool.num_blocks, block_size, enable_prefix_caching, pool=pool, hash_root=hash_root)
        self.sliding_window = window
        self.null_block = KVBlock(pool.num_blocks)
        self.null_block.ref_count = 1
        self.null_block.block_hash = NULL_HASH
        self.num_skipped: dict[str, int] = {}

    def first_needed_block(self, num_computed_tokens: int) -> int:
        """Index of the first block a token at position num_computed_tokens (and every later one) reads."""
        return max(num_computed_tokens - self.sliding_window + 1, 0) // self.block_size

    def remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        """Free the blocks no token from position num_computed_tokens on can see (oldest first: the free queue
        then evicts the oldest of them first), leaving null_block in their slots."""
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        start = self.num_skipped.get(request_id, 0)
        end = min(self.first_needed_block(num_computed_tokens), len(blocks))
        if end <= start:
            return
        ids, null = self.req_to_block_ids[request_id], self.null_block
        freed = []
        for i in range(start, end):
            if blocks[i] is not null:
                freed.append(blocks[i])
                blocks[i] = null
                ids[i] = null.block_id
        self.num_skipped[request_id] = end
        self.pool.free_blocks(freed)

    def allocate_slots(self, request, num_new_tokens: int, new_computed_blocks: list[KVBlock] | None = None) -> bool:
        if new_computed_blocks is None:
            self.remove_skipped_blocks(request.request_id, request.num_computed_tokens)
            return super().allocate_slots(request, num_new_tokens)
        # Admission: the hits are null_block for the slots before the window of the first token to compute.
        rid, null = request.request_id, self.null_block
        blocks = self.req_to_blocks.get(rid, [])
        hits = new_computed_blocks
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(blocks) - len(hits)
        real = [b for b in hits if b is not null]
        if max(needed, 0) + sum(1 for b in real if b.ref_count == 0) > self.pool.num_free_blocks:
            return False
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(hits) * self.block_size
        self.pool.touch(real)
        new_blocks = list(hits) + (self.pool.get_new_blocks(needed) if needed > 0 else [])
        self.req_to_blocks.setdefault(rid, []).extend(new_blocks)
        self.req_to_block_ids.setdefault(rid, []).extend(b.block_id for b in new_blocks)
        if not blocks:
            self.num_skipped[rid] = len(hits) - len(real)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        self.remove_skipped_blocks(rid, num_computed)
        return True

    def window_hits(self, blocks: list, n: int) -> int:
        """The largest k <= n such that blocks[i] (a cached block or None) is cached for every i the window
        of position k * block_size reads (first_needed_block .. k - 1)."""
        for k in range(n, 0, -1):
            lo = self.first_needed_block(k * self.block_size)
            if all(b is not None for b in blocks[lo:k]):
                return k
        return 0

    def free(self, request) -> None:
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, [])
        self.req_to_block_ids.pop(rid, None)
        self.forked.discard(rid)
        null = self.null_block
        self.pool.free_blocks([b for b in reversed(blocks) if b is not null])
        self.num_cached_blocks.pop(rid, None)
        self.num_skipped.pop(rid, None)

    def fork(self, parent, child, num_tokens: int) -> None:
        cid, pid, null = child.request_id, parent.request_id, self.null_block
        if self.req_to_blocks.get(cid):
            raise RuntimeError(f"fork into {cid!r}, which already holds KV blocks")
        blocks = self.req_to_blocks.get(pid, [])[:self.blocks_needed(num_tokens)]
        if len(blocks) * self.block_size < num_tokens:
            raise RuntimeError(f"fork of {num_tokens} tokens from {pid!r}, which holds {len(blocks)} blocks")
        self.pool.touch([b for b in blocks if b is not null])
        self.forked.update((pid, cid))
        self.req_to_blocks[cid] = list(blocks)
        self.req_to_block_ids[cid] = [b.block_id for b in blocks]
        self.num_skipped[cid] = min(self.num_skipped.get(pid, 0), len(blocks))
        full = num_tokens // self.block_size
        self.req_to_hashes[cid] = list(self.req_to_hashes.get(pid, [])[:full])
        self.num_cached_blocks[cid] = min(self.num_cached_blocks.get(pid, 0), full)

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks of the pool the request's table holds here (null slots excluded)."""
        blocks = self.req_to_blocks.get(request_id, ())
        return sum(1 for b in blocks if b is not self.null_block)
