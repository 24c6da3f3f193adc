"""Continuous batching at the iteration level: token budget, chunked prefill, preemption by recompute."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .kv import KVCacheManager
from .request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's work: requests in batch order with their new-token counts, and the block table of each
    (block_tables[request_id]: physical block ids in sequence order, read-only; the runner needs nothing else
    from the KV manager)."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    # Speculative decoding: request_id -> the Draft (engine.spec_decode) whose k tokens this step verifies; such a
    # request is scheduled 1 + k tokens (its last token and the draft) and its block table covers them all.
    spec_drafts: dict = field(default_factory=dict)
    # Copy-on-write (parallel sampling, beam search): (source, destination) block ids the runner copies in every
    # layer before the forward pass, and the requests whose tables one of them changed in place (the runner
    # rewrites their persistent rows); block_tables already hold the copies.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    rewritten_tables: list[str] = field(default_factory=list)
    # KV cache groups (sliding-window models, engine/kv/hybrid.py): request_id -> its block table in every group
    # (block_tables holds group 0's); empty with one group.
    group_block_tables: dict[str, tuple] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides, each step, which requests run and how many of their tokens.

    Invariants:
    - Every request added is in exactly one of `waiting` (FIFO; preempted requests go to the front)
      and `running` (admission order) until it finishes or is aborted: none is ever dropped.
    - A step schedules at most max_num_batched_tokens tokens and at most max_num_seqs requests.
    - Running requests are served first, in admission order: one token each when decoding, or the
      next chunk of a prompt that did not fit one step (chunked prefill).
    - When the pool has no block for a running request, the most recently admitted running request
      is preempted: its blocks are freed and it waits at the front of the queue to be recomputed.
      Recompute gives the same output because the sampled tokens are kept and re-fed as prompt.
    - Waiting requests are admitted first-come-first-served, only in steps that preempted nothing.
    - Speculative decoding: a decoding request with a draft is scheduled 1 + k tokens when the budget and the
      free blocks allow (a draft never preempts anyone; without room it decodes one token). After verification
      it keeps the K/V of its verified tokens only: num_computed_tokens counts them, and the blocks past them
      go back to the pool (KVCacheManager.trim), so between steps every running request holds exactly
      blocks_needed(num_computed_tokens) blocks, as without speculation.
    - A step that fails (an exception or KeyboardInterrupt between schedule() and the engine's commit)
      is undone by rollback(): its requests go back to the front of the queue with no KV (recomputed,
      hitting the prefix cache for blocks of completed steps), and no block of it stays cached.
    - Async scheduling (engine/async_step.py): advance() counts a launched step's tokens as computed at once, and a
      request it samples for holds a placeholder (Request.num_output_placeholders) until update_from_async_output;
      schedule() then treats a placeholder in all_token_ids as a token to compute (the runner feeds it on the
      device), never schedules past max_tokens / max_model_len (no placeholder stands there), and admits no waiting
      request that still holds one.
    - A sequence computes no further than its fork_point while it has one; running sequences with
      nothing to compute (a beam waiting for its siblings) are skipped. len(running) plus
      num_reserved_seqs (seats of sequences still to be forked) stays within max_num_seqs.
    """

    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        # LLM resolves None batch limits for its device; a bare Scheduler (tests) takes the CPU's.
        self.config = config.with_batch_limits()
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.current: SchedulerOutput | None = None
        # LLM resolves max_model_len=None to the model's context; a bare Scheduler (tests) has no model.
        self.max_model_len = config.max_model_len or 2**62
        # Seats kept for the sequences that running group roots will fork into (engine/sequence_group.py).
        self.num_reserved_seqs = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self, drafts: dict | None = None) -> SchedulerOutput:
        """drafts: {request_id: Draft} proposed for decoding requests (speculative decoding); a request with one
        gets 1 + len(draft) tokens when the budget and the pool allow, else it decodes one token as usual."""
        out = self.current = SchedulerOutput()  # kept for rollback() until the step commits
        budget = self.config.max_num_batched_tokens
        # The loop over running requests is the host's hottest path at large batches (one pass per decoding
        # request and step): attribute lookups are hoisted and the token counts summed in locals.
        running, allocate, scheduled = self.running, self.kv.allocate_slots, out.scheduled
        block_ids, block_tables, RUNNING = self.kv.block_ids, out.block_tables, RequestStatus.RUNNING
        num_decode = num_prefill = 0
        # Preemption only pops from the tail of `running`, which the iterator sees (it stops at the new end).
        for i, req in enumerate(running):
            if budget <= 0:
                break
            computed = req.num_computed_tokens
            num_tokens = len(req.all_token_ids)
            num_new = (req.fork_point or num_tokens) - computed
            if num_new > budget:
                num_new = budget
            if num_new <= 0:  # a beam waiting for its siblings' step (engine/sequence_group.py)
                continue
            if not allocate(req, num_new):
                while True:
                    victim = running.pop()
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is req or allocate(req, num_new):
                        break
            if req.status is not RUNNING:
                break
            if drafts and num_new == 1 and computed == num_tokens - 1:
                # Keep a block free for each running request after this one: a draft must not preempt them.
                num_new += self._schedule_draft(out, req, drafts.get(req.request_id), budget - 1,
                                                len(running) - i - 1)
            scheduled.append((req, num_new))
            rid = req.request_id
            block_tables[rid] = block_ids(rid)
            # A request's last prompt token and every later token are decode work; earlier ones are prefill.
            if computed >= req.num_prompt_tokens:
                num_decode += num_new
            else:
                num_prefill += num_new
            budget -= num_new
        out.num_decode_tokens, out.num_prefill_tokens = num_decode, num_prefill

        while (self.waiting and budget > 0 and not out.preempted and len(self.running) + self.num_reserved_seqs
               + self.waiting[0].num_pending_forks < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_output_placeholders:  # preempted with a token in flight: admitted once it is known
                break
            hits, num_hit_tokens = self.kv.get_computed_blocks(req)
            num_new = min((req.fork_point or req.num_tokens) - num_hit_tokens, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            if not req.admitted_once:
                req.admitted_once = True
                req.metrics.first_scheduled_time = time.perf_counter()
                req.metrics.num_cached_tokens = num_hit_tokens
            self.running.append(req)
            self.num_reserved_seqs += req.num_pending_forks
            self._add(out, req, num_new)
            budget -= num_new
        # The copies the allocations above queued (KVCacheManager: only scheduled requests copy on write).
        out.block_copies, out.rewritten_tables = self.kv.take_pending_copies()
        if self.kv.num_groups > 1:
            out.group_block_tables = {rid: self.kv.group_block_ids(rid) for rid in out.block_tables}
        return out

    def _schedule_draft(self, out: SchedulerOutput, req: Request, draft, budget: int, keep_free: int) -> int:
        """Reserve slots for a decoding request's draft (never preempting for it); returns the tokens added."""
        if draft is None or budget <= 0:
            return 0
        draft = draft.truncate(budget)
        if not len(draft) or not self.kv.allocate_draft_slots(req, len(req.all_token_ids) + len(draft), keep_free):
            return 0
        out.spec_drafts[req.request_id] = draft
        return len(draft)

    def _add(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.scheduled.append((req, num_new))
        out.block_tables[req.request_id] = self.kv.block_ids(req.request_id)
        if req.num_computed_tokens >= req.num_prompt_tokens:
            out.num_decode_tokens += num_new
        else:
            out.num_prefill_tokens += num_new

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int], now: float,
                           spec_sampled: dict[str, list[int]] | None = None) -> list[Request]:
        """Advance computed counts, append sampled tokens, and retire finished requests (returned).

        spec_sampled: {request_id: tokens emitted by verifying its draft} (accepted prefix + one). Only the K/V
        of the verified token and the accepted ones is kept: the blocks of rejected slots go back to the pool.
        """
        finished = []
        max_model_len, get = self.max_model_len, sampled.get
        for req, num_new in out.scheduled:
            if spec_sampled and req.request_id in spec_sampled:
                if self._update_verified(req, num_new, spec_sampled[req.request_id], now):
                    finished.append(req)
                continue
            req.num_computed_tokens += num_new
            token = get(req.request_id)
            if token is None:
                continue
            status = req.add_output_token(token, now, max_model_len)
            if status is not None:
                self._finish(req, status, now)
                finished.append(req)
        self._drop_finished(finished)
        return finished

    # ----- async scheduling (engine/async_step.py) ---------------------------------------------------------
    def advance(self, out: SchedulerOutput) -> None:
        """Async scheduling: the step of `out` was launched. Its tokens count as computed now (the next schedule()
        builds on them) and each request it samples for holds a placeholder until its token is read."""
        max_model_len = self.max_model_len
        for req, num_new in out.scheduled:
            req.num_computed_tokens += num_new
            if req.num_computed_tokens == len(req.all_token_ids):
                req.add_placeholder(max_model_len)

    def update_from_async_output(self, out: SchedulerOutput, sampled: dict[str, int], now: float
                                 ) -> tuple[list[Request], int]:
        """Async scheduling: the sampled tokens of a launched step (advance() already counted its computed tokens)
        replace their placeholders; returns the requests they finished. A token of a request that finished before
        (a stop token one step earlier, or an abort) is discarded; a request preempted while its token was in flight
        takes the token (it is recomputed with it) and may finish in the waiting queue. Returns (finished requests,
        tokens discarded)."""
        finished, discarded = [], 0
        max_model_len, get = self.max_model_len, sampled.get
        RUNNING, PREEMPTED = RequestStatus.RUNNING, RequestStatus.PREEMPTED
        for req, _ in out.scheduled:
            token = get(req.request_id)
            if token is None:
                continue
            status = req.status
            if status is not RUNNING and status is not PREEMPTED:  # finished (the cheap identity tests first)
                discarded += 1
                continue
            status = req.resolve_placeholder(token, now, max_model_len)
            if status is not None:
                self._finish(req, status, now)
                finished.append(req)
        self._drop_finished(finished)
        return finished, discarded

    def _drop_finished(self, finished: list[Request]) -> None:
        """Take the requests of `finished` out of the running list and the waiting queue (a request preempted
        while its token was in flight finishes from the waiting queue under async scheduling)."""
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
            if any(id(r) in done for r in self.waiting):
                self.waiting = deque(r for r in self.waiting if id(r) not in done)

    def _update_verified(self, req: Request, num_new: int, tokens: list[int], now: float) -> bool:
        """Apply a verification step's tokens (stopping at a stop token or a length limit); True if finished."""
        num_rejected = num_new - len(tokens)  # num_new = 1 + k, len(tokens) = 1 + accepted
        req.num_computed_tokens += num_new - num_rejected
        self.kv.trim(req, req.num_computed_tokens)
        for token in tokens:
            status = req.add_output_token(token, now, self.max_model_len)
            if status is not None:
                self._finish(req, status, now)
                return True
        return False

    def rollback(self) -> list[Request]:
        """Undo the current step (see the class docstring); returns the requests it finished before failing.

        Not counted as preemptions. Sampled tokens that update_from_output already appended are kept:
        they came from a completed forward pass, and recompute re-feeds them as prompt.
        """
        out, self.current = self.current, None
        finished = []
        if out is not None:
            undone = {id(r) for r, _ in out.scheduled}
            for req, _ in reversed(out.scheduled):
                if req.status.finished:
                    finished.append(req)
                    continue
                self.kv.free(req)
                req.num_computed_tokens = 0
                req.status = RequestStatus.PREEMPTED
                self.waiting.appendleft(req)
            self.running = [r for r in self.running if id(r) not in undone]
        # An admission interrupted between allocation and leaving the queue holds blocks: waiting owns none.
        for req in self.waiting:
            self.kv.free(req)
        self.kv.rollback()
        return finished[::-1]

    def commit(self) -> None:
        """The current step completed: the blocks it registered in the prefix cache are now valid."""
        self.current = None
        self.kv.commit()

    def _finish(self, req: Request, status: RequestStatus, now: float) -> None:
        req.status = status
        req.metrics.finished_time = now
        self.kv.free(req)
        self.kv.forget(req)

    def abort(self, request_id: str, now: float) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, RequestStatus.FINISHED_ABORTED, now)
                    return req
        return None
