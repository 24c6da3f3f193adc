"""Synthetic acceptance, for performance studies on random weights only.

Random-weight targets have no draft that agrees with them, so the speed-up of speculation cannot be measured
against acceptance rate the honest way. SyntheticProposer offers, for each position, the target's own next
token recorded from a previous run of the same trace (or, without a recording, a placeholder token), and
decides acceptance itself: position i is accepted with probability `acceptance` while every earlier one was
(Draft.forced). The target still scores all k + 1 positions and the engine still emits the accepted tokens and
one more, so the work per step is exactly that of a real draft with this per-token acceptance rate; the tokens
are not checked against the target, so outputs may drift from the target's after a numerical divergence.
Every result from this mode must say "synthetic acceptance".

An optional draft proposer (a DraftModelProposer) is run as well, its proposals discarded, to charge the draft
model's cost to the step; it is told that it proposed the study's tokens (DraftModelProposer.assume), so that
in the next step it feeds what a draft with this acceptance would feed (one or two tokens), not the tail of
a rejection of its own random proposals.
"""
from __future__ import annotations

import random

from .proposal import Draft


class SyntheticProposer:
    """recorded: {tuple(prompt token ids): output token ids of a non-speculative run}; acceptance in [0, 1]."""

    name = "synthetic"

    def __init__(self, acceptance: float, recorded: dict | None = None, seed: int = 0, cost_proposer=None):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance={acceptance!r} is not allowed: acceptance must be in [0, 1]")
        self.acceptance = float(acceptance)
        self.recorded = recorded or {}
        self.rng = random.Random(seed)
        self.cost_proposer = cost_proposer

    def record(self, outputs) -> None:
        """Record the token ids of RequestOutputs (a non-speculative run of the trace), keyed by prompt."""
        self.recorded.update({tuple(o.prompt_token_ids): list(o.token_ids) for o in outputs})

    def propose(self, requests: list, limits: list[int]) -> dict[str, Draft]:
        if self.cost_proposer is not None:
            self.cost_proposer.propose(requests, limits)
        out = {}
        for req, k in zip(requests, limits):
            done = len(req.output_token_ids)
            future = self.recorded.get(tuple(req.prompt_token_ids), [])[done:done + k]
            # Without a recording (or past its end): repeat the last token, a placeholder of the right shape.
            tokens = list(future) + [req.all_token_ids[-1]] * (k - len(future))
            forced, ok = [], True
            for _ in range(k):
                ok = ok and self.rng.random() < self.acceptance
                forced.append(ok)
            out[req.request_id] = Draft(tokens, forced=forced)
            if self.cost_proposer is not None:
                self.cost_proposer.assume(req.request_id, tokens)
        return out

    def release(self, request_id: str) -> None:
        if self.cost_proposer is not None:
            self.cost_proposer.release(request_id)
