"""Prompt lookup (n-gram) proposals: no extra model, the request's own tokens are the draft."""
from __future__ import annotations

import numpy as np

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
    (min_n <= n <= max_n) of `tokens`; [] if none recurs. Vectorised (numpy): a few array operations per
    request, whatever the sequence length."""
    L = len(tokens)
    if L < 2:
        return []
    arr = np.asarray(tokens)
    # Earlier positions ending an occurrence of the suffix n-gram: they must at least repeat the last token.
    ends = np.flatnonzero(arr[:-1] == arr[-1])
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        cand = ends[ends >= n - 1]
        for j in range(1, n):
            if not len(cand):
                break
            cand = cand[arr[cand - j] == arr[L - 1 - j]]
        if len(cand):
            end = int(cand[-1])
            return tokens[end + 1:end + 1 + k]
    return []
