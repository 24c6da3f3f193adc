"""The official openai client, unchanged, against the server: completions and chat, streaming and not.

References: the same weights run offline through LLM.generate (greedy), the tokenizer's own encode /
decode / chat template, and prompt lengths counted by hand.
"""
from __future__ import annotations

import httpx
import pytest

from engine import SamplingParams
from engine.serve.app import chat_prompt_ids

openai = pytest.importorskip("openai")

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):\n"]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(llm_factory):
    """The same checkpoint, offline: greedy outputs of PROMPTS."""
    llm = llm_factory()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    return llm, {p: o for p, o in zip(PROMPTS, outs)}


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["pystdlib"]
    assert httpx.get(live.url + "/health").status_code == 200


def test_completion_matches_offline_generate(client, reference):
    _, ref = reference
    for p in PROMPTS:
        r = client.completions.create(model="pystdlib", prompt=p, max_tokens=12, temperature=0)
        o = ref[p]
        assert r.choices[0].text == o.text
        assert r.choices[0].finish_reason == o.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(o.prompt_token_ids), len(o.token_ids))


def test_streamed_completion_is_the_same_text(client, reference):
    llm, ref = reference
    p = PROMPTS[0]
    chunks = list(client.completions.create(model="pystdlib", prompt=p, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref[p].text == llm.tokenizer.decode(ref[p].token_ids, skip_special_tokens=True)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref[p].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref[p].token_ids)


def test_batch_prompts_and_token_ids(client, reference):
    llm, ref = reference
    ids = llm.tokenizer.encode(PROMPTS[1])
    r = client.completions.create(model="pystdlib", prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [ref[PROMPTS[0]].text, ref[PROMPTS[2]].text]
    r = client.completions.create(model="pystdlib", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref[PROMPTS[1]].text


def test_n_choices_with_seed_are_reproducible(client):
    kw = dict(model="pystdlib", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # seed + index: the choices differ from each other
    streamed = {}
    for c in client.completions.create(stream=True, **kw):
        streamed[c.choices[0].index] = streamed.get(c.choices[0].index, "") + c.choices[0].text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_stop_string_cuts_the_text(client, reference):
    _, ref = reference
    p = next(p for p in PROMPTS if len(ref[p].text.strip()) > 6)
    full = ref[p].text
    stop = full.strip()[3:6]
    cut = full[:full.index(stop)]
    r = client.completions.create(model="pystdlib", prompt=p, max_tokens=12, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="pystdlib", prompt=p, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_without_template_uses_the_documented_fallback(client, reference):
    llm, _ = reference
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    expected = llm.tokenizer.encode("system: be brief\nuser: def add(a, b):\nassistant:")
    assert chat_prompt_ids(llm.tokenizer, msgs) == expected
    ref = llm.generate([expected], SamplingParams(max_tokens=8, temperature=0.0))[0]
    r = client.chat.completions.create(model="pystdlib", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(expected)
    chunks = list(client.chat.completions.create(model="pystdlib", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_through_the_tokenizers_template(llm_factory):
    from engine.serve.background import BackgroundServer

    llm = llm_factory()
    llm.tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "import json"}]
    expected = llm.tokenizer.encode("<|user|>import json\n<|assistant|>", add_special_tokens=False)
    with BackgroundServer(llm, "pystdlib") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="pystdlib", messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("kwargs, param", [
    (dict(prompt="x", max_tokens=10**9), "max_tokens"),
    (dict(prompt="x " * 600, max_tokens=4), "prompt"),
    (dict(prompt="x", temperature=-1), "temperature"),
    (dict(prompt="x", top_p=0), "top_p"),
    (dict(prompt="x", n=0), "n"),
    (dict(prompt="x", logprobs=2), "logprobs"),
    (dict(prompt=[5, 99999], max_tokens=2), "prompt"),
])
def test_bad_requests_get_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="pystdlib", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert "request '" not in e.value.body["message"]  # no engine-internal request id


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
