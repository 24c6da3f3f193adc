"""Contiguous allocators (Orca Max / Pow2 / Oracle) and the paged replay against numbers worked out by hand.

The hand trace: a pool of 16 token slots, max_model_len 10, requests (prompt, output) in FCFS order
A (2, 1) -> 3 tokens, B (5, 4) -> 9, C (3, 1) -> 4, D (4, 2) -> 6. The admitting step adds a request's
first output token; a request leaves after the step that reaches its final length.
"""
import math

import pandas as pd
import pytest

from workbench import baselines
from workbench.baselines import compare_allocators, replay_allocator, reserved_slots, summarize
from workbench.workloads import sharegpt_like

TRACE = [(2, 1), (5, 4), (3, 1), (4, 2)]
PARTS = ["tokens", "reservation", "internal_fragmentation", "external_fragmentation", "free"]


def parts(timeline):
    return [tuple(r) for r in timeline[PARTS].itertuples(index=False)]


def test_reserved_slots():
    assert [reserved_slots("pow2", n, 2048) for n in (1, 5, 8, 9, 1500)] == [1, 8, 8, 16, 2048]
    assert reserved_slots("pow2", 9, 10) == 10  # capped at max_model_len
    assert reserved_slots("max", 3, 10) == 10 and reserved_slots("oracle", 3, 10) == 3
    with pytest.raises(ValueError, match="max_model_len"):
        reserved_slots("oracle", 11, 10)
    with pytest.raises(ValueError, match="policy"):
        reserved_slots("buddy", 3, 10)


def test_oracle_by_hand_has_external_fragmentation():
    # Step 0: A [0,3) B [3,12) C [12,16); D (6) waits with nothing free. A and C leave: holes of 3 and 4.
    # Steps 1-3: 7 slots free in total, but no hole holds D's 6: all 7 are external fragmentation.
    t = replay_allocator(TRACE, "oracle", capacity_tokens=16, max_model_len=10)
    assert parts(t) == [(13, 3, 0, 0, 0), (7, 2, 0, 7, 0), (8, 1, 0, 7, 0), (9, 0, 0, 7, 0),
                        (5, 1, 0, 0, 10), (6, 0, 0, 0, 10)]
    assert t["num_running"].tolist() == [3, 1, 1, 1, 1, 1]
    s = summarize(t).iloc[0]
    assert s["num_steps"] == 6 and s["num_loaded_steps"] == 4
    assert s["tokens_share"] == pytest.approx(37 / 64) and s["reservation_share"] == pytest.approx(6 / 64)
    assert s["external_fragmentation_share"] == pytest.approx(21 / 64) and s["free_share"] == 0
    assert s["waste_share"] == pytest.approx(27 / 64) and s["batch_size_mean"] == pytest.approx(1.5)
    assert s["batch_size_max"] == 3 and s["output_tokens_per_step"] == pytest.approx(8 / 6)


def test_max_by_hand_holds_one_request_at_a_time():
    t = replay_allocator(TRACE, "max", capacity_tokens=16, max_model_len=10)
    assert parts(t) == [(3, 0, 7, 0, 6), (6, 3, 1, 0, 6), (7, 2, 1, 0, 6), (8, 1, 1, 0, 6), (9, 0, 1, 0, 6),
                        (4, 0, 6, 0, 6), (5, 1, 4, 0, 6), (6, 0, 4, 0, 6)]
    s = summarize(t).iloc[0]
    assert s["num_loaded_steps"] == 6
    assert s["tokens_share"] == pytest.approx(37 / 96) and s["internal_fragmentation_share"] == pytest.approx(17 / 96)
    assert s["free_share"] == pytest.approx(36 / 96) and s["batch_size_max"] == 1
    assert summarize(t, steps="all").iloc[0]["tokens_share"] == pytest.approx(48 / 128)


def test_pow2_by_hand():
    # A 3 -> 4 slots, B 9 -> 16 capped to 10, C 4 -> 4, D 6 -> 8.
    t = replay_allocator(TRACE, "pow2", capacity_tokens=16, max_model_len=10)
    assert parts(t) == [(9, 3, 2, 0, 2), (11, 2, 1, 0, 2), (8, 1, 1, 0, 6), (9, 0, 1, 0, 6), (5, 1, 2, 0, 8),
                        (6, 0, 2, 0, 8)]


def test_paged_by_hand():
    # 4 blocks of 4. Step 0: A 3 tokens in 1 block, B 6 in 2, C 4 in 1 (3 empty slots); D finds no block.
    # Step 1: A and C have left, D takes their 2 blocks. Step 3: B's 9th token takes a third block.
    t = replay_allocator(TRACE, "paged", capacity_tokens=16, max_model_len=10, block_size=4)
    assert parts(t) == [(13, 0, 3, 0, 0), (12, 0, 4, 0, 0), (14, 0, 2, 0, 0), (9, 0, 3, 0, 4)]
    assert t["num_preemptions"].sum() == 0 and t["num_running"].tolist() == [3, 2, 2, 1]


def test_paged_preempts_the_newest_request_and_recomputes_it():
    # 2 blocks of 4, two requests of 3 + 4 tokens: both admitted (1 block each); A's 5th token needs B's block.
    t = replay_allocator([(3, 4), (3, 4)], "paged", capacity_tokens=8, max_model_len=8, block_size=4)
    assert t["num_preemptions"].tolist() == [0, 1, 0, 0, 0, 0, 0]
    assert t["num_running"].tolist() == [2, 1, 1, 1, 1, 1, 1]
    assert t["tokens"].tolist() == [8, 5, 6, 7, 5, 6, 7]  # B comes back with its 4 tokens plus a new one
    assert (t["tokens"] + t["internal_fragmentation"] + t["free"] == 8).all()


def test_parts_always_sum_to_the_pool_and_paged_wastes_least():
    w = sharegpt_like(num_requests=60, vocab_size=50, seed=3)
    r = compare_allocators(w, capacity_tokens=4096, max_model_len=2048, block_size=16)
    t = r.timeline
    assert (t[PARTS].sum(axis=1) == t["capacity_tokens"]).all() and (t[PARTS] >= 0).all().all()
    s = r.summary.set_index("allocator")
    assert list(s.index) == list(baselines.ALLOCATORS)
    assert s[[c + "_share" for c in PARTS]].sum(axis=1).tolist() == pytest.approx([1.0] * 4)
    assert s.loc["paged", "reservation_share"] == 0 and s.loc["paged", "external_fragmentation_share"] == 0
    assert s.loc["oracle", "internal_fragmentation_share"] == 0
    # The order the vLLM paper reports: more of the memory holds tokens, more requests run at once.
    tokens = s["tokens_share"]
    assert tokens["max"] < tokens["pow2"] < tokens["oracle"] < tokens["paged"]
    assert s.loc["max", "batch_size_mean"] < s.loc["oracle", "batch_size_mean"] < s.loc["paged", "batch_size_mean"]
    # Every request finishes: tokens generated == sum of output lengths, whatever the allocator.
    out = sum(r.max_tokens for r in w)
    assert (s["output_tokens_per_step"] * s["num_steps"]).round().tolist() == [out] * 4


def test_errors_name_what_to_change():
    with pytest.raises(ValueError, match="capacity_tokens"):
        replay_allocator(TRACE, "max", capacity_tokens=8, max_model_len=10)
    with pytest.raises(ValueError, match="capacity_tokens"):
        replay_allocator(TRACE, "paged", capacity_tokens=8, max_model_len=10, block_size=4)
    with pytest.raises(ValueError, match="max_model_len"):
        replay_allocator([(8, 4)], "oracle", capacity_tokens=16, max_model_len=10)
    with pytest.raises(ValueError, match="unknown"):
        replay_allocator(TRACE, "buddy", capacity_tokens=16, max_model_len=10)
    with pytest.raises(ValueError, match="steps"):
        summarize(replay_allocator(TRACE, "oracle", 16, 10), steps="some")


def test_a_pool_that_never_fills_has_no_loaded_steps():
    s = compare_allocators([(2, 2)], capacity_tokens=64, max_model_len=8, block_size=4).summary
    assert (s["num_loaded_steps"] == 0).all() and s["tokens_share"].map(math.isnan).all()
    assert summarize(compare_allocators([(2, 2)], 64, 8, 4).timeline, "all")["tokens_share"].notna().all()
    assert isinstance(s, pd.DataFrame)


def test_paged_with_sliding_window_groups_by_hand():
    """A sliding-window model (groups: one full, one of window 16), 256 token slots of every layer = 32 blocks of
    one group, requests (60, 40). Step 0 admits 4 (61 tokens: 4 blocks in each group = 8 blocks each). Step 1:
    position 61's window starts at 46, in block 2, so each sliding table frees blocks 0 and 1 (16 -> 8), and a 5th
    request fits (20 / 12 blocks). The one-table paged pool (16 blocks) holds 4 throughout step 1."""
    trace = [(60, 40)] * 8
    t = replay_allocator(trace, "paged", capacity_tokens=256, max_model_len=128, group_windows=(None, 16))
    plain = replay_allocator(trace, "paged", capacity_tokens=256, max_model_len=128)
    assert list(t["group0_blocks"][:2]) == [16, 20] and list(t["group1_blocks"][:2]) == [16, 12]
    assert list(t["num_running"][:2]) == [4, 5] and list(plain["num_running"][:2]) == [4, 4]
    assert "group0_blocks" not in plain.columns
    assert (t[PARTS].sum(axis=1) - 256).abs().max() < 1e-9  # the parts tile the pool (slots of every layer)
    # Step 1 by hand, in slots of every layer: 5 requests, 20 x 16 + 12 x 16 group slots = 256 (no free slot);
    # tokens 4 x 62 + 61 in the full group, 4 x (62 - 32) + 61 in the sliding one.
    row = t.iloc[1]
    assert row["tokens"] == (4 * 62 + 61 + 4 * 30 + 61) / 2 and row["free"] == 0
    s = compare_allocators(trace, 256, 128, allocators=("paged",), group_windows=(None, 16)).summary
    assert s["batch_size_max"].iloc[0] > summarize(plain)["batch_size_max"].iloc[0]
