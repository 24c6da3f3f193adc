"""Request and its states; RequestOutput with per-request timings (perf_counter seconds); SequenceGroup, the
sequences of one request that generates several (parallel sampling, beam search; run by sequence_group.py)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .beam_search import BeamSearchState
from .sampling import BeamSearchParams, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"      # back in the waiting queue, KV freed, to be recomputed
    FINISHED_STOPPED = "stop"    # EOS or a stop token
    FINISHED_LENGTH = "length"   # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class RequestMetrics:
    """Timings of one request (time.perf_counter seconds) and its token counts.

    ttft = first_token_time - arrival_time; tpot = (finished_time - first_token_time) / (outputs - 1);
    itl = gaps between consecutive output tokens; e2e = finished_time - arrival_time.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


PLACEHOLDER = -1  # all_token_ids' stand-in for a token sampled on the device but not yet read by the host


class Request:
    """One generation request as the scheduler sees it.

    all_token_ids = prompt + generated tokens. num_computed_tokens counts the leading tokens whose
    K/V is in the cache; a request is preempted by resetting it to 0 (recompute).

    Async scheduling (engine/async_step.py): num_output_placeholders counts tokens sampled by steps still in
    flight (their values are on the device only). Each placeholder whose token the request will feed to a later
    step stands as PLACEHOLDER at the end of all_token_ids (so the scheduler sees the token to compute); one that
    ends the request by length (max_tokens, max_model_len) does not, so no step is scheduled past it. Known tokens
    (num_known_tokens = prompt + output_token_ids) always come first; resolve_placeholder turns the oldest
    placeholder into its token. Without async scheduling num_output_placeholders stays 0.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
                 eos_token_ids: tuple[int, ...] = ()):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        # For add_output_token's stop test, once per request rather than once per token.
        self._stop_ids = frozenset(self.eos_token_ids) | frozenset(params.stop_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids))
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.admitted_once = False
        # Sequence groups (engine/sequence_group.py): the group this sequence belongs to, the token count
        # it stops computing at until its siblings fork from it (None: compute every token), and the
        # sibling sequences it will fork into once admitted (the scheduler keeps seats for them).
        self.group = None
        self.fork_point: int | None = None
        self.num_pending_forks = 0
        self.candidates = None  # a beam's top continuations (token ids, logprobs) of its last computed token
        self.num_output_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host knows (all_token_ids minus its trailing placeholders)."""
        return self.num_prompt_tokens + len(self.output_token_ids)

    def add_placeholder(self, max_model_len: int) -> None:
        """A step that samples this request's next token was launched (async scheduling)."""
        self.num_output_placeholders += 1
        outputs = len(self.output_token_ids) + self.num_output_placeholders
        if outputs < self.params.max_tokens and self.num_prompt_tokens + outputs < max_model_len:
            self.all_token_ids.append(PLACEHOLDER)  # the request goes on after it: a later step computes it

    def resolve_placeholder(self, token_id, now: float, max_model_len: int) -> RequestStatus | None:
        """The oldest placeholder's token arrived: record it as add_output_token does; returns the finished status
        it leads to (None to continue). A request it finishes drops its later placeholders (their tokens, computed
        by a step launched before the stop was known, are discarded)."""
        outputs, tokens = self.output_token_ids, self.all_token_ids
        i = self.num_prompt_tokens + len(outputs)  # num_known_tokens, inlined: once per request and step
        if i < len(tokens):
            tokens[i] = token_id
        else:
            tokens.append(token_id)
        self.num_output_placeholders -= 1
        outputs.append(token_id)
        m = self.metrics
        m.num_output_tokens += 1
        m.token_times.append(now)
        if m.first_token_time is None:
            m.first_token_time = now
        status = self._status(token_id, max_model_len, i + 1)
        if status is not None:
            self.drop_placeholders()
        return status

    def drop_placeholders(self) -> None:
        """Forget the tokens of steps in flight (the request finished, or a failed step is rolled back)."""
        del self.all_token_ids[self.num_known_tokens:]
        self.num_output_placeholders = 0

    def append_output_token(self, token_id: int, now: float) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.metrics.num_output_tokens += 1
        self.metrics.token_times.append(now)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now

    def add_output_token(self, token_id: int, now: float, max_model_len: int) -> RequestStatus | None:
        """append_output_token then check_stop in one call (the scheduler's per-token path): the finished status
        the token leads to, or None to continue."""
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        m = self.metrics
        m.num_output_tokens += 1
        m.token_times.append(now)
        if m.first_token_time is None:
            m.first_token_time = now
        return self._status(token_id, max_model_len, len(self.all_token_ids))

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token leads to, or None to continue."""
        return self._status(self.output_token_ids[-1], max_model_len, len(self.all_token_ids))

    def _status(self, last: int, max_model_len: int, num_tokens: int) -> RequestStatus | None:
        """The stop test of the latest token `last`, the request then holding num_tokens known tokens."""
        if last in self._stop_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.params.max_tokens or num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the output tokens' log-probabilities, when the sampler computed them (params.logprobs)."""
        if self.params.logprobs is None:
            return None
        return float(sum(getattr(t, "logprob", 0.0) for t in self.output_token_ids))


@dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's shape): index among the request's sequences, its
    token ids, text, cumulative log-probability (None when not computed) and finish reason."""

    index: int
    token_ids: list[int]
    text: str | None
    cumulative_logprob: float | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    """What the engine hands back for a request: its tokens so far, text, and timings.

    outputs: the completions (k of them for SamplingParams(n=k), beam_width for beam search, best
    first); token_ids, text and finish_reason are those of outputs[0].
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    outputs: list[CompletionOutput] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.outputs:
            self.outputs = [CompletionOutput(0, self.token_ids, self.text, None, self.finish_reason)]


class SequenceGroup:
    """The sequences of one request.

    Invariants:
    - seqs are the unfinished sequences (for beam search: the live beams, in the order of state.scores),
      finished the finished ones (parallel sampling); a sequence is in exactly one of them.
    - Root phase (root is not None): root is in the scheduler's waiting or running queue with its
      fork_point set; the other sequences of seqs are parked (parked), hold no block and are in no
      queue. Otherwise every sequence of seqs is in scheduler.running, or (a group that could share
      nothing on re-entry) in the waiting queue.
    - reserved: seats this group holds in scheduler.num_reserved_seqs (admitted, not yet forked).
    """

    def __init__(self, request_id: str, prompt: list[int], arrival: float, size: int,
                 params: SamplingParams | None = None, beam: BeamSearchParams | None = None):
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.params, self.beam = params, beam
        self.size = size
        self.metrics = RequestMetrics(arrival_time=arrival, num_prompt_tokens=len(prompt))
        self.seqs: list[Request] = []
        self.finished: list[Request] = []
        self.root: Request | None = None
        self.parked: list[Request] = []
        self.reserved = 0
        self.queued = False          # queued_root waits for admission
        self.queued_root: Request | None = None
        self.state: BeamSearchState | None = None
        self.status = RequestStatus.WAITING
        self.first_admission: Request | None = None
        self._next_seq = 0

    def new_seq_id(self) -> str:
        self._next_seq += 1
        return f"{self.request_id}#{self._next_seq - 1}"

    @property
    def seq_ids(self) -> list[str]:
        """The request ids of every sequence the group has had (live, finished, dropped beams)."""
        return [f"{self.request_id}#{i}" for i in range(self._next_seq)]

    @property
    def ready_for_beam_step(self) -> bool:
        return (self.state is not None and self.root is None and not self.queued
                and all(s.candidates is not None for s in self.seqs))

    def output(self, tokenizer=None) -> RequestOutput:
        """The group's RequestOutput: beams best first, or the sequences in index order (best_of: the n
        with the highest cumulative logprob)."""
        group = self
        def text(ids):
            return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None

        aborted = group.status is RequestStatus.FINISHED_ABORTED
        if group.state is not None:
            hyps = [] if aborted else group.state.hypotheses()
            outputs = [CompletionOutput(i, [int(t) for t in h.token_ids], text(h.token_ids), h.cumulative_logprob,
                                        "stop" if h.finished_by_eos else "length") for i, h in enumerate(hyps)]
        else:
            seqs = sorted(group.finished + group.seqs, key=lambda s: int(s.request_id.rsplit("#", 1)[1]))
            outputs = [CompletionOutput(i, [int(t) for t in s.output_token_ids], text(s.output_token_ids),
                                        s.cumulative_logprob, s.status.value if s.status.finished else None)
                       for i, s in enumerate(seqs)]
            n = group.params.n
            if group.params.best_of is not None and group.params.best_of > n:
                outputs = sorted(outputs, key=lambda o: o.cumulative_logprob, reverse=True)[:n]
        first = outputs[0] if outputs else CompletionOutput(0, [], None, None, "abort")
        return RequestOutput(request_id=group.request_id, prompt_token_ids=group.prompt_token_ids,
                             token_ids=first.token_ids, text=first.text, finished=True,
                             finish_reason=first.finish_reason, metrics=group.metrics, outputs=outputs)
