"""Draft-model proposals: a second, smaller model with the target's vocabulary proposes k tokens (greedy, or
sampled from its own filtered distribution for requests that sample).

The draft keeps its own paged KV cache (the block pool and model runner of its own LLMEngine, whose scheduler
is never used) with one draft sequence per target request, persistent across steps: each proposal feeds the
draft only the target's tokens it has not seen yet (usually one: the correction or bonus token of the last
verification; two after all k were accepted) and then runs k - 1 one-token decode steps on its own
tokens. These forward passes go straight to the draft's runner, not through the draft engine's step(): no
scheduling, no prefix-cache hashing, no per-step outputs, and one host synchronisation per proposal (the k
drafted tokens read back together); each drafted token is passed to the next step on the device and, on CUDA,
every step replays one of the draft runner's decode graphs (only a long feed, a new request's prompt, runs
as an eager prefill). See
DraftModelProposer for the invariants that make a rejected token's K/V harmless.

Requests that decode greedily get greedy drafts (point masses, Draft.probs None). Requests that sample get drafts
drawn from the draft's own filtered distribution q at the request's temperature, top-k and top-p
(draft_sampling.py), with Draft.probs [k, vocab] the q rows on the device: the verifier's speculative-sampling rule
keeps the target's distribution exact, with a higher acceptance than greedy drafts get when q is close to p. The q
rows stay on the device until verification; only the drawn tokens are read back (the one sync per proposal).
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import AttentionMetadata
from .draft_sampling import DraftSampler, max_sampled_rows
from .proposal import Draft

# Feeds of up to this many unseen tokens per sequence run as decode-graph replays (one per token); longer ones
# (a new request's prompt) as one eager prefill. A verification that accepted all k drafts leaves 2.
MAX_GRAPH_FEED = 4


class _DraftSeq:
    """One target request's sequence in the draft's KV cache: slots [0, base) of the draft block table
    kv.block_ids(request_id) hold the K/V of the target's first base tokens, the next len(tail) slots that of
    the draft tokens `tail` (fed at the last proposal, not yet verified)."""

    __slots__ = ("request_id", "base", "tail")

    def __init__(self, request_id: str):
        self.request_id, self.base, self.tail = request_id, 0, []


class DraftModelProposer:
    """Wraps an LLMEngine over the draft model (llm.engine of an engine.LLM) and drives its runner directly.

    Invariants:
    - seqs[rid] exists from the first proposal for target request rid until release(rid) (finished or
      aborted) or eviction; its draft block table covers at least base + len(tail) slots.
    - A live target request's tokens only grow (verified tokens are appended, never rewritten), so the draft
      K/V still valid at a proposal covers base tokens and then as many of `tail` as the target accepted
      (compared against the request's new tokens: at most k - 1 comparisons); at least the last target token
      is always recomputed (its logits give the first draft token). Slots past the valid prefix hold K/V of
      rejected draft tokens: the attention never reads past a sequence's length and the next proposal
      overwrites them. Were the invariant broken, the draft would only propose worse tokens: verification
      alone decides what the target emits.
    - When the draft's pool runs out, the sequences of requests outside the current batch (preempted or
      waiting ones) are evicted first; a request that still does not fit gets no proposal this step.
    - A proposal interrupted by an exception drops the draft sequences of its batch (their K/V may be half
      written), so the next proposal recomputes them from the target's tokens.
    """

    name = "draft"

    def __init__(self, engine):
        self.engine = engine
        self.runner = engine.runner
        self.kv = engine.kv
        self.seqs: dict[str, _DraftSeq] = {}
        # The draft's own step timeline would be overhead nobody reads (its engine never steps now); its cost
        # shows up in the target's counters as draft_time.
        engine.set_timeline(False)

    # ----- the Proposer protocol -----------------------------------------------------------------
    def propose(self, requests: list, limits: list[int]) -> dict[str, Draft]:
        k = max(limits, default=0)
        batch = self._admit(requests, k) if k else []
        if not batch:
            return {}
        try:
            drafted, probs = self._run(batch, k)
        except BaseException:
            for req, _, _ in batch:
                self._drop(req.request_id)
            raise
        limit_of = dict(zip((r.request_id for r in requests), limits))
        out = {}
        for (req, seq, _), tokens, q in zip(batch, drafted, probs):
            seq.base, seq.tail = req.num_tokens, tokens[:k - 1]  # the last draft token is never fed
            limit = limit_of[req.request_id]
            out[req.request_id] = Draft(tokens[:limit], None if q is None else q[:limit])
        return out

    def release(self, request_id: str) -> None:
        self._drop(request_id)

    def assume(self, request_id: str, token_ids: list[int]) -> None:
        """Record token_ids as the draft tokens of request_id's last proposal (synthetic acceptance: the study's
        tokens replace the draft's own, so that the draft's work in the next step is what a draft proposing
        them would do). The K/V in their slots is the draft's own tokens', which only costs acceptance."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            seq.tail = list(token_ids[:len(seq.tail)])

    # ----- draft sequences -----------------------------------------------------------------------
    def _drop(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.kv.free(seq)

    def _admit(self, requests: list, k: int) -> list:
        """(request, draft sequence, number of its tokens to feed) for each request the draft can serve: its
        sequence's valid prefix found, its block table grown to hold every token this proposal feeds."""
        max_len = self.engine.config.max_model_len
        in_batch = {r.request_id for r in requests}
        batch, evicted = [], False
        for req in requests:
            tokens = req.all_token_ids
            n = len(tokens)
            if n + k - 1 > max_len:  # the draft's context is shorter than the target's: no proposal
                self._drop(req.request_id)
                continue
            seq = self.seqs.get(req.request_id)
            if seq is None:
                seq = self.seqs[req.request_id] = _DraftSeq(req.request_id)
            valid = _common_prefix(seq, tokens)
            if not self.kv.allocate_draft_slots(seq, n + k - 1):
                if not evicted:
                    for rid in [r for r in self.seqs if r not in in_batch]:
                        self._drop(rid)
                    evicted = True
                if not self.kv.allocate_draft_slots(seq, n + k - 1):
                    self._drop(req.request_id)
                    continue
            seq.base, seq.tail = valid, []
            batch.append((req, seq, n - valid))
        # One-token feeds first: attention backends take the decodes of a batch as one group.
        batch.sort(key=lambda item: item[2] != 1)
        return batch

    # ----- the k forward passes ------------------------------------------------------------------
    def _run(self, batch: list, k: int) -> tuple[list[list[int]], list]:
        """k draft tokens per sequence of batch (greedy, or drawn from q for requests that sample: see
        draft_sampling.py), with one host synchronisation (the final read-back of the tokens), and per sequence its
        q rows [k, vocab] on the device (None for greedy sequences).

        With the draft runner's decode graphs (CUDA) and short feeds (every sequence feeds at most
        MAX_GRAPH_FEED unseen tokens), the proposal is Q + k - 1 decode-graph replays, Q the longest feed:
        replay s feeds position len - Q + s of every sequence (a sequence with a shorter feed recomputes K/V it
        already holds, the same values), the target's tokens first and then the draft's own greedy tokens,
        passed on the device. Otherwise the first forward pass feeds every sequence's unseen tail eagerly (a
        prefill), then k - 1 one-token steps follow (Q = 1), as graph replays where the batch has a graph."""
        runner, bs, dev = self.runner, self.kv.block_size, self.runner.device
        n = len(batch)
        lens = np.array([len(req.all_token_ids) for req, _, _ in batch], dtype=np.int64)
        qlens = np.array([q for _, _, q in batch], dtype=np.int64)
        size = runner._graph_size(n) if runner.graphs else None
        q_max = int(qlens.max())
        graph_feed = size is not None and q_max <= MAX_GRAPH_FEED and q_max <= int(lens.min())
        feed = q_max if graph_feed else 1
        rows = size or n
        cols = runner.max_blocks_per_seq
        table = np.full((rows, cols), runner.null_block, dtype=np.int32)
        for i, (_, seq, _) in enumerate(batch):
            ids = self.kv.block_ids(seq.request_id)
            table[i, :len(ids)] = ids
        # Step s feeds position len - feed + s: [steps, (position, slot, seq_len, token), rows].
        num_steps = feed + k - 1
        pos = lens[None, :] - feed + np.arange(num_steps)[:, None]
        inputs = np.zeros((num_steps, 4, rows), dtype=np.int64)
        inputs[:, 0, :n] = pos
        inputs[:, 1, :n] = table[np.arange(n)[None, :], pos // bs].astype(np.int64) * bs + pos % bs
        inputs[:, 1, n:] = runner.null_block * bs
        inputs[:, 2, :n] = pos + 1
        inputs[:, 2, n:] = 1
        for i, (req, _, _) in enumerate(batch):
            inputs[:feed, 3, i] = req.all_token_ids[len(req.all_token_ids) - feed:]
        inputs_dev = torch.from_numpy(inputs).to(dev)
        table_dev = torch.from_numpy(table).to(dev)
        self._draw = DraftSampler(runner.model, [req.params for req, _, _ in batch],
                                  [getattr(req, "generator", None) for req, _, _ in batch], runner.sampler, dev,
                                  runner.spec.vocab_size, max_sampled_rows(k, runner.spec.vocab_size))
        qs = []
        with torch.inference_mode():
            if size is not None:  # the graphs' constant inputs: block tables, query starts, padding tokens
                b = runner.buffers
                b.tables_dev[:size, :cols].copy_(table_dev)
                b.qsl_dev[:size + 1].copy_(torch.arange(size + 1, dtype=torch.int32, device=dev))
                b.ids_dev[n:size].zero_()
            if graph_feed:
                drafted, tok = [], None
            else:  # a long feed (a new request's prompt): one eager prefill gives the first draft token
                tok, q = self._draw(self._eager_first(batch, lens, qlens, table[:n]))
                drafted = [tok]
                qs.append(q)
            for s in range(0 if graph_feed else 1, num_steps):
                tok_in = inputs_dev[s, 3, :n] if s < feed else tok
                if size is not None:
                    hidden = self._graph_step(size, n, inputs_dev[s], tok_in)
                else:
                    hidden = self._eager_decode(tok_in, inputs_dev[s], inputs[s, 2, :n], table_dev)
                tok, q = self._draw(hidden)
                if s >= feed - 1:
                    drafted.append(tok)
                    qs.append(q)
            tokens = torch.stack(drafted, 1).tolist()
        probs = [None] * n
        if self._draw.rows:
            q_all = torch.stack(qs, 1)  # [sampled rows, k, vocab], on the device
            for j, i in enumerate(self._draw.rows):
                probs[i] = q_all[j]
        return tokens, probs

    def _graph_step(self, size: int, n: int, step: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """One decode step through the draft runner's decode graph of `size` rows (rows n..size-1 are padding
        into the null block); step: the step's [4, size] device inputs; tok: [n] token ids on the device. Returns the
        [n] rows' hidden states (the next tokens are drawn from them on the device: no host synchronisation)."""
        runner = self.runner
        b = runner.buffers
        b.pos_dev[:size].copy_(step[0])
        b.slots_dev[:size].copy_(step[1])
        b.lens_dev[:size].copy_(step[2])
        b.ids_dev[:n].copy_(tok)
        graph, hidden = runner.graphs[size]
        graph.replay()
        return hidden[:n]

    def _eager_first(self, batch, lens, qlens, table) -> torch.Tensor:
        """The first forward pass, eagerly: each sequence feeds its unseen tail (in rounds of at most the draft's
        max_num_batched_tokens, what its activation memory was sized for); [n, hidden] the hidden state at each
        sequence's last token."""
        budget = self.runner.config.max_num_batched_tokens
        tok = [None]  # the [n, hidden] buffer, allocated by the round that knows the hidden size
        pieces, used = [], 0  # (sequence, first position, end position) of one round
        for i, (req, _, q) in enumerate(batch):
            start, end = int(lens[i] - q), int(lens[i])
            while start < end:
                take = min(end - start, budget - used)
                pieces.append((i, start, start + take))
                start, used = start + take, used + take
                if used == budget:
                    self._prefill_round(batch, pieces, table, tok)
                    pieces, used = [], 0
        if pieces:
            self._prefill_round(batch, pieces, table, tok)
        return tok[0]

    def _prefill_round(self, batch, pieces, table, tok: torch.Tensor) -> None:
        """One eager forward over pieces (sequence, start, end) of tails; writes the hidden state at the last
        token of each piece that ends its sequence's tail into tok[0] ([n, hidden], allocated here the first time)."""
        runner, bs, dev = self.runner, self.kv.block_size, self.runner.device
        pieces = sorted(pieces, key=lambda p: p[2] - p[1] != 1)  # one-token pieces first (the decode group)
        idx = np.array([p[0] for p in pieces], dtype=np.int64)
        starts = np.array([p[1] for p in pieces], dtype=np.int64)
        ends = np.array([p[2] for p in pieces], dtype=np.int64)
        qlens = ends - starts
        ids = np.concatenate([batch[i][0].all_token_ids[a:e] for i, a, e in pieces]).astype(np.int64)
        positions = np.arange(len(ids)) - np.repeat(np.cumsum(qlens) - qlens - starts, qlens)
        rows = np.repeat(np.arange(len(pieces)), qlens)
        tables = table[idx]
        slots = tables[rows, positions // bs].astype(np.int64) * bs + positions % bs
        qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
        cols = int(-(-ends.max() // bs))
        host_lists = dev.type == "cpu" or runner.backend.name == "torch"
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev), query_start_loc=torch.from_numpy(qsl).to(dev),
            seq_lens=torch.from_numpy(ends.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(np.ascontiguousarray(tables[:, :cols])).to(dev),
            num_decodes=int((qlens == 1).sum()), max_query_len=int(qlens.max()), max_seq_len=int(ends.max()),
            query_start_loc_cpu=qsl.tolist() if host_lists else None,
            seq_lens_cpu=ends.tolist() if host_lists else None)
        hidden = runner.model(torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev), runner.kv_caches,
                              meta, runner.backend)
        done = np.flatnonzero(ends == np.array([len(batch[i][0].all_token_ids) for i in idx]))
        if len(done):
            last = torch.from_numpy(qsl[1:][done].astype(np.int64) - 1).to(dev)
            if tok[0] is None:
                tok[0] = hidden.new_zeros(len(batch), hidden.shape[-1])
            tok[0][torch.from_numpy(idx[done]).to(dev)] = hidden[last]

    def _eager_decode(self, tok: torch.Tensor, step: torch.Tensor, seq_lens: np.ndarray,
                      table_dev: torch.Tensor) -> torch.Tensor:
        """One eager decode step of every sequence: token tok[i] at position step[0, i] (seq_lens: the host copy
        of step[2])."""
        runner, dev = self.runner, self.runner.device
        n = len(seq_lens)
        cols = int(-(-seq_lens.max() // self.kv.block_size))
        host_lists = dev.type == "cpu" or runner.backend.name == "torch"
        meta = AttentionMetadata(
            slot_mapping=step[1, :n], query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
            seq_lens=step[2, :n].to(torch.int32), block_tables=table_dev[:n, :cols],
            num_decodes=n, max_query_len=1, max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=list(range(n + 1)) if host_lists else None,
            seq_lens_cpu=seq_lens.tolist() if host_lists else None)
        return runner.model(tok, step[0, :n], runner.kv_caches, meta, runner.backend)


def _common_prefix(seq: _DraftSeq, tokens: list[int]) -> int:
    """How many of the target's tokens the draft sequence holds valid K/V for (see DraftModelProposer), capped one
    short of the end: the last target token is always fed again, its logits give the first draft token."""
    end = len(tokens) - 1
    i, base = min(seq.base, end), seq.base
    for j, token in enumerate(seq.tail):
        if base + j >= end or tokens[base + j] != token:
            break
        i = base + j + 1
    return i
