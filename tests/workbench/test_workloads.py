import json
import os

import numpy as np
import pytest

from workbench.workloads import (WORKLOADS, RequestSpec, Workload, load_workload, make_workload,
                                 workload_defaults)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_trace_other_seed_other_trace(name):
    a = make_workload(name, num_requests=16, vocab_size=512, seed=3)
    b = make_workload(name, num_requests=16, vocab_size=512, seed=3)
    c = make_workload(name, num_requests=16, vocab_size=512, seed=4)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert all(0 <= t < 512 for r in a for t in r.prompt_token_ids)
    assert len(a) == 16


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_defaults_are_documented_and_unknown_parameters_refused(name):
    d = workload_defaults(name)
    assert {"num_requests", "vocab_size", "seed", "arrival", "request_rate", "concurrency"} <= set(d)
    with pytest.raises(ValueError, match="no parameter"):
        make_workload(name, not_a_parameter=1)


def test_unknown_workload_names_the_choices():
    with pytest.raises(ValueError, match="shared-prefix"):
        make_workload("nope")


def test_sharegpt_like_length_statistics():
    w = make_workload("sharegpt-like", num_requests=20000, vocab_size=1000, seed=0)
    p = np.array([r.prompt_len for r in w])
    o = np.array([r.max_tokens for r in w])
    assert abs(p.mean() - 161) / 161 < 0.03 and abs(o.mean() - 338) / 338 < 0.03
    assert p.max() == 1024 and o.max() == 1024 and p.min() >= 4 and o.min() >= 4
    assert np.median(p) < p.mean()  # right-skewed, like the real distribution
    assert "SYNTHETIC" in WORKLOADS["sharegpt-like"].__doc__


def test_fixed_lengths():
    w = make_workload("fixed", num_requests=5, prompt_len=7, output_len=3, vocab_size=50)
    assert [(r.prompt_len, r.max_tokens, r.arrival_time) for r in w] == [(7, 3, 0.0)] * 5


def test_shared_prefix_shares_exactly_the_system_prompts():
    w = make_workload("shared-prefix", num_requests=12, num_prefixes=3, prefix_len=40, suffix_len=8,
                      vocab_size=512)
    reqs = list(w)
    for i, r in enumerate(reqs):
        assert r.prompt_len == 48
        assert r.prompt_token_ids[:40] == reqs[i % 3].prompt_token_ids[:40]
    assert len({r.prompt_token_ids[:40] for r in reqs}) == 3
    assert len({r.prompt_token_ids[40:] for r in reqs}) == 12


def test_multi_turn_prompt_is_the_previous_conversation():
    w = make_workload("multi-turn", num_requests=6, num_turns=3, first_prompt_len=20, turn_len=5,
                      output_len=4, think_time=0.5, vocab_size=512)
    by_id = {r.request_id: r for r in w}
    assert len(w) == 6
    for r in w:
        if r.depends_on is None:
            assert r.prompt_len == 20 and r.arrival_time == 0
        else:
            parent = by_id[r.depends_on]
            assert r.prompt_token_ids[:parent.prompt_len] == parent.prompt_token_ids
            assert r.prompt_len == parent.prompt_len + 4 + 5
            assert r.arrival_time == 0.5  # think time after the parent finished


def test_poisson_arrivals_have_the_requested_rate():
    w = make_workload("fixed", num_requests=4000, prompt_len=4, output_len=2, vocab_size=100,
                      arrival="poisson", request_rate=20.0, seed=1)
    t = np.array([r.arrival_time for r in w])
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 20) < 0.05 / 20 * 2
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: coefficient of variation 1
    # The arrival process does not change the token content.
    offline = make_workload("fixed", num_requests=4000, prompt_len=4, output_len=2, vocab_size=100, seed=1)
    assert [r.prompt_token_ids for r in w] == [r.prompt_token_ids for r in offline]
    assert all(r.arrival_time == 0 for r in offline)


def test_arrival_validation():
    with pytest.raises(ValueError, match="request_rate"):
        make_workload("fixed", num_requests=2, arrival="poisson")
    with pytest.raises(ValueError, match="concurrency"):
        make_workload("fixed", num_requests=2, arrival="concurrency")
    with pytest.raises(ValueError, match="arrival"):
        make_workload("fixed", num_requests=2, arrival="bursty")
    w = make_workload("fixed", num_requests=3, vocab_size=10, arrival="concurrency", concurrency=2)
    assert w.concurrency == 2 and w.with_arrival("poisson", request_rate=1.0).arrival == "poisson"


def test_jsonl_round_trip(tmp_path):
    w = make_workload("multi-turn", num_requests=8, vocab_size=512, arrival="poisson", request_rate=3.0, seed=2)
    path = w.save_jsonl(str(tmp_path / "w.jsonl"))
    back = load_workload(path)
    assert back.requests == w.requests
    assert (back.arrival, back.request_rate, back.fingerprint()) == ("poisson", 3.0, w.fingerprint())
    assert back.name == "multi-turn"


def test_bring_your_own_lengths(tmp_path):
    path = tmp_path / "prod.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        {"prompt_len": 10, "output_len": 5, "arrival_time": 0.0},
        {"prompt_len": 3, "max_tokens": 2, "arrival_time": 1.5, "request_id": "x"}]) + "\n")
    w = load_workload(str(path), vocab_size=100, seed=0)
    assert [(r.prompt_len, r.max_tokens, r.arrival_time) for r in w] == [(10, 5, 0.0), (3, 2, 1.5)]
    assert w.requests[1].request_id == "x" and load_workload(str(path), vocab_size=100, seed=0) == w
    with pytest.raises(ValueError, match="vocab_size"):
        load_workload(str(path))
    with pytest.raises(ValueError, match="outside"):
        path.write_text(json.dumps({"prompt_token_ids": [5, 500], "max_tokens": 1}) + "\n")
        load_workload(str(path), vocab_size=100)


def test_shipped_sample_trace_loads():
    path = os.path.join(ROOT, "data", "workloads", "example-lengths.jsonl")
    w = make_workload(path, vocab_size=512)
    assert len(w) >= 10 and w.max_token_id < 512
    assert make_workload("example-lengths.jsonl", vocab_size=512, num_requests=4).requests == w.requests[:4]


def test_request_and_workload_validation():
    with pytest.raises(ValueError, match="empty"):
        RequestSpec("a", [], 1)
    with pytest.raises(ValueError, match="max_tokens"):
        RequestSpec("a", [1], 0)
    with pytest.raises(ValueError, match="unique"):
        Workload("w", (RequestSpec("a", [1], 1), RequestSpec("a", [1], 1)))
    with pytest.raises(ValueError, match="depends on"):
        Workload("w", (RequestSpec("a", [1], 1, depends_on="b"),))


def test_summary_counts_tokens():
    s = make_workload("fixed", num_requests=4, prompt_len=10, output_len=3, vocab_size=20).summary()
    assert (s["num_requests"], s["total_prompt_tokens"], s["total_output_tokens"]) == (4, 40, 12)
