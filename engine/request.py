"""Request and its states; RequestOutput with per-request timings (perf_counter seconds)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


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


class Request:
    """One generation request as the scheduler sees it.

    all_token_ids = prompt + generated tokens. num_computed_tokens counts the leading tokens whose
    K/V is in the cache; a request is preempted by resetting it to 0 (recompute).
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
        self.metrics = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids))
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.admitted_once = False
        # Sequence groups (engine/sequence_group.py): the group this sequence belongs to, the token count
        # it stops computing at until its siblings fork from it (None: compute every token), and the
        # sibling sequences it will fork into once admitted (the scheduler keeps seats for them).
        self.group = None
        self.fork_point: int | None = None
        self.num_pending_forks = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output_token(self, token_id: int, now: float) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.metrics.num_output_tokens += 1
        self.metrics.token_times.append(now)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token leads to, or None to continue."""
        last = self.output_token_ids[-1]
        if last in self.eos_token_ids or last in self.params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
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
