"""What a proposer offers for one request, and the interface every proposer implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Draft:
    """Proposed next tokens of one request.

    token_ids: the k proposed tokens, in order.
    probs: [k, vocab] float32 the proposer's distribution each token was drawn from (row i: q of token_ids[i];
        the draft model's sampled drafts, on the draft's device until the runner's verification copies it to the
        host together with the target's logits), or None when the proposal is deterministic (a point mass on
        token_ids[i]: n-gram lookup, greedy drafts). The verifier needs it to keep the target distribution exact.
    forced: synthetic proposals only: forced[i] says position i is accepted (acceptance chosen by the
        study, not earned by the tokens; see synthetic.py). None for every real proposer.
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None
    forced: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def truncate(self, n: int) -> "Draft":
        """The first n proposed tokens."""
        if n >= len(self.token_ids):
            return self
        return Draft(self.token_ids[:n], None if self.probs is None else self.probs[:n],
                     None if self.forced is None else self.forced[:n])


class Proposer(Protocol):
    """Offers drafts for decoding requests, once per engine step, before the step is scheduled.

    propose(requests, limits): limits[i] >= 1 is the most tokens worth proposing for requests[i] (k, capped
    so that the verified tokens fit max_tokens and max_model_len). Returns {request_id: Draft}; a request
    may be left out (nothing to propose). A proposer must not change the requests.
    """

    name: str

    def propose(self, requests: list, limits: list[int]) -> dict[str, Draft]: ...

    def release(self, request_id: str) -> None: ...
