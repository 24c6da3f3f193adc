"""n > 1 through the server: one engine request with SamplingParams(n), the prompt's KV blocks held once, n
choices in OpenAI's shape (index 0..n-1), streamed per choice.

References: separate offline requests with the per-choice seeds (seed + i, the engine's rule for parallel
sampling), block counts computed by hand, the tokenizer's decode.
"""
from __future__ import annotations

import json

import httpx
import pytest

from engine import SamplingParams
from engine.serve.background import BackgroundServer

from serve_helpers import assert_engine_empty


P, T, N, B = 40, 20, 4, 16  # prompt tokens, max_tokens, n, block size (conftest's)
PROMPT = [(37 * i) % 3000 + 7 for i in range(P)]


def cdiv(a, b):
    return -(-a // b)


@pytest.fixture(scope="module")
def fresh(llm_factory):
    with BackgroundServer(llm_factory(), "pystdlib") as srv:
        yield srv


def post(live, path, **body):
    return httpx.post(live.url + path, json={"model": "pystdlib", **body}, timeout=120)


def metric(live, name: str) -> float:
    lines = httpx.get(live.url + "/metrics").text.splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(name + "{") or x.startswith(name + " "))


def test_n_is_one_request_whose_sequences_share_the_prompt_blocks(fresh, llm_factory):
    fresh.engine_call(lambda e: e.reset_stats())
    requests, generated = (metric(fresh, f"vllm:request_{m}") for m in ("success_total", "generation_tokens_sum"))
    r = post(fresh, "/v1/completions", prompt=PROMPT, n=N, max_tokens=T, temperature=1.0, seed=3, ignore_eos=True,
             return_token_ids=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(N))
    assert body["usage"]["prompt_tokens"] == P and body["usage"]["completion_tokens"] == N * T
    # choice i samples with seed + i: the tokens of a separate request with that seed
    ref = llm_factory().generate([PROMPT] * N, [SamplingParams(max_tokens=T, temperature=1.0, seed=3 + i,
                                                               ignore_eos=True) for i in range(N)])
    assert [c["token_ids"] for c in body["choices"]] == [o.token_ids for o in ref]
    assert [c["text"] for c in body["choices"]] == [o.text for o in ref]
    assert len({tuple(c["token_ids"]) for c in body["choices"]}) > 1
    assert_engine_empty(fresh)
    stats = fresh.engine_call(lambda e: e.stats())
    steps = stats.steps
    # By hand: one sequence computes P - 1 prompt tokens (cdiv(P - 1, B) blocks), the other N - 1 fork from it;
    # each then writes its own copy of the partly filled block ((P - 1) % B != 0). At the last step before the
    # request ends every sequence holds P + T - 2 computed tokens.
    full = (P - 1) // B
    assert stats.num_cow_copies == N - 1
    assert max(s.num_saved_blocks for s in steps) == (N - 1) * cdiv(P - 1, B)
    assert max(s.num_used_blocks for s in steps) == full + N * (cdiv(P + T - 2, B) - full)
    assert max(s.num_used_blocks + s.num_saved_blocks for s in steps) == N * cdiv(P + T - 2, B)
    # the prompt is computed once (P - 1 tokens) plus each sequence's last prompt token, not N times
    assert stats.num_prompt_tokens == P - 1 + N
    # one request for the server's metrics, with the tokens of all its choices
    assert metric(fresh, "vllm:request_success_total") == requests + 1
    assert metric(fresh, "vllm:request_generation_tokens_sum") == generated + N * T


def sse(lines):
    return [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]


def test_streaming_n_choices_each_with_its_index(fresh):
    kw = dict(prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    whole = post(fresh, "/v1/completions", **kw).json()["choices"]
    with httpx.stream("POST", fresh.url + "/v1/completions", json={"model": "pystdlib", "stream": True, **kw},
                      timeout=120) as r:
        chunks = sse(list(r.iter_lines()))
    text, finishes = {}, {}
    for c in chunks:
        (choice,) = c["choices"]
        text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = finishes.get(choice["index"], []) + [choice["finish_reason"]]
    assert [text[i] for i in range(3)] == [c["text"] for c in whole]
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}  # one finishing chunk per choice


def test_chat_streams_a_role_chunk_and_the_content_of_every_choice(fresh):
    kw = dict(messages=[{"role": "user", "content": "def add(a, b):"}], n=2, max_tokens=6, temperature=0.0)
    whole = post(fresh, "/v1/chat/completions", **kw).json()["choices"]
    assert [c["index"] for c in whole] == [0, 1] and whole[0]["message"] == whole[1]["message"]  # greedy: equal
    with httpx.stream("POST", fresh.url + "/v1/chat/completions", json={"model": "pystdlib", "stream": True, **kw},
                      timeout=120) as r:
        chunks = sse(list(r.iter_lines()))
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    content = {}
    for c in chunks:
        (choice,) = c["choices"]
        content[choice["index"]] = content.get(choice["index"], "") + choice["delta"].get("content", "")
    assert [content[0], content[1]] == [c["message"]["content"] for c in whole]


def test_a_stop_string_ends_each_choice_and_then_the_request(fresh):
    greedy = post(fresh, "/v1/completions", prompt="def fibonacci(n):\n", max_tokens=12, temperature=0.0).json()
    full = greedy["choices"][0]["text"]
    stop = full.strip()[3:6]
    cut = full[:full.index(stop)]
    r = post(fresh, "/v1/completions", prompt="def fibonacci(n):\n", n=3, max_tokens=12, temperature=0.0,
             stop=[stop]).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in r["choices"]] == [(i, cut, "stop") for i in range(3)]
    assert_engine_empty(fresh)


def test_n_larger_than_the_engine_takes_is_a_400_naming_n(llm_factory):
    with BackgroundServer(llm_factory(max_num_seqs=2), "pystdlib") as srv:
        r = post(srv, "/v1/completions", prompt=PROMPT, n=3, max_tokens=4)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "n" and "n=3 is more than max_num_seqs=2" in err["message"]
        assert post(srv, "/v1/completions", prompt=PROMPT, n=2, max_tokens=4).status_code == 200  # still serving
        assert_engine_empty(srv)


def test_a_choice_that_stops_early_finishes_its_stream_before_the_others(fresh, llm_factory):
    kw = dict(prompt=PROMPT, n=2, max_tokens=12, temperature=1.0, seed=5, return_token_ids=True)
    a, b = (c["token_ids"] for c in post(fresh, "/v1/completions", **kw).json()["choices"])
    stop = next(t for t in a[:6] if t not in b)  # choice 0 stops on it early, choice 1 never meets it
    kw["stop_token_ids"] = [stop]
    ref = llm_factory().generate([PROMPT], SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=5,
                                                          stop_token_ids=(stop,)))[0]
    assert [o.finish_reason for o in ref.outputs] == ["stop", "length"]
    whole = post(fresh, "/v1/completions", **kw).json()["choices"]
    assert [(c["token_ids"], c["finish_reason"]) for c in whole] == [(o.token_ids, o.finish_reason)
                                                                       for o in ref.outputs]
    with httpx.stream("POST", fresh.url + "/v1/completions", json={"model": "pystdlib", "stream": True, **kw},
                      timeout=120) as r:
        chunks = [c["choices"][0] for c in sse(list(r.iter_lines()))]
    ids = {0: [], 1: []}
    for c in chunks:
        ids[c["index"]] += c["token_ids"]
    assert [ids[0], ids[1]] == [o.token_ids for o in ref.outputs]
    order = [(c["index"], c["finish_reason"]) for c in chunks if c["finish_reason"]]
    assert order == [(0, "stop"), (1, "length")]
    stop_at = next(i for i, c in enumerate(chunks) if c["finish_reason"] == "stop")
    assert any(c["index"] == 1 for c in chunks[stop_at + 1:])  # choice 1 went on streaming after choice 0 ended
    assert_engine_empty(fresh)
