"""Beam search bookkeeping of one request, step by step, as HF transformers scores it.

The engine runs the beams as sequences that share KV blocks (engine/sequence_group.py); this file
only decides, from each live beam's top candidates, which beams live on and which hypotheses are
finished. It mirrors transformers' GenerationMixin._beam_search (early_stopping=False, the default)
for one prompt, in float32 tensors so that scores round as HF's do:

- every step keeps the top K = max(2, 1 + number of EOS ids) x W continuations over all beams, by
  cumulative logprob; a continuation "hits" when its token is an EOS id or the sequence reaches
  max_len;
- the next W beams are the best K continuations after the hits are pushed down by 1e9;
- hits among the first W continuations become finished hypotheses, scored cumulative logprob /
  (output tokens ** length_penalty); the W best hypotheses are kept;
- the search stops when every continuation hits, or when all W hypothesis slots are filled and the
  best running beam, scored at its current length, cannot beat the worst of them.
HF starts from W copies of the prompt, all but one scored -1e9; starting from one beam is the same
search (those copies never reach the top K when the vocabulary has at least K tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9  # HF's "impossible" score


@dataclass
class BeamHypothesis:
    """A finished beam: its output tokens, HF's length-penalised score and its cumulative logprob."""

    token_ids: list[int]
    score: float
    cumulative_logprob: float
    finished_by_eos: bool


class BeamSearchState:
    """The running beams' scores and the finished hypotheses of one beam-search request.

    Invariants: scores[i] is the cumulative logprob (float32) of live beam i, in descending order
    after every step; the hypothesis slots (hyp_scores, hyp_done, hyp_tokens) hold the W best finished
    beams so far, best first, unfilled slots scored -1e9 and not done; cur_len is the length (prompt +
    output) every live beam has.
    """

    def __init__(self, beam_width: int, prompt_len: int, max_len: int, eos_token_ids: tuple[int, ...],
                 length_penalty: float):
        self.width = beam_width
        self.prompt_len = self.cur_len = prompt_len
        self.max_len = max_len
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.length_penalty = length_penalty
        self.num_candidates = max(2, 1 + len(self.eos)) * beam_width
        self.scores = torch.zeros(1)
        self.hyp_scores = torch.full((beam_width,), NEG)
        self.hyp_logprobs = torch.full((beam_width,), NEG)
        self.hyp_done = torch.zeros(beam_width, dtype=torch.bool)
        self.hyp_tokens: list[list[int]] = [[] for _ in range(beam_width)]
        self.improvable = True
        self.done = False

    def step(self, candidates: list[tuple[list[int], list[float]]], beam_tokens: list[list[int]]
             ) -> list[tuple[int, int]]:
        """One step from each live beam's top-K candidates ((token ids, logprobs), best first) and output
        tokens. Returns the next beams as (index of the parent beam, token), best first; sets done when
        the search is over (the returned beams are then of no use)."""
        w, k = self.width, self.num_candidates
        ids = torch.tensor([c[0][:k] for c in candidates], dtype=torch.long)
        logp = torch.tensor([c[1][:k] for c in candidates], dtype=torch.float32)
        acc = (self.scores[:, None] + logp).flatten()
        top_logp, flat = torch.topk(acc, k)
        parents = flat // logp.shape[1]
        tokens = ids.flatten()[flat]
        at_max = self.cur_len + 1 >= self.max_len
        hits = torch.tensor([at_max or t in self.eos for t in tokens.tolist()])
        # Running beams for the next step: the best continuations that did not finish.
        run_logp = top_logp + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_logp, w).indices
        self.scores = run_logp[nxt]
        # Finished hypotheses: hits among the first W continuations, scored with the length penalty.
        just_finished = hits.clone()
        just_finished[w:] = False
        fin = top_logp / ((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        fin += float(not self.improvable) * NEG
        fin += (~just_finished) * NEG
        merged = torch.cat((self.hyp_scores, fin))
        keep = torch.topk(merged, w).indices.tolist()
        parent_list, token_list = parents.tolist(), tokens.tolist()
        new_tokens = [beam_tokens[p] + [t] for p, t in zip(parent_list, token_list)]
        all_tokens = self.hyp_tokens + new_tokens
        self.hyp_scores = merged[keep]
        self.hyp_logprobs = torch.cat((self.hyp_logprobs, top_logp))[keep]
        self.hyp_done = torch.cat((self.hyp_done, just_finished))[keep]
        self.hyp_tokens = [all_tokens[i] for i in keep]
        self.cur_len += 1
        best_possible = self.scores[0] / ((self.cur_len - self.prompt_len) ** self.length_penalty)
        worst = torch.where(self.hyp_done, self.hyp_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_possible > worst).any())
        self.done = not self.improvable or bool(hits.all())
        return [(parent_list[i], token_list[i]) for i in nxt.tolist()]

    def hypotheses(self) -> list[BeamHypothesis]:
        """The W best finished beams, best first (call once done)."""
        return [BeamHypothesis(list(t), float(s), float(lp), bool(t) and t[-1] in self.eos)
                for t, s, lp, d in zip(self.hyp_tokens, self.hyp_scores.tolist(), self.hyp_logprobs.tolist(),
                                       self.hyp_done.tolist()) if d]
