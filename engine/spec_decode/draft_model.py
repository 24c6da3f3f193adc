"""Draft-model proposals: a second, smaller model with the target's vocabulary proposes k tokens greedily.

The draft runs in its own LLMEngine (its own KV cache and scheduler, on the target's device). Each step, every
decoding request of the target becomes a fresh draft request whose prompt is the target request's tokens so
far, generating k tokens greedily; the draft engine's prefix cache serves every full block it computed in
earlier steps, so only the tail since the last full block (and the k new tokens) is recomputed. This is the
simplest correct choice: the draft never holds state that a rejection would have to roll back, at the price
of re-running up to block_size - 1 tail tokens per request and step (with prefix caching off: the whole
sequence). The draft requests of one step are batched, so the draft costs about k small steps.

Greedy drafts are point masses (Draft.probs None): the verifier stays exact for sampled requests too, at a
lower acceptance than drafts sampled at the target's temperature would get.
"""
from __future__ import annotations

import itertools

from ..sampling import SamplingParams
from .proposal import Draft


class DraftModelProposer:
    """Wraps an LLMEngine over the draft model (llm.engine of an engine.LLM)."""

    name = "draft"

    def __init__(self, engine):
        self.engine = engine
        self._ids = itertools.count()
        # The draft's own step timeline (CUDA events, request events) would be overhead nobody reads; its
        # cost shows up in the target's counters as draft_time.
        engine.set_timeline(False)

    def propose(self, requests: list, limits: list[int]) -> dict[str, Draft]:
        eng = self.engine
        pending = {}
        for req, k in zip(requests, limits):
            draft_id = f"{req.request_id}#draft{next(self._ids)}"
            params = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
            try:
                ids = eng.validate_request(draft_id, req.all_token_ids, params)
            except ValueError:
                continue  # longer than the draft's context or pool: no proposal for this request
            eng.add_request(draft_id, ids, params)
            pending[draft_id] = req.request_id
        out = {}
        try:
            while len(out) < len(pending):
                for o in eng.step():
                    out[pending[o.request_id]] = Draft(list(o.token_ids))
        except BaseException:
            for draft_id, rid in pending.items():
                if rid not in out:
                    eng.abort_request(draft_id)
            raise
        return out

    def release(self, request_id: str) -> None:
        pass
