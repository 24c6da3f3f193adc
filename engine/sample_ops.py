"""Batched sampling arithmetic on the logits' device: top-k / top-p filtering of float32 rows in place, and the
exponential-race draw. No host round trip; every function works on any number of rows.

Filter rule (row by row; equal values are kept or dropped together, so no order among ties matters):
  top-k (k < vocab): keep the tokens whose value is >= the k-th largest value, counted with multiplicity.
  top-p (p < 1): among the tokens top-k kept, with their probabilities renormalized, keep token t iff the mass of
                 the tokens with a value strictly greater than t's is < p (the largest token is always kept).
The filtered distribution is softmax over the kept tokens. `_filter_top_k_top_p` in engine.sampling applies this
same rule to one row, so speculative decoding's verifier draws from exactly the sampler's distribution.

Draw: token = argmax(x - log q), q ~ Exponential(1) per token (the exponential race, i.e. argmax(probs / q), in log
space so nothing underflows): P(token = t) = softmax(x)_t. Filtered tokens (-inf) are never drawn.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")
TINY = torch.finfo(torch.float32).tiny  # q is clamped here: exponential_ may return 0, whose log is -inf
# Rows with top-p whose top_k is at most this take the top-k path (torch.topk of k values, top-p over those);
# other top-p rows sort their whole row.
TOPK_PATH_MAX_K = 1024
# Rows with top-p and no top-k first look for their nucleus among their largest TOP_P_PROBE_K values (it is
# usually there: a trained model's next-token distribution is peaked), and sort only when it is not.
TOP_P_PROBE_K = 1024


def apply_top_k_top_p(x: torch.Tensor, k: int, top_p: torch.Tensor | None) -> None:
    """Filter x [rows, vocab] float32 in place: top-k with the same k for every row (1 <= k < vocab), then top-p
    per row (top_p: [rows, 1] float32 or None; rows with top_p >= 1 skip it). torch.topk of k values per row, a
    tie count over the row, and the top-p arithmetic over k values: temporaries of about rows x vocab bytes (the
    tie mask) plus O(rows x k)."""
    vals = torch.topk(x, k, dim=-1).values  # [rows, k], descending
    kth = vals[:, -1:]
    if top_p is not None:
        # Tokens equal to kth beyond the k returned are kept by top-k (ties) and count in the normalizer.
        extra = (x >= kth).sum(-1, keepdim=True) - k
        _apply_top_p(x, vals, top_p, extra_at_min=extra, floor=kth)
    else:
        x.masked_fill_(x < kth, NEG_INF)


def apply_top_p_sorted(x: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Filter x [rows, vocab] float32 in place: top-k per row (k: [rows, 1] int64 in [1, vocab]; vocab means off),
    then top-p per row (top_p: [rows, 1]). Sorts each whole row: temporaries of about 12 x rows x vocab bytes for
    the sort's values and indices (the indices are dropped at once) plus what torch.sort uses inside, then two
    rows x vocab float32 buffers."""
    vals = torch.sort(x, dim=-1, descending=True).values
    kth = vals.gather(1, k - 1)
    vals.masked_fill_(vals < kth, NEG_INF)
    _apply_top_p(x, vals, top_p, extra_at_min=None, floor=kth)


def apply_top_p_probed(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p alone (no top-k) on x [rows, vocab] float32 in place, for the rows whose nucleus lies within their
    TOP_P_PROBE_K largest values (torch.topk of those, and the row's total mass by a cumulative sum): returns
    done [rows, 1] bool; rows not done are left as they were (apply_top_p_sorted them, with top_p 1 for the done
    rows). Whether a row is done depends on that row alone. Temporaries: two rows x vocab float32 buffers."""
    vals = torch.topk(x, TOP_P_PROBE_K, dim=-1).values
    top = vals[:, :1]
    # The total by a cumulative sum rather than a sum: a scan adds a row in the same order whatever the batch.
    total = (x - top).exp_().cumsum(-1)[:, -1:].clone()
    cum = (vals - top).exp_().cumsum(-1)
    bound = top_p * total
    done = cum[:, -1:] >= bound  # the mass of the probe reaches the bound: no token outside it is kept
    keep = 1 + (cum[:, :-1] < bound).sum(-1, keepdim=True)
    cutoff = torch.where(done & (top_p < 1), vals.gather(1, keep - 1), NEG_INF)
    x.masked_fill_(x < cutoff, NEG_INF)
    return done | (top_p >= 1)


def _apply_top_p(x: torch.Tensor, vals: torch.Tensor, top_p: torch.Tensor, extra_at_min, floor) -> None:
    """Mask x below each row's top-p cutoff (see the module), given vals: each row's largest values in descending
    order (all the tokens top-k keeps, or the first k of them with `extra_at_min` more equal to the last), -inf past
    the kept ones. Rows with top_p >= 1 are cut at `floor` (their top-k threshold) only."""
    top = vals[:, :1]
    cum = (vals - top).exp_().cumsum(-1)  # inclusive cumulative unnormalized mass, in descending order
    total = cum[:, -1:]
    if extra_at_min is not None:
        total = total + extra_at_min * (vals[:, -1:] - top).exp()
    # Position j is kept iff the mass before it is < p x total: one plus the count of j < last with cum_j < p x total.
    keep = 1 + (cum[:, :-1] < top_p * total).sum(-1, keepdim=True)
    del cum
    cutoff = torch.where(top_p < 1, vals.gather(1, keep - 1), floor)
    x.masked_fill_(x < cutoff, NEG_INF)


def fill_exponential(q: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """q filled in place with Exponential(1) samples from `generator`: exponential_ on an accelerator; on the CPU
    -log(1 - U) from uniform_ (six times faster there than exponential_, same distribution)."""
    if q.device.type == "cpu":
        return q.uniform_(generator=generator).neg_().log1p_().neg_()
    return q.exponential_(generator=generator)


def exponential_race(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """argmax(x - log q) per row, with q [rows, vocab] Exponential(1) samples (consumed in place; x is too)."""
    return x.sub_(q.clamp_min_(TINY).log_()).argmax(-1)


ARGMAX_SPLIT_ROWS = 8  # up to this many rows, argmax_rows splits each row (beyond, the rows fill the GPU)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of x [rows, vocab]: the first index of each row's maximum. For a few rows on a GPU, in two
    passes: the maxima of (up to 256) equal chunks of each row, then the first chunk holding the row's maximum.
    One row of a 128k vocabulary is a single thread block in torch's argmax (27 us of a 4.4 ms decode step at
    batch 1 on an H200); the chunks spread it over the GPU. Equal to argmax, ties and NaN included (max and
    argmax both take the first maximum, NaN counting as the largest). On the CPU too: tests run it there."""
    rows, vocab = x.shape
    chunks = min(vocab & -vocab, 256)  # the largest power of two dividing vocab, at most 256
    if rows > ARGMAX_SPLIT_ROWS or chunks < 16:
        return x.argmax(-1)
    vals, idx = x.reshape(rows, chunks, vocab // chunks).max(-1)
    best = vals.argmax(-1, keepdim=True)
    return (best * (vocab // chunks) + idx.gather(1, best)).squeeze(1)
