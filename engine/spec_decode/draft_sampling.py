"""The draft model's next tokens for one proposal's batch: greedy rows take the argmax, rows of requests that sample
draw from the draft's own filtered distribution q (the request's temperature, top-k and top-p), on the device.

q is what the verifier needs for exact speculative sampling (verifier.py: accept d with probability
min(1, p(d) / q(d)), else draw from norm(max(0, p - q))). Exactness needs only that each drafted token was drawn
from the q handed to the verifier, so the draft filters with sample_ops.apply_top_p_sorted (one batched call per
step, no host synchronisation; the target's sampler may probe top-p with a sync) and draws by the exponential race
from the same filtered logits it takes q from.
"""
from __future__ import annotations

import torch

from ..sample_ops import apply_top_p_sorted, exponential_race
from ..sampling import _to_device

# Sampled rows filtered at once (the sort path's temporaries are about 12 bytes per row and vocabulary entry).
DRAFT_SAMPLE_CHUNK_ROWS = 32
# The q rows of one proposal (sampled rows x k x vocabulary x 4 bytes) wait on the device until verification, outside
# the memory profile: at most this many bytes, inside engine.memory.MEMORY_MARGIN_BYTES. Requests past it get greedy
# drafts for that proposal (a point mass is a valid q: verification stays exact, only acceptance is lower).
SAMPLED_DRAFT_MAX_BYTES = 256 * 2**20


def max_sampled_rows(k: int, vocab_size: int) -> int:
    """Rows of one proposal that may draw from q (see SAMPLED_DRAFT_MAX_BYTES)."""
    return SAMPLED_DRAFT_MAX_BYTES // (k * vocab_size * 4)


class DraftSampler:
    """Draws one token per row of a proposal's batch at each of its k draft steps.

    Invariants: rows (the batch rows that sample) and their parameters are fixed for the proposal; each call returns
    the tokens of every row on the device and, when some rows sample, their q [len(rows), vocab] float32 on the
    device (q[j] the distribution row rows[j]'s token was drawn from). Nothing is read back to the host.
    """

    def __init__(self, model, params: list, generators: list, sampler, device: torch.device, vocab_size: int,
                 max_rows: int | None = None):
        self.model, self.sampler, self.device = model, sampler, device
        self.rows = [i for i, p in enumerate(params) if not p.greedy][:max_rows]
        self.params = [params[i] for i in self.rows]
        self.generators = [generators[i] for i in self.rows]
        n = len(params)
        if self.rows:
            # Small host lists copied without waiting for the device's queue (the forward passes are queued by now).
            self.idx = _to_device(self.rows, torch.long, device)
            self.temp = _to_device([[float(p.temperature)] for p in self.params], torch.float32, device)
            self.top_p = _to_device([[float(p.top_p)] for p in self.params], torch.float32, device)
            self.top_k = _to_device([[min(p.top_k, vocab_size) if p.top_k >= 1 else vocab_size] for p in self.params],
                                    torch.long, device)
            self.filtered = any(p.top_k >= 1 or p.top_p < 1.0 for p in self.params)
            # Row i's token: argmax row i for greedy rows, the j-th drawn token for sampled row rows[j].
            perm = list(range(n))
            for j, i in enumerate(self.rows):
                perm[i] = n + j
            self.perm = _to_device(perm, torch.long, device)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden: [n, hidden] the draft's last hidden states; returns (tokens [n] int64, q or None)."""
        if not self.rows:
            # The argmax of the LM head in its own dtype (compute_logits' float32 copy and soft-cap change no argmax).
            return self.model.lm_head(hidden).argmax(-1), None
        logits = self.model.compute_logits(hidden)
        greedy = logits.argmax(-1)
        x = logits.index_select(0, self.idx).div_(self.temp)
        qs, drawn = [], []
        step = DRAFT_SAMPLE_CHUNK_ROWS
        for s in range(0, len(self.rows), step):
            xc = x[s:s + step]
            if self.filtered:
                apply_top_p_sorted(xc, self.top_k[s:s + step], self.top_p[s:s + step])
            qs.append(xc.softmax(-1))
            e = self.sampler._exponentials(xc, self.generators[s:s + step])
            drawn.append(exponential_race(xc, e))
        tokens = torch.cat([greedy] + drawn).index_select(0, self.perm)
        return tokens, torch.cat(qs)
