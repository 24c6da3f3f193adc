"""Text of one output choice as its tokens arrive: incremental detokenization and stop strings.

Incremental decoding keeps two offsets into the generated ids (vLLM's detokenizer does the same):
the text of ids[prefix:read] is already out, and the text of ids[prefix:] minus that is the new
text. Decoding a short window rather than the whole output keeps each token O(1), and starting the
window a few tokens back keeps tokenizers that drop a leading space at the start of a decode right.
A window ending in U+FFFD (a multi-byte character cut in half) waits for the next token.
"""
from __future__ import annotations


class ChoiceText:
    """The output text of one choice.

    Invariants: ``text`` is the decode of the ids seen so far (cut at the first stop string, which is
    kept only with include_stop); ``emitted <= len(text)``; while streaming, the last
    ``len(longest stop) - 1`` characters are held back, as they may be the start of a stop string.
    ``stopped`` is set when a stop string matched (the engine request must then be aborted).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, include_stop: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.cached_tokens = 0  # prompt tokens the engine served from its prefix cache (set at the end)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> None:
        """Append new token ids (ignored once a stop string matched)."""
        if self.stopped or not token_ids:
            return
        self.ids.extend(token_ids)
        if self.tokenizer is None:
            return
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0:
                self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
                self.stopped = True
                break

    def flush(self) -> None:
        """At the end of the output: decode whatever the window still holds (e.g. a cut character)."""
        if self.tokenizer is None or self.stopped or self.read_offset == len(self.ids):
            return
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text):]
        self.read_offset = len(self.ids)

    def take(self, final: bool = False) -> str:
        """The text not yet handed out (all of it when final, else minus the stop-string holdback)."""
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
