"""Async scheduling (as vLLM v1's): the host schedules and prepares step N+1, and processes step N's outputs, while
step N runs on the device, so that in steady-state decode the device never waits for the host.

How a step call of LLMEngine goes with it on (LLMEngine._step_async):

1. schedule step N+1. Requests of step N are already counted as computed (Scheduler.advance) and hold a
   placeholder for the token step N samples (Request.num_output_placeholders; PLACEHOLDER in all_token_ids where
   the request goes on after that token). Stops by length are known here (no step is scheduled past max_tokens or
   max_model_len); a stop token is found one step late.
2. launch it (ModelRunner.launch): the input ids of placeholder tokens are copied on the device from step N's
   sampled-token tensor (InFlightStep.tokens) after the upload and before the forward pass / CUDA-graph replay;
   the sampled tokens stay on the device, and a non-blocking copy into pinned host memory is recorded with an
   event.
3. process step N (InFlightStep.read waits for its copy): placeholders become tokens, finished requests are
   returned. Only then may step N+1's allocator trim (ModelRunner.trim_reserved) empty the cache: that waits for
   the device, and before step 3 it would hold step N's tokens back until step N+1 ends (stamping them, TTFT and
   TPOT with them, a whole step late). A request that a stop token finished in step N was also computed in step
   N+1: that token is discarded (never returned) and its blocks freed now; the device runs step N+1 before any later
   step that reuses them (one stream).

Exact state is restored by draining (LLMEngine.drain: wait for the step in flight and process it) before aborts,
reconfiguration, switching to synchronous steps, and after the last request finished. A failed step call waits
for the device, drops every placeholder and rolls back the requests of the steps not processed (they are
recomputed from their known tokens), as a synchronous failed step is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .runner import StepResult
    from .scheduler import SchedulerOutput


class InFlightStep:
    """A step launched on the device whose sampled tokens the host has not read yet.

    Invariants: tokens[j] (int64, on the device) is the token sampled for samplers[j], and row_of[request_id] = j
    (what the next step's device-side feed gathers from); host_tokens receives a non-blocking copy of tokens, whole
    once the device has passed `copied` (None on the CPU, where the copy is synchronous). result holds the launch's
    host times and counters (its `sampled` is filled by read()).
    """

    __slots__ = ("sched", "samplers", "tokens", "logprobs", "host_tokens", "copied", "result", "row_of", "sampler",
                 "shape")

    def __init__(self, sched: SchedulerOutput, samplers: list, tokens: torch.Tensor, logprobs,
                 host_tokens: torch.Tensor, copied, result: StepResult, sampler, shape: tuple):
        self.sched, self.samplers, self.tokens, self.logprobs = sched, samplers, tokens, logprobs
        self.host_tokens, self.copied, self.result, self.sampler = host_tokens, copied, result, sampler
        self.shape = shape  # (padded tokens, padded sequences, logit rows): ModelRunner.trim_reserved's step shape
        self.row_of = {r.request_id: j for j, r in enumerate(samplers)}

    @property
    def done(self) -> bool:
        """Whether the device has finished the step (never waits)."""
        return self.copied is None or self.copied.query()

    def read(self) -> dict[str, int]:
        """{request_id: sampled token} (SampledTokens where logprobs were asked for); waits for the device's copy."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens = self.sampler.to_host([r.params for r in self.samplers], self.host_tokens.tolist(), self.logprobs)
        self.result.sampled = sampled = {r.request_id: t for r, t in zip(self.samplers, tokens)}
        return sampled
