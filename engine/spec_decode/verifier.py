"""Verification of a draft against the target's logits at its k + 1 positions.

Greedy requests accept while the draft equals the target's argmax, then take the argmax: the output is the
non-speculative greedy output token for token. Sampled requests use rejection sampling (Leviathan et al. 2023,
Chen et al. 2023): draft token d_i, drawn from q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection the token is drawn from norm(max(0, p_i - q_i)); if all k are accepted a bonus token is
drawn from p_k. Each emitted token is then distributed exactly as p (the target after temperature, top-k and
top-p), whatever q is. A deterministic draft (q a point mass) accepts with probability p_i(d_i) and on
rejection draws from p_i with d_i removed.
"""
from __future__ import annotations

import torch

from ..sampling import Sampler, SamplingParams
from .proposal import Draft


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] float32 probabilities the non-speculative sampler draws from (CPU), for a request that samples:
    the sampler's own filter (temperature, top-k, top-p) over all n rows at once."""
    logits = logits.float().cpu()
    return Sampler().filtered_logits(logits, [params] * len(logits)).softmax(-1)


def rejection_sample(p: torch.Tensor, draft: list[int], q: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """Tokens emitted for one request: the accepted prefix of `draft` and one more (correction or bonus).

    p: [k + 1, vocab] target probabilities at the draft's positions and one past; q: [k, vocab] the draft's
    probabilities, or None for a deterministic draft. Every emitted token is distributed as p (see module).
    """
    out = []
    for i, token in enumerate(draft):
        p_tok = p[i, token].item()
        q_tok = 1.0 if q is None else q[i, token].item()
        u = torch.rand((), generator=generator).item()
        if q_tok > 0 and u * q_tok < p_tok:  # u < p/q, without dividing by zero
            out.append(token)
            continue
        if q is None:
            residual = p[i].clone()
            residual[token] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        total = residual.sum()
        # total == 0 only when p == q (or p is the point mass just rejected, probability 0): fall back to p.
        dist = residual / total if total > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator).item()))
        return out
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=generator).item()))
    return out


def verify_greedy(best: list[int], draft: list[int]) -> list[int]:
    """Accept while the draft equals the target's argmax (best: [k + 1] argmax token ids), then emit the argmax
    at the first mismatch (or past the last draft token)."""
    out = []
    for i, token in enumerate(draft):
        if token != best[i]:
            break
        out.append(token)
    out.append(best[len(out)])
    return out


def verify_forced(best: list[int], draft: Draft) -> list[int]:
    """Synthetic acceptance: accept while draft.forced says so, then emit the target's argmax there. The tokens
    are the proposer's, not checked: for performance studies only (see synthetic.py)."""
    n = 0
    while n < len(draft) and draft.forced[n]:
        n += 1
    return list(draft.token_ids[:n]) + [best[n]]


def verify_draft(logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None,
                 best: list[int] | None = None) -> list[int]:
    """Tokens one request emits in a verification step (1 to k + 1). logits: [k + 1, vocab] of the target at
    the positions of the last verified token and the k draft tokens; best: their argmax if already on the host
    (a batch reads it in one device sync)."""
    if draft.forced is not None or params.greedy:
        best = logits.float().argmax(-1).tolist() if best is None else best
        return verify_forced(best, draft) if draft.forced is not None else verify_greedy(best, draft.token_ids)
    return rejection_sample(target_probs(logits, params), draft.token_ids, draft.probs, generator)
