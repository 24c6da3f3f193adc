"""Sequence groups at work: one request, several sequences sharing KV blocks (parallel sampling n > 1, beam
search).

The scheduler sees each sequence as a Request of its own; SequenceGroups (the group itself is
request.SequenceGroup) keeps a group's sequences together. How a group shares memory, as in the PagedAttention paper:

- Root phase. A group enters the waiting queue as one sequence, its root, with a fork_point: the
  number of leading tokens all its sequences agree on that it computes for them (the prompt minus its
  last token, when the group starts). Its siblings are parked: no blocks, in no queue. When the root
  has computed fork_point tokens, every sibling forks from it (KVCacheManager.fork: the blocks by
  reference, the last partly filled one included) and joins the running sequences. Each sequence then
  computes the rest of its own tokens (at least one, so that each samples from its own logits); the
  first write into the shared partial block gives the writer a copy (copy-on-write, in allocate_slots).
- Beam search. After every step in which all live beams computed their last token, BeamSearchState
  picks the next beams: a beam chosen as the parent of several forks a child per extra continuation
  (reference counts up), a beam chosen by none is dropped (reference counts down).
- Preemption. When the scheduler preempts a sequence of a group, the whole group goes back: every
  sequence frees its blocks and the group re-enters as a root whose fork_point covers the tokens all
  its sequences still agree on (recompute as a whole, sharing that common prefix again).
- A failed step (LLMEngine.step's rollback, after Scheduler.rollback): every group that holds blocks, seats or
  running sequences re-enters as a root the same way (not counted as a preemption); sequences the step
  finished are kept, and groups it finished are returned for the next step to deliver.
"""
from __future__ import annotations

import dataclasses

from .beam_search import BeamSearchState
from .request import Request, RequestStatus, SequenceGroup
from .sampling import BeamSearchParams, SamplingParams


def _common_prefix_len(seqs: list[Request]) -> int:
    first = seqs[0].all_token_ids
    n = min(len(s.all_token_ids) for s in seqs)
    for s in seqs[1:]:
        other = s.all_token_ids
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


class SequenceGroups:
    """All sequence groups of one engine, and what they do to the scheduler, KV cache and runner.

    The engine calls after_schedule() right after Scheduler.schedule(), take_candidates() on the
    sampled tokens before Scheduler.update_from_output(), and after_update() right after it; commit() once
    the step completed, rollback() after Scheduler.rollback() when it failed.
    Invariant: finished_in_step holds the groups finished since the last commit() (their outputs are
    not delivered until the step completes).
    """

    def __init__(self, scheduler, kv, runner, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.scheduler, self.kv, self.runner = scheduler, kv, runner
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.groups: dict[str, SequenceGroup] = {}
        self.num_beam_groups = 0
        self.finished_in_step: list[SequenceGroup] = []

    @property
    def active(self) -> bool:
        return bool(self.groups)

    # ----- adding ------------------------------------------------------------------------------
    def add_sampling(self, request_id: str, prompt: list[int], params: SamplingParams,
                     arrival: float) -> SequenceGroup:
        """A request with params.num_sequences > 1: sequence i samples with seed + i (when seeded)."""
        size = params.num_sequences
        group = SequenceGroup(request_id, prompt, arrival, size, params=params)
        for i in range(size):
            p = dataclasses.replace(params, n=1, best_of=None,
                                    seed=None if params.seed is None else params.seed + i,
                                    logprobs=params.logprobs if params.logprobs is not None else 0)
            seq = Request(group.new_seq_id(), prompt, p, arrival, self.eos_token_ids)
            seq.group = group
            group.seqs.append(seq)
        self.groups[request_id] = group
        self._enter(group, front=False)
        return group

    def add_beam_search(self, request_id: str, prompt: list[int], beam: BeamSearchParams,
                        arrival: float) -> SequenceGroup:
        eos = () if beam.ignore_eos else self.eos_token_ids
        max_len = max(len(prompt) + 1, min(len(prompt) + beam.max_tokens, self.max_model_len))
        group = SequenceGroup(request_id, prompt, arrival, beam.beam_width, beam=beam)
        group.state = BeamSearchState(beam.beam_width, len(prompt), max_len, eos, beam.length_penalty)
        # Beams never stop on their own: the search decides when they finish.
        params = SamplingParams(max_tokens=10**9, temperature=0.0, ignore_eos=True,
                                logprobs=group.state.num_candidates)
        seq = Request(group.new_seq_id(), prompt, params, arrival, ())
        seq.group = group
        group.seqs.append(seq)
        self.groups[request_id] = group
        self.num_beam_groups += 1
        self._enter(group, front=False)
        return group

    def _enter(self, group: SequenceGroup, front: bool) -> None:
        """Queue the group as a root sequence that computes the prefix all its sequences share."""
        seqs = group.seqs
        limit = min(_common_prefix_len(seqs), min(s.num_tokens for s in seqs) - 1)
        seats = (group.size if group.state is not None else len(seqs)) - 1
        if len(seqs) > 1 and limit < 1:
            # Nothing to share (one-token prompts of parallel sampling): the sequences queue on their own.
            group.root, group.parked, group.queued = None, [], False
            entering = list(seqs)
        else:
            root = seqs[0]
            root.fork_point = limit if len(seqs) > 1 else None
            root.num_pending_forks = seats
            group.root, group.parked, group.queued = (root if len(seqs) > 1 else None), seqs[1:], True
            entering = [root]
            group.queued_root = root
        for seq in entering:
            seq.status = RequestStatus.WAITING if not front else RequestStatus.PREEMPTED
        if front:
            self.scheduler.waiting.extendleft(reversed(entering))
        else:
            self.scheduler.waiting.extend(entering)

    # ----- hooks around one step ---------------------------------------------------------------
    def after_schedule(self, out) -> None:
        """Note admitted roots (their seats) and preempt, as a whole, every group the scheduler preempted
        a sequence of."""
        for group in self.groups.values():
            if group.queued and group.queued_root.status is RequestStatus.RUNNING:
                root = group.queued_root
                group.queued, group.reserved, root.num_pending_forks = False, root.num_pending_forks, 0
                if group.first_admission is None:
                    group.first_admission = root
        hit = {id(r.group): r.group for r in out.preempted if r.group is not None}
        for group in hit.values():
            self._preempt(group, out)

    def _preempt(self, group: SequenceGroup, out) -> None:
        members = {id(s) for s in group.seqs}
        dropped = [(r, k) for r, k in out.scheduled if id(r) in members]
        if dropped:
            out.scheduled = [(r, k) for r, k in out.scheduled if id(r) not in members]
            freed = set()
            for r, k in dropped:
                if r.num_computed_tokens >= r.num_prompt_tokens:
                    out.num_decode_tokens -= k
                else:
                    out.num_prefill_tokens -= k
                # The step will not write these: no block of theirs may stay in the prefix cache, no copy
                # of theirs runs (its destination is freed below).
                self.kv.drop_provisional(r)
                freed.update(self.kv.block_ids(r.request_id))
                out.block_tables.pop(r.request_id, None)
            ids = {r.request_id for r, _ in dropped}
            out.block_copies = [c for c in out.block_copies if c[1] not in freed]
            out.rewritten_tables = [rid for rid in out.rewritten_tables if rid not in ids]
        self._reset(group)
        group.metrics.num_preemptions += 1
        self._enter(group, front=True)

    def _reset(self, group: SequenceGroup) -> None:
        """Take every sequence of the group out of the queues and the KV cache (ready to re-enter)."""
        sched = self.scheduler
        members = {id(s) for s in group.seqs}
        sched.running = [r for r in sched.running if id(r) not in members]
        for seq in list(sched.waiting):
            if id(seq) in members:
                sched.waiting.remove(seq)
        for seq in group.seqs:
            self.kv.free(seq)
            self.runner.release(seq.request_id)
            seq.num_computed_tokens = 0
            seq.fork_point = None
            seq.num_pending_forks = 0
            seq.candidates = None
        sched.num_reserved_seqs -= group.reserved
        group.reserved = 0
        if group.queued_root is not None:
            group.queued_root.num_pending_forks = 0
        group.root, group.parked, group.queued = None, [], False

    def take_candidates(self, sampled: dict) -> dict:
        """Move the beams' sampled rows (their top candidates) out of `sampled` onto the beams."""
        if self.num_beam_groups:
            for group in self.groups.values():
                if group.state is not None:
                    for seq in group.seqs:
                        tok = sampled.pop(seq.request_id, None)
                        if tok is not None:
                            seq.candidates = tok.top
        return sampled

    def after_update(self, finished: list, now: float) -> list:
        """Fork roots that reached their fork point, run the beam steps that are due, and collect finished
        sequences; returns `finished` with group sequences replaced by the groups that finished."""
        done_groups = []
        out = []
        for req in finished:
            group = req.group
            if group is None:
                out.append(req)
                continue
            self.runner.release(req.request_id)
            group.seqs.remove(req)
            group.finished.append(req)
            if not group.seqs:
                done_groups.append(group)
        changed: dict[int, SequenceGroup] = {}
        for group in list(self.groups.values()):
            if group.root is not None and group.root.status is RequestStatus.RUNNING \
                    and group.root.num_computed_tokens >= group.root.fork_point:
                self._fork_parked(group)
                changed[id(group)] = group
            if group.ready_for_beam_step:
                if self._beam_step(group, now):
                    done_groups.append(group)
                changed[id(group)] = group
        if changed:
            self._regroup_running(changed)
        for group in done_groups:
            self._finish(group, now)
            out.append(group)
        return out

    def _regroup_running(self, changed: dict[int, SequenceGroup]) -> None:
        """Put the changed groups' live sequences into scheduler.running where the group was, together: the
        scheduler preempts from the tail, so a group's sequences go back together before anything
        else is touched (preempting one sequence of a group frees little, its blocks being shared)."""
        running, placed = [], set()
        for r in self.scheduler.running:
            group = r.group
            if group is None or id(group) not in changed:
                running.append(r)
            elif id(group) not in placed:
                placed.add(id(group))
                if group.status is not RequestStatus.FINISHED_LENGTH:
                    running.extend(group.seqs)
        self.scheduler.running = running

    def _fork_parked(self, group: SequenceGroup) -> list[Request]:
        root, n = group.root, group.root.fork_point
        for seq in group.parked:
            self.kv.fork(root, seq, n)
            seq.num_computed_tokens = n
            seq.status = RequestStatus.RUNNING
            seq.admitted_once = True
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = root.metrics.first_scheduled_time
        forked = group.parked
        root.fork_point, group.root, group.parked = None, None, []
        self.scheduler.num_reserved_seqs -= len(forked)
        group.reserved -= len(forked)
        return forked

    def _fork_seq(self, group: SequenceGroup, parent: Request) -> Request:
        child = Request(group.new_seq_id(), parent.prompt_token_ids, parent.params, parent.metrics.arrival_time, ())
        child.all_token_ids = list(parent.all_token_ids)
        child.output_token_ids = list(parent.output_token_ids)
        child.metrics = dataclasses.replace(parent.metrics, token_times=list(parent.metrics.token_times))
        child.group = group
        child.status, child.admitted_once = RequestStatus.RUNNING, True
        self.kv.fork(parent, child, parent.num_computed_tokens)
        child.num_computed_tokens = parent.num_computed_tokens
        return child

    def _beam_step(self, group: SequenceGroup, now: float) -> bool:
        """Advance the beams by one token; True when the search is over."""
        seqs = group.seqs
        nxt = group.state.step([s.candidates for s in seqs], [s.output_token_ids for s in seqs])
        if group.state.done:
            group.status = RequestStatus.FINISHED_LENGTH
            return True
        claimed: set[int] = set()
        plan = []
        # Every fork copies its parent's table before any beam appends its token.
        for parent, token in nxt:
            if parent in claimed:
                seq = self._fork_seq(group, seqs[parent])
            else:
                seq = seqs[parent]
                claimed.add(parent)
            plan.append((seq, token))
        dropped = [s for i, s in enumerate(seqs) if i not in claimed]
        for seq, token in plan:
            seq.append_output_token(token, now)
            seq.candidates = None
        for seq in dropped:
            self._release(seq)
        group.seqs = [s for s, _ in plan]
        want = group.size - len(group.seqs)
        self.scheduler.num_reserved_seqs += want - group.reserved
        group.reserved = want
        return False

    def _release(self, seq: Request) -> None:
        self.kv.free(seq)
        self.kv.forget(seq)
        self.runner.release(seq.request_id)
        seq.status = RequestStatus.FINISHED_ABORTED

    def _finish(self, group: SequenceGroup, now: float, status: RequestStatus | None = None) -> None:
        """Release whatever the group still holds (live beams, seats) and stamp its metrics."""
        sched = self.scheduler
        live = {id(s) for s in group.seqs}
        if live:
            sched.running = [r for r in sched.running if id(r) not in live]
            for seq in list(sched.waiting):
                if id(seq) in live:
                    sched.waiting.remove(seq)
            for seq in group.seqs:
                self._release(seq)
        sched.num_reserved_seqs -= group.reserved
        group.reserved = 0
        group.status = status or RequestStatus.FINISHED_LENGTH
        del self.groups[group.request_id]
        self.finished_in_step.append(group)
        if group.state is not None:
            self.num_beam_groups -= 1
        m = group.metrics
        m.finished_time = now
        lineage = max(group.seqs + group.finished, key=lambda s: len(s.output_token_ids))
        m.token_times = list(lineage.metrics.token_times)
        m.first_token_time = lineage.metrics.first_token_time
        m.num_output_tokens = len(lineage.output_token_ids)
        if group.state is not None and group.state.done:
            # The last step's tokens go to the hypotheses only, not to the beams.
            m.num_output_tokens = max((len(h.token_ids) for h in group.state.hypotheses()), default=0)
            m.token_times += [now] * (m.num_output_tokens - len(m.token_times))
            m.first_token_time = m.token_times[0] if m.token_times else None
        scheduled = [s.metrics.first_scheduled_time for s in group.seqs + group.finished]
        m.first_scheduled_time = min((t for t in scheduled if t is not None), default=None)
        if group.first_admission is not None:
            m.first_scheduled_time = group.first_admission.metrics.first_scheduled_time
            m.num_cached_tokens = group.first_admission.metrics.num_cached_tokens

    # ----- the end of a step ---------------------------------------------------------------------
    def commit(self) -> None:
        """The step completed: the groups it finished were delivered."""
        self.finished_in_step = []

    def rollback(self, finished: list, now: float) -> list:
        """Undo a failed step after Scheduler.rollback(), which returned `finished` (requests the step had
        finished) and put the step's other requests back in the waiting queue one by one.

        Every group touched by the step (holding KV, seats or running sequences) is taken apart and
        re-enters whole, as a root at the front of the queue (its sampled tokens are kept); sequences the step
        finished stay finished. Returns `finished` with group sequences replaced by the groups that are now
        complete (the step had finished them, or finishes them now), for the next step to deliver.
        """
        out = [r for r in finished if r.group is None]
        done = self.finished_in_step
        self.finished_in_step = []
        sched, kv = self.scheduler, self.kv
        running = {id(r) for r in sched.running}
        for group in reversed(list(self.groups.values())):
            if group.state is None:  # parallel sampling (beams finish only by the search)
                for seq in [s for s in group.seqs if s.status.finished]:
                    self.runner.release(seq.request_id)
                    group.seqs.remove(seq)
                    group.finished.append(seq)
                if not group.seqs:
                    self._finish(group, now)
                    continue
            untouched = group.queued and not group.reserved and not any(
                id(s) in running or kv.req_to_blocks.get(s.request_id) for s in group.seqs)
            if not untouched:
                self._reset(group)
                self._enter(group, front=True)
        done, self.finished_in_step = done + self.finished_in_step, []
        sched.num_reserved_seqs = sum(g.reserved for g in self.groups.values())
        return out + done

    def abort(self, request_id: str, now: float) -> SequenceGroup | None:
        group = self.groups.get(request_id)
        if group is None:
            return None
        for seq in group.parked:
            seq.status = RequestStatus.FINISHED_ABORTED
        group.parked, group.root = [], None
        if group.queued:  # its seats were never taken
            group.queued_root.num_pending_forks = 0
        self._finish(group, now, RequestStatus.FINISHED_ABORTED)
        self.finished_in_step.remove(group)  # handed back by abort_request, not by a step
        return group
