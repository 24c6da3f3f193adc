"""Scheduler policy against hand-worked steps (no model: tokens are fed back by hand)."""
from engine import EngineConfig, SamplingParams
from engine.kv import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler


def make(num_blocks=64, block_size=4, **cfg):
    config = EngineConfig(block_size=block_size, num_gpu_blocks=num_blocks, device="cpu", **cfg)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, config.enable_prefix_caching))


def req(rid, n, max_tokens=100, shared=False):
    """A request of n prompt tokens; distinct per request id unless shared (then all share one prefix)."""
    start = 10 if shared else 10 + 1000 * (sum(map(ord, rid)) % 97)
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)


def step(s):
    """Schedule and feed token 7 to every request whose last token was computed."""
    out = s.schedule()
    sampled = {r.request_id: 7 for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update_from_output(out, sampled, 0.0)
    return out


def test_chunked_prefill_splits_prompt_over_budget():
    s = make(max_num_batched_tokens=10)
    s.add_request(req("a", 25))
    assert [n for _, n in step(s).scheduled] == [10]
    assert [n for _, n in step(s).scheduled] == [10]
    out = step(s)
    assert [n for _, n in out.scheduled] == [5] and s.running[0].output_token_ids == [7]


def test_running_first_then_fcfs_admission_within_budget():
    s = make(max_num_batched_tokens=8)
    s.add_request(req("a", 6))
    step(s)
    s.add_request(req("b", 5))
    s.add_request(req("c", 3))
    out = step(s)
    # a decodes one token; b gets the remaining 7 of the budget, in full; c must wait its turn.
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 5), ("c", 2)]
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 7


def test_max_num_seqs_caps_running():
    s = make(max_num_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out = step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 2


def test_preempts_most_recently_admitted_and_requeues_it_first():
    # 6 blocks of 4 slots; three requests of 8 tokens take 2 blocks each, so the first decode runs out.
    s = make(num_blocks=6, block_size=4)
    for rid in "abc":
        s.add_request(req(rid, 8))
    step(s)
    assert [r.request_id for r in s.running] == ["a", "b", "c"]
    s.add_request(req("d", 2))
    out = step(s)  # a needs a 3rd block: c (the latest admitted) is preempted, which frees room for b too
    assert [r.request_id for r in out.preempted] == ["c"]
    assert [r.request_id for r, _ in out.scheduled] == ["a", "b"]  # no admission in a step that preempted
    assert [r.request_id for r in s.waiting] == ["c", "d"]
    assert s.waiting[0].status is RequestStatus.PREEMPTED and s.waiting[0].num_computed_tokens == 0
    assert s.kv.num_used_blocks == 6 and s.num_preemptions == 1


def test_every_request_finishes_under_memory_pressure():
    s = make(num_blocks=8, block_size=4, max_num_batched_tokens=16)
    reqs = [req(f"r{i}", 3 + 2 * i, max_tokens=6) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    finished = []
    for _ in range(500):
        if not s.num_unfinished:
            break
        out = s.schedule()
        sampled = {r.request_id: 7 for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
        finished += s.update_from_output(out, sampled, 0.0)
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    assert all(len(r.output_token_ids) == 6 for r in reqs)
    assert s.num_preemptions > 0 and s.kv.num_used_blocks == 0


def test_fully_cached_prompt_still_computes_last_token():
    s = make(block_size=4)
    s.add_request(req("a", 8, max_tokens=1, shared=True))
    step(s)
    s.add_request(req("b", 8, max_tokens=1, shared=True))
    out = step(s)
    assert [n for _, n in out.scheduled] == [4]  # 8 tokens: 1 cached block of 4, capped below the full prompt
    assert out.scheduled[0][0].metrics.num_cached_tokens == 4
