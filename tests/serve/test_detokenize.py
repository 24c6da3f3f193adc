"""ChoiceText against the tokenizer's own decode of the whole output, fed one token (or a few) at a time."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.serve.detokenize import ChoiceText

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


def _stream(tokenizer, ids, chunk_sizes, stop=None, include_stop=False):
    c = ChoiceText(tokenizer, stop, include_stop)
    pieces, i = [], 0
    for n in chunk_sizes:
        if i >= len(ids) or c.stopped:
            break
        c.add(ids[i:i + n])
        i += n
        pieces.append(c.take())
    c.flush()
    pieces.append(c.take(final=True))
    return c, pieces


@pytest.mark.parametrize("seed", range(5))
def test_streamed_text_is_the_decode_of_all_ids(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(4, tokenizer.vocab_size) for _ in range(60)]  # random ids: cut UTF-8 included
    sizes = [rng.choice([1, 1, 2, 3]) for _ in range(60)]
    c, pieces = _stream(tokenizer, ids, sizes)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == c.text


def test_stop_string_cuts_and_is_never_streamed(tokenizer):
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    c, pieces = _stream(tokenizer, ids, [1] * len(ids), stop=["\n\n"])
    assert "".join(pieces) == full[:full.index("\n\n")] and c.stopped
    assert all("\n\n" not in p for p in pieces)
    c, pieces = _stream(tokenizer, ids, [1] * len(ids), stop=["return"], include_stop=True)
    assert "".join(pieces) == full[:full.index("return") + len("return")]


def test_without_tokenizer_only_ids_are_kept():
    c = ChoiceText(None)
    c.add([5, 6])
    c.add([7])
    assert c.ids == [5, 6, 7] and c.take(final=True) == ""
