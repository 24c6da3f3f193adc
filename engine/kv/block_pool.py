"""The pool of physical KV blocks: a free queue, reference counts, and the prefix-cache index."""
from __future__ import annotations

from .hashing import BlockHash


class KVBlock:
    """One physical block of block_size token slots in every layer's K and V cache."""

    __slots__ = ("block_id", "ref_count", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class Blocks:
    """A pool's KVBlock objects by block id, each made on first use. A small model on a large GPU has millions of
    blocks (the 6M shipped model: 2.6 million in 0.9 of an H200), and making them all up front took seconds at every
    engine build; a pool now starts with none made. Indexing and iterating make what they reach."""

    def __init__(self, num_blocks: int):
        self._num_blocks = num_blocks
        self._made: list[KVBlock] = []

    def __len__(self) -> int:
        return self._num_blocks

    def __getitem__(self, block_id: int) -> KVBlock:
        made = self._made
        if 0 <= block_id < len(made):
            return made[block_id]
        if not 0 <= block_id < self._num_blocks:
            raise IndexError(f"block id {block_id} is not in the pool of {self._num_blocks}")
        if block_id == len(made):  # the free queue's next unused block
            made.append(KVBlock(block_id))
        else:
            made.extend([KVBlock(i) for i in range(len(made), block_id + 1)])
        return made[block_id]

    def __iter__(self):
        return (self[i] for i in range(self._num_blocks))

    def states(self) -> tuple:
        """(ref_count, cached) of every block by id, without making the ones never used: (0, False)."""
        made = tuple((b.ref_count, b.block_hash is not None) for b in self._made)
        return made + ((0, False),) * (self._num_blocks - len(made))


class FreeBlockQueue:
    """The free blocks in eviction order, least recently freed at the front: first the blocks never handed out,
    in id order (a counter, so none of them needs to exist yet), then a doubly linked list of the freed ones.

    A plain deque cannot remove a block from its middle in O(1), which a prefix-cache hit on a free
    cached block needs; the links live in the blocks themselves, so no node objects are allocated.
    """

    def __init__(self, blocks: Blocks):
        self._blocks = blocks
        self._num_blocks = len(blocks)
        self._next_unused = 0  # blocks [_next_unused, _num_blocks) were never handed out
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._num_linked = 0

    @property
    def num_free_blocks(self) -> int:
        return self._num_blocks - self._next_unused + self._num_linked

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self._num_linked += 1

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None:  # never handed out: link the unused range first (no pool path gets here)
            self._link_unused()
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self._num_linked -= 1

    def _link_unused(self) -> None:
        """Move the never-handed-out blocks into the front of the linked list, keeping the order."""
        first = self._head.next_free
        prev = self._head
        for i in range(self._next_unused, self._num_blocks):
            block = self._blocks[i]
            prev.next_free, block.prev_free = block, prev
            prev = block
        prev.next_free, first.prev_free = first, prev
        self._num_linked += self._num_blocks - self._next_unused
        self._next_unused = self._num_blocks

    def popleft(self) -> KVBlock:
        i = self._next_unused
        if i < self._num_blocks:
            self._next_unused = i + 1
            return self._blocks[i]
        if self._num_linked == 0:
            raise RuntimeError("no free KV block left")
        block = self._head.next_free
        self.remove(block)
        return block

    def __iter__(self):
        for i in range(self._next_unused, self._num_blocks):
            yield self._blocks[i]
        b = self._head.next_free
        while b is not self._tail:
            yield b
            b = b.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """All physical KV blocks of the engine.

    Invariants:
    - A block is in the free queue if and only if its ref_count is 0.
    - ref_count equals the number of sequences whose block table holds the block; a block is held by
      more than one sequence when they share it through the prefix cache, or when a sequence was forked
      (parallel sampling, beam search: KVCacheManager.fork).
    - A block with a block_hash is the one entry for that hash in cached_blocks (hash -> block). Such a
      block keeps its hash, and its KV, while free: a later request with the same prefix takes it back
      out of the free queue. It loses its hash only when the free queue hands it out again (eviction).
    - The free queue evicts the least recently freed block first; requests free their blocks tail
      first, so a prefix outlives the private tail that followed it.
    - num_free_blocks + blocks with ref_count > 0 == num_blocks.
    - num_block_refs is the sum of all ref_counts (the blocks the sequences would hold without sharing);
      num_shared_blocks counts the blocks with ref_count >= 2.
    """

    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = Blocks(num_blocks)
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}
        # Free blocks that still hold a cached prefix (reusable until evicted), kept as a running count.
        self.num_cached_free_blocks = 0
        self.num_block_refs = 0
        self.num_shared_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks from the front of the free queue, evicting their cached hashes."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} KV blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
                self.num_cached_free_blocks -= 1
            block.ref_count = 1
            out.append(block)
        self.num_block_refs += n
        return out

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits or forked blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
                self.num_cached_free_blocks -= block.block_hash is not None
            block.ref_count += 1
            self.num_shared_blocks += block.ref_count == 2
        self.num_block_refs += len(blocks)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Register a full block under its hash, unless another block already holds that prefix; True if it
        was registered now."""
        if self.enable_caching and block.block_hash is None and block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block
            return True
        return False

    def uncache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Drop a registration made by cache_block (if the block still holds it): its KV cannot be trusted."""
        if block.block_hash == block_hash and self.cached_blocks.get(block_hash) is block:
            del self.cached_blocks[block_hash]
            block.block_hash = None
            self.num_cached_free_blocks -= block.ref_count == 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (all blocks must be free: no sequence holds one); returns how many
        blocks lost their hash. Their KV stays in memory but is never matched again."""
        if self.num_free_blocks != self.num_blocks:
            raise RuntimeError(f"{self.num_blocks - self.num_free_blocks} KV blocks are held by sequences; "
                               "the prefix cache can only be reset while no request is in the engine")
        for block in self.cached_blocks.values():
            block.block_hash = None
        dropped = len(self.cached_blocks)
        self.cached_blocks.clear()
        self.num_cached_free_blocks = 0
        return dropped

    def free_blocks(self, blocks) -> None:
        """Drop one reference from each block (in the given order); blocks reaching 0 join the free queue."""
        for block in blocks:
            block.ref_count -= 1
            self.num_block_refs -= 1
            self.num_shared_blocks -= block.ref_count == 1
            if block.ref_count == 0:
                self.free_queue.append(block)
                self.num_cached_free_blocks += block.block_hash is not None
            elif block.ref_count < 0:
                raise RuntimeError(f"{block} freed more often than it was allocated")
