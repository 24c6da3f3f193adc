"""Speculative decoding: proposers offer k tokens per decoding request, the target verifies them in one step.

- proposal.py: Draft (what a proposer offers) and the Proposer protocol.
- ngram.py: prompt lookup (no extra model).
- draft_model.py: a second model with the same vocabulary; one KV sequence per request, its decode steps as
  CUDA-graph replays with one host sync per proposal.
- draft_sampling.py: the draft's next tokens on the device: argmax for greedy requests, drawn from its filtered
  distribution q (kept for the verifier) for requests that sample.
- synthetic.py: performance studies on random weights (acceptance chosen, not earned; labelled as such).
- verifier.py: acceptance that keeps the target distribution exactly (greedy: accept while equal).
"""
from .proposal import Draft, Proposer
from .ngram import NgramProposer
from .draft_model import DraftModelProposer
from .synthetic import SyntheticProposer
from .verifier import rejection_sample, verify_draft

__all__ = ["Draft", "Proposer", "NgramProposer", "DraftModelProposer", "SyntheticProposer", "rejection_sample",
           "verify_draft"]
