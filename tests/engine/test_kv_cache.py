"""Property tests of the block pool and KV cache manager, and a hand-computed prefix-sharing case."""
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv import BlockPool, KVCacheManager, hash_block_tokens
from engine.kv.hashing import ROOT_HASH
from engine.request import Request
from engine.sampling import SamplingParams


def check_invariants(kv: KVCacheManager, live):
    pool = kv.pool
    states = pool.blocks.states()  # before anything below makes the unused blocks
    assert states == tuple((b.ref_count, b.block_hash is not None) for b in pool.blocks)
    owners = Counter(b.block_id for blocks in kv.req_to_blocks.values() for b in blocks)
    free_ids = [b.block_id for b in pool.free_queue]
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    for block in pool.blocks:
        # ref counts equal owners; free queue holds exactly the unowned blocks
        assert block.ref_count == owners.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in set(free_ids))
        if block.block_hash is not None:
            assert pool.cached_blocks[block.block_hash] is block
    assert all(h == b.block_hash for h, b in pool.cached_blocks.items())
    assert pool.num_cached_free_blocks == sum(1 for b in pool.cached_blocks.values() if b.ref_count == 0)
    assert pool.num_free_blocks + sum(1 for b in pool.blocks if b.ref_count > 0) == pool.num_blocks
    # a block owned twice must be a shared, cached (full) prefix block
    for block_id, n in owners.items():
        if n > 1:
            assert pool.blocks[block_id].block_hash is not None
    assert kv.req_to_block_ids == {r: [b.block_id for b in bl] for r, bl in kv.req_to_blocks.items()}
    for req in live:
        blocks = kv.req_to_blocks.get(req.request_id, [])
        assert len(blocks) * kv.block_size >= req.num_computed_tokens
        assert len(set(b.block_id for b in blocks)) == len(blocks)


def make_request(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=1000), 0.0)


# Prompts drawn from a few shared prefixes so prefix hits are common.
PREFIXES = [[1] * 20, [2, 3] * 12, list(range(5, 40))]
actions = st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 2), st.integers(0, 30)),
                   min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(actions=actions, block_size=st.sampled_from([1, 2, 4, 8]), num_blocks=st.integers(4, 40),
       caching=st.booleans())
def test_random_operations_keep_invariants(actions, block_size, num_blocks, caching):
    kv = KVCacheManager(num_blocks, block_size, caching)
    live, counter = [], 0
    for op, which, n in actions:
        if op == "add":
            req = make_request(f"r{counter}", PREFIXES[which][: 1 + n % len(PREFIXES[which])] + [100 + counter] * (n % 5))
            counter += 1
            hits, num_hit = kv.get_computed_blocks(req)
            assert num_hit < req.num_tokens
            if kv.allocate_slots(req, req.num_tokens - num_hit, hits):
                req.num_computed_tokens = req.num_tokens
                live.append(req)
        elif op == "grow" and live:
            req = live[which % len(live)]
            new = [200 + i for i in range(n % 7 + 1)]
            req.all_token_ids.extend(new)
            if kv.allocate_slots(req, len(new)):
                req.num_computed_tokens = req.num_tokens
            else:
                del req.all_token_ids[-len(new):]
        elif op == "free" and live:
            kv.free(live.pop(which % len(live)))
        check_invariants(kv, live)
    for req in live:
        kv.free(req)
    check_invariants(kv, [])
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == num_blocks


def test_shared_prefix_hits_are_hand_computed():
    """N requests with a P-token shared prefix: every request after the first hits floor(P / B) blocks."""
    n, p, bs = 5, 50, 16
    kv = KVCacheManager(100, bs, True)
    prefix = list(range(1000, 1000 + p))
    for i in range(n):
        req = make_request(f"r{i}", prefix + [i] * 7)
        hits, num_hit = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, req.num_tokens - num_hit, hits)
        assert num_hit == (0 if i == 0 else (p // bs) * bs)
    assert kv.prefix_cache_queries == n * (p + 7)
    assert kv.prefix_cache_hits == (n - 1) * (p // bs) * bs == 4 * 48


def test_cached_free_blocks_are_reused_then_evicted_lru():
    kv = KVCacheManager(4, 2, True)
    a = make_request("a", [1, 2, 3, 4])
    assert kv.allocate_slots(a, 4, [])
    a_blocks = kv.block_ids("a")
    kv.free(a)  # both blocks stay cached while free
    assert kv.pool.num_cached_free_blocks == 2
    b = make_request("b", [1, 2, 3, 4, 5])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and [h.block_id for h in hits] == a_blocks
    assert kv.allocate_slots(b, 1, hits)
    kv.free(b)
    # Fresh unrelated requests evict the cached blocks, tail of the prefix first.
    c = make_request("c", [9, 9])
    assert kv.allocate_slots(c, 2, [])
    assert kv.pool.num_cached_free_blocks == 2  # the untouched never-cached blocks went first
    d = make_request("d", [8, 8, 8, 8, 8, 8])
    assert kv.allocate_slots(d, 6, [])
    assert kv.pool.get_cached_block(hash_block_tokens(ROOT_HASH, [1, 2])) is None


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(3, 4, True)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12, [])
    b = make_request("b", [50])
    assert not kv.allocate_slots(b, 1, [])
    assert kv.req_to_blocks.get("b") is None and kv.prefix_cache_queries == 12


def test_block_pool_free_queue_order():
    pool = BlockPool(3, True)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks([blocks[2], blocks[0], blocks[1]])
    assert [b.block_id for b in pool.free_queue] == [2, 0, 1]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [2, 0]


def test_blocks_never_handed_out_come_first_in_id_order_then_the_freed_ones():
    """The free queue's order, by hand: the unused blocks (a counter, made on first use) lead, in id order, and the
    freed blocks follow in the order they were freed."""
    pool = BlockPool(5, True)
    taken = pool.get_new_blocks(2)
    pool.free_blocks([taken[1], taken[0]])
    assert [b.block_id for b in pool.free_queue] == [2, 3, 4, 1, 0] and pool.num_free_blocks == 5
    assert [b.block_id for b in pool.get_new_blocks(4)] == [2, 3, 4, 1]
    assert pool.blocks[3] is pool.blocks[3] and pool.num_free_blocks == 1


def test_removing_an_unused_block_keeps_the_rest_in_order():
    pool = BlockPool(5, True)
    pool.free_blocks(pool.get_new_blocks(1))  # queue: 1 2 3 4 (unused), then 0
    pool.free_queue.remove(pool.blocks[2])
    assert [b.block_id for b in pool.free_queue] == [1, 3, 4, 0] and pool.num_free_blocks == 4
    assert [b.block_id for b in pool.get_new_blocks(4)] == [1, 3, 4, 0] and pool.num_free_blocks == 0


def test_a_pool_of_millions_of_blocks_makes_no_block_objects_up_front():
    """The shipped 6M model in 0.9 of an H200 has 2.6 million blocks; a pool made them all at every engine build
    (seconds, and about 100 bytes each). Now the memory stays flat until blocks are used."""
    import tracemalloc
    tracemalloc.start()
    pool = BlockPool(3_000_000, True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20 and pool.num_free_blocks == len(pool.blocks) == 3_000_000
    assert [b.block_id for b in pool.get_new_blocks(3)] == [0, 1, 2] and pool.num_free_blocks == 2_999_997


def test_registrations_are_provisional_until_commit():
    """Blocks registered since the last commit() leave the prefix cache on rollback(); committed ones stay."""
    kv = KVCacheManager(8, 2, True)
    a = make_request("a", [1, 2, 3, 4])
    assert kv.allocate_slots(a, 4, [])
    kv.commit()
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and kv.allocate_slots(b, 3, hits)
    assert len(kv.pool.cached_blocks) == 3  # a's two blocks, and b's [5, 6] provisionally
    kv.rollback()
    assert len(kv.pool.cached_blocks) == 2 and kv.num_cached_blocks["b"] == 0  # b registers again from 0
    kv.free(b)
    kv.free(a)
    check_invariants(kv, [])
    c = make_request("c", [1, 2, 3, 4, 5, 6, 7])
    assert kv.get_computed_blocks(c)[1] == 4  # the rolled-back block [5, 6] is not served
