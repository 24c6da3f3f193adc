"""Prompt lookup (n-gram) proposals: no extra model, the request's own tokens are the draft."""
from __future__ import annotations

from .proposal import Draft


class NgramProposer:
    """Finds the last n tokens (n from max_n down to min_n) earlier in the request's prompt + output, and
    proposes the tokens that followed that earlier occurrence (the most recent one). Deterministic: the
    verifier treats each proposed token as a point mass. Pays off on text that repeats its context (code,
    edits, retrieval answers); proposes nothing when no n-gram recurs. Stateless."""

    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"min_n={min_n}, max_n={max_n}: need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list, limits: list[int]) -> dict[str, Draft]:
        out = {}
        for req, k in zip(requests, limits):
            tokens = lookup(req.all_token_ids, k, self.min_n, self.max_n)
            if tokens:
                out[req.request_id] = Draft(tokens)
        return out

    def release(self, request_id: str) -> None:
        pass


def lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram
    (min_n <= n <= max_n) of `tokens`; [] if none recurs."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n:]
        # Scan right to left: the most recent occurrence is the likeliest continuation.
        for start in range(L - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []
