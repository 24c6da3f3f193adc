"""Block sharing beyond prefixes (fork, copy-on-write) in the KV cache manager: property tests.

A simulated device (block id -> token per slot) receives every write and every queued block copy, so
the tests check what a sequence would read, not only the bookkeeping.
"""
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv import KVCacheManager
from engine.request import Request
from engine.sampling import SamplingParams


class Device:
    """What the KV tensors would hold: the token whose K/V sits in each slot."""

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.slots: dict[int, list] = {}

    def run(self, req: Request, num_new: int) -> None:
        """Apply the queued copies, then write the request's next num_new tokens, as a step would."""
        copies, _ = self.kv.take_pending_copies()
        for src, dst in copies:
            self.slots[dst] = list(self.slots.get(src, [None] * self.kv.block_size))
        table, bs = self.kv.block_ids(req.request_id), self.kv.block_size
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
            self.slots.setdefault(table[pos // bs], [None] * bs)[pos % bs] = req.all_token_ids[pos]
        req.num_computed_tokens += num_new

    def read(self, req: Request) -> list:
        table, bs = self.kv.block_ids(req.request_id), self.kv.block_size
        return [self.slots[table[p // bs]][p % bs] for p in range(req.num_computed_tokens)]


def check(kv: KVCacheManager, device: Device, live: list[Request]) -> None:
    pool = kv.pool
    holders = Counter(b.block_id for blocks in kv.req_to_blocks.values() for b in blocks)
    free_ids = {b.block_id for b in pool.free_queue}
    for block in pool.blocks:
        # every block's ref count is the number of sequences whose tables hold it
        assert block.ref_count == holders.get(block.block_id, 0), block
        assert (block.ref_count == 0) == (block.block_id in free_ids)
    assert pool.num_block_refs == sum(holders.values())
    assert kv.num_shared_blocks == sum(1 for n in holders.values() if n > 1)
    assert kv.num_saved_blocks == sum(holders.values()) - len(holders)
    assert kv.num_used_blocks == len(holders)
    assert kv.req_to_block_ids == {r: [b.block_id for b in bl] for r, bl in kv.req_to_blocks.items()}
    assert kv.forked <= set(kv.req_to_blocks)
    for req in live:
        # each sequence reads back exactly its own tokens, whatever its siblings wrote
        assert device.read(req) == req.all_token_ids[:req.num_computed_tokens], req.request_id


OPS = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free", "preempt", "resume"]),
                         st.integers(0, 7), st.integers(1, 9)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, block_size=st.sampled_from([1, 2, 4]), caching=st.booleans(), num_blocks=st.integers(8, 40))
def test_fork_append_copy_free_preempt_keep_ref_counts_and_contents(ops, block_size, caching, num_blocks):
    kv = KVCacheManager(num_blocks, block_size, caching)
    device = Device(kv)
    live: list[Request] = []     # hold blocks
    waiting: list[Request] = []  # preempted, no blocks
    ids = iter(range(10**6))

    def admit(req: Request) -> bool:
        hits, num_hit = kv.get_computed_blocks(req)
        num_new = req.num_tokens - num_hit
        if not kv.allocate_slots(req, num_new, hits):
            return False
        req.num_computed_tokens = num_hit
        device.run(req, num_new)
        live.append(req)
        return True

    for op, i, k in ops:
        if op == "new":
            # a few distinct prompts, so that prefix-cache hits happen too
            req = Request(f"r{next(ids)}", [i % 3 + 1] * k + [i], SamplingParams(max_tokens=1000), 0.0)
            if not admit(req):
                waiting.append(req)
        elif op == "resume" and waiting:
            req = waiting[i % len(waiting)]
            if admit(req):
                waiting.remove(req)
        elif live and op == "append":
            req = live[i % len(live)]
            req.all_token_ids += [(i * 7 + j) % 11 for j in range(k % 4 + 1)]
            num_new = req.num_tokens - req.num_computed_tokens
            if kv.allocate_slots(req, num_new):
                # the block written next is private to the writer
                table = kv.req_to_blocks[req.request_id]
                assert table[req.num_computed_tokens // block_size].ref_count == 1
                device.run(req, num_new)
            else:
                op = "preempt"
        elif live and op == "fork":
            parent = live[i % len(live)]
            child = Request(f"r{next(ids)}", parent.prompt_token_ids, parent.params, 0.0)
            child.all_token_ids = list(parent.all_token_ids[:parent.num_computed_tokens])
            kv.fork(parent, child, parent.num_computed_tokens)
            child.num_computed_tokens = parent.num_computed_tokens
            live.append(child)
        elif live and op == "free":
            req = live.pop(i % len(live))
            kv.free(req)
            kv.forget(req)
        if live and op == "preempt":
            req = live.pop(i % len(live)) if req not in live else live.pop(live.index(req))
            kv.free(req)
            req.num_computed_tokens = 0
            waiting.append(req)
        check(kv, device, live)

    for req in live:
        kv.free(req)
    assert kv.num_used_blocks == 0 and kv.pool.num_block_refs == 0 and kv.num_shared_blocks == 0
    assert kv.num_free_blocks == num_blocks


def test_fork_shares_the_partial_block_until_the_first_write():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    device = Device(kv)
    parent = Request("p", list(range(10)), SamplingParams(max_tokens=100), 0.0)
    assert kv.allocate_slots(parent, 9, [])  # 9 of 10 prompt tokens: blocks [4, 4, 1]
    device.run(parent, 9)
    children = []
    for c in range(3):
        child = Request(f"c{c}", parent.prompt_token_ids, parent.params, 0.0)
        kv.fork(parent, child, 9)
        child.num_computed_tokens = 9
        children.append(child)
    # 4 sequences, 3 blocks: every block held 4 times, the partial one included
    assert kv.num_used_blocks == 3 and kv.num_shared_blocks == 3 and kv.num_saved_blocks == 9
    for n, seq in enumerate([parent] + children):
        seq.all_token_ids[-1] = 100 + n  # each writes its own token into the shared partial block
        assert kv.allocate_slots(seq, 1)
        device.run(seq, 1)
    # the first three writers copied the partial block; the last one kept the original
    assert kv.num_cow_copies == 3 and kv.num_used_blocks == 2 + 4
    assert kv.block_ids("c2")[2] == kv.block_ids("p")[2] or kv.block_ids("c2")[2] not in [
        kv.block_ids(s.request_id)[2] for s in [parent] + children[:2]]
    for seq in [parent] + children:
        assert device.read(seq) == seq.all_token_ids
    for seq in [parent] + children:
        kv.free(seq)
    assert kv.num_used_blocks == 0


def test_copy_on_write_fails_cleanly_without_a_free_block():
    kv = KVCacheManager(3, 4, enable_prefix_caching=False)
    a = Request("a", list(range(6)), SamplingParams(max_tokens=100), 0.0)
    assert kv.allocate_slots(a, 6, [])
    b = Request("b", a.prompt_token_ids, a.params, 0.0)
    kv.fork(a, b, 6)
    b.num_computed_tokens = a.num_computed_tokens = 6
    other = Request("o", [1, 2, 3], SamplingParams(max_tokens=100), 0.0)
    assert kv.allocate_slots(other, 3, [])  # the pool is now full
    before = (list(kv.block_ids("b")), kv.num_free_blocks, kv.num_cow_copies)
    assert not kv.allocate_slots(b, 1)
    assert (kv.block_ids("b"), kv.num_free_blocks, kv.num_cow_copies) == before
    kv.free(other)
    assert kv.allocate_slots(b, 1) and kv.num_cow_copies == 1


def test_engine_with_groups_keeps_ref_counts_and_seats_every_step():
    """Plain requests, n > 1 and beam search together in a pool small enough to preempt: after every step
    each block's ref count is the number of tables holding it, and the seats stay within max_num_seqs."""
    import torch

    from engine import LLM, BeamSearchParams, EngineConfig
    llm = LLM.random("tiny", EngineConfig(device="cpu", block_size=4, max_model_len=64, num_gpu_blocks=24,
                                          max_num_seqs=12, max_num_batched_tokens=40))
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    for i in range(9):
        prompt = torch.randint(3, 200, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        if i % 3 == 0:
            params = BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True)
        elif i % 3 == 1:
            params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=i, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        engine.add_request(f"q{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        bm = engine.block_map()
        holders = Counter(b for table in bm["block_tables"].values() for b in table)
        assert [ref for ref, _ in bm["blocks"]] == [holders.get(i, 0) for i in range(len(bm["blocks"]))]
        sched = engine.scheduler
        assert 0 <= sched.num_reserved_seqs and len(sched.running) + sched.num_reserved_seqs <= 12
        assert len({id(r) for r in sched.running}) == len(sched.running)
    assert len(done) == 9 and all(len(o.outputs) == (1 if i % 3 == 2 else 3) for i, o in
                                  enumerate(done[f"q{j}"] for j in range(9)))
    stats = engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_preemptions > 0 and stats.num_cow_copies > 0
    assert sched.num_reserved_seqs == 0


def test_no_unwritten_block_is_ever_served_from_the_prefix_cache():
    """Groups preempted as a whole after some of their sequences were scheduled (and registered full blocks)
    in the same step: a simulated device records what each completed step wrote (block copies first); after
    every step, every block in the prefix cache holds exactly the tokens it was registered for."""
    import torch

    from engine import LLM, BeamSearchParams, EngineConfig
    llm = LLM.random("tiny", EngineConfig(device="cpu", block_size=4, max_model_len=64, num_gpu_blocks=24,
                                          max_num_seqs=12, max_num_batched_tokens=40))
    engine, kv = llm.engine, llm.engine.kv
    bs = kv.block_size
    content: dict[int, list] = {}   # block id -> token per slot, as the forward passes wrote them
    expected: dict[int, list] = {}  # block id -> the tokens it was registered in the prefix cache for
    execute, cache_full = engine.runner.execute, kv._cache_full_blocks

    def execute_and_record(sched, *args):
        result = execute(sched, *args)
        for src, dst in sched.block_copies:
            content[dst] = list(content.get(src, [None] * bs))
        for req, k in sched.scheduled:
            table = sched.block_tables[req.request_id]
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + k):
                content.setdefault(table[pos // bs], [None] * bs)[pos % bs] = req.all_token_ids[pos]
        return result

    def cache_and_record(request, num_tokens):
        cache_full(request, num_tokens)
        blocks, tokens = kv.req_to_blocks[request.request_id], request.all_token_ids
        for i in range(num_tokens // bs):
            if blocks[i].block_hash is not None and kv.pool.cached_blocks.get(blocks[i].block_hash) is blocks[i]:
                expected.setdefault(blocks[i].block_id, tokens[i * bs:(i + 1) * bs])

    engine.runner.execute, kv._cache_full_blocks = execute_and_record, cache_and_record
    orig_get_new = kv.pool.get_new_blocks

    def get_new_blocks(n):  # a block handed out again forgets what it held and what it was cached for
        out = orig_get_new(n)
        for b in out:
            content.pop(b.block_id, None)
            expected.pop(b.block_id, None)
        return out
    kv.pool.get_new_blocks = get_new_blocks
    g = torch.Generator().manual_seed(1)
    for i in range(9):
        prompt = torch.randint(3, 200, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        params = (BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True) if i % 2 else
                  SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=i, ignore_eos=True))
        engine.add_request(f"q{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
        for block in kv.pool.cached_blocks.values():
            assert content.get(block.block_id) == expected[block.block_id], block
    assert engine.stats().num_preemptions > 0


def test_rollback_reverts_a_copy_on_write_and_frees_orphans():
    """A step fails after a sequence copied a shared block on write (before the forward pass ran): rollback()
    gives it the shared block back (the copy never received its KV) and drops the queued copy; free_unowned
    returns the blocks of a fork that no queue knows of."""
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    device = Device(kv)
    parent = Request("p", list(range(10)), SamplingParams(max_tokens=100), 0.0)
    assert kv.allocate_slots(parent, 9, [])
    device.run(parent, 9)
    kv.commit()
    child = Request("c", parent.prompt_token_ids, parent.params, 0.0)
    kv.fork(parent, child, 9)
    child.num_computed_tokens = 9
    before = (list(kv.block_ids("p")), list(kv.block_ids("c")), kv.num_free_blocks)
    child.all_token_ids[-1] = 99
    assert kv.allocate_slots(child, 1) and kv.block_ids("c") != before[1] and kv.pending_copies
    kv.rollback()
    assert (kv.block_ids("p"), kv.block_ids("c"), kv.num_free_blocks) == before and not kv.pending_copies
    check(kv, device, [parent, child])
    assert kv.free_unowned({"p"}) == ["c"]
    check(kv, device, [parent])
    kv.free(parent)
    assert kv.num_used_blocks == 0 and kv.pool.num_block_refs == 0
