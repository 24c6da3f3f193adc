"""LLM (the user API: load, generate, reconfigure) and LLMEngine (the step API and its counters)."""
from __future__ import annotations

import copy
import gc
import itertools
import time
from pathlib import Path

import torch

from .async_step import InFlightStep
from .config import EngineConfig
from .distributed import TPRunner, check_tensor_parallel_config
from .kernels import compile_watch
from .kv import KVCacheManager
from .kv.groups import engine_kv_groups, request_blocks
from .kv.hybrid import HybridKVCacheManager
from .model.llama import LlamaModel
from .model.presets import PRESETS, preset_config
from .model.spec import ModelSpec
from .model.weights import build_model, convert_hf_state_dict, load_checkpoint_state, load_hf_config, weight_bytes
from .quant import check_quantization, quantize_model
from .quant.checkpoint import load_prequantized_checkpoint
from .request import CompletionOutput, Request, RequestOutput, RequestStatus, SequenceGroup
from .memory import CPU_KV_BUDGET_BYTES, DRAFT_EXTRA_SHARE, check_host_memory, draft_memory_share, size_kv_cache
from .memory import VERDICTS as MEMORY_VERDICTS
from .runner import ModelRunner, Runner
from .sampling import BeamSearchParams, SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence_group import SequenceGroups
from .stats import EngineStats, SpecDecodeStats, StepStats, expert_imbalance
from .timeline import RequestLog


class LLMEngine:
    """The step API over one KV cache and scheduler: add_request, step, abort_request, stats.

    Each step schedules a batch, runs it, samples, and appends one StepStats. Bad requests are
    rejected in add_request, before any state changes, so the engine stays usable.

    With async scheduling (self.async_scheduling, see engine/async_step.py) a step launches its batch and returns
    the outputs of the previous one, which ran meanwhile: the steps launched and not yet processed are
    self._inflight (at most one between calls), and is empty whenever no request is unfinished.
    """

    def __init__(self, runner: Runner, config: EngineConfig, tokenizer=None, proposer=None):
        self.runner, self.config, self.tokenizer = runner, config, tokenizer
        # Speculative decoding: an engine.spec_decode proposer (None: off). See engine/runner.py for which
        # verification steps replay a CUDA graph.
        self.proposer = proposer
        self.spec = runner.spec
        self.async_scheduling = self._resolve_async_scheduling(runner, config, proposer)
        self._inflight: list[InFlightStep] = []
        num_blocks = runner.determine_num_blocks()
        runner.allocate_kv_cache(num_blocks)
        runner.capture_cuda_graphs()
        groups = getattr(runner, "kv_groups", None)  # sliding-window models: one block table per KV cache group
        self.kv = (KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching) if groups is None else
                   HybridKVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, groups,
                                        config.max_num_batched_tokens))
        self.scheduler = Scheduler(config, self.kv)
        self.groups = SequenceGroups(self.scheduler, self.kv, runner, self.spec.eos_token_ids,
                                     self.scheduler.max_model_len)
        self.requests: dict[str, Request | SequenceGroup] = {}
        self._undelivered: list[RequestOutput] = []  # finished by a step that then failed (see step())
        self.kernel_profiler = None  # an engine.profiling.KernelProfiler while profile="kernels" runs
        self.timeline_enabled = True  # see set_timeline
        self.reset_stats()

    @staticmethod
    def _resolve_async_scheduling(runner, config: EngineConfig, proposer) -> bool:
        """EngineConfig.async_scheduling for this runner: None (auto) is on for CUDA where it is supported; True
        where it is not raises ValueError saying what to change."""
        wanted = config.async_scheduling
        if wanted is False:
            return False
        why = None
        if not isinstance(runner, ModelRunner):
            why = "tensor_parallel_size > 1"
        elif getattr(runner, "kv_groups", None) is not None:
            why = "the model has sliding-window layers (several KV cache groups)"
        elif proposer is not None:
            why = "speculative decoding is on"
        if wanted and why is not None:
            raise ValueError(f"async_scheduling=True is not supported here ({why}); use async_scheduling=None "
                             "(auto) or False")
        return why is None and (bool(wanted) or runner.device.type == "cuda")

    # ----- requests -----------------------------------------------------------------------------
    def validate_request(self, request_id: str, prompt_token_ids, params: SamplingParams) -> list[int]:
        """Check a request without changing anything; returns the prompt as a list of ints."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise ValueError(f"params must be a SamplingParams (or BeamSearchParams), got {type(params).__name__}")
        if isinstance(prompt_token_ids, str):
            prompt_token_ids = self._encode(prompt_token_ids)
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty; give at least one token")
        vocab = self.spec.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        logprobs = getattr(params, "logprobs", None)
        if logprobs is not None and logprobs > vocab:
            raise ValueError(f"logprobs={logprobs} is not allowed: logprobs must be None or an integer from 0 to the "
                             f"vocabulary size ({vocab})")
        max_len = self.config.max_model_len
        if len(ids) > max_len:
            raise ValueError(f"request {request_id!r}: the prompt has {len(ids)} tokens, more than "
                             f"max_model_len={max_len}; shorten it or raise max_model_len")
        # The longest this request can grow; the pool must hold it alone, or it would preempt itself forever.
        longest = min(len(ids) + params.max_tokens, max_len)
        if self.kv.blocks_needed(longest) > self.kv.num_blocks:
            raise ValueError(f"request {request_id!r}: {longest} tokens need {self.kv.blocks_needed(longest)} KV "
                             f"blocks but the pool has {self.kv.num_blocks}; lower max_tokens or enlarge the pool")
        self._validate_group(request_id, params, longest)
        return ids

    def _validate_group(self, request_id: str, params, longest: int) -> None:
        """A request of several sequences (n, best_of, beam search) must fit the engine as a whole."""
        beam = isinstance(params, BeamSearchParams)
        size = params.beam_width if beam else params.num_sequences
        if size == 1 and not beam:
            return
        what = f"beam_width={size}" if beam else f"{'best_of' if params.best_of else 'n'}={size}"
        if self.config.async_scheduling:
            raise ValueError(f"request {request_id!r}: {what} is not run with async_scheduling=True; use one sequence "
                             "per request, or async_scheduling=None (auto: synchronous steps while such requests run) "
                             "or False")
        if self.config.tensor_parallel_size > 1:
            raise ValueError(f"request {request_id!r}: {what} needs tensor_parallel_size=1 (block copies are not "
                             "implemented for tensor parallelism)")
        if self.proposer is not None:
            raise ValueError(f"request {request_id!r}: {what} is not combined with speculative decoding; use one "
                             "sequence per request or speculative_method=None")
        if size > self.config.max_num_seqs:
            raise ValueError(f"request {request_id!r}: {what} is more than max_num_seqs={self.config.max_num_seqs}; "
                             "lower it or raise max_num_seqs")
        # Sequences recomputed after a preemption share only their common prefix: the pool must hold them all.
        need = size * self.kv.blocks_needed(longest)
        if need > self.kv.num_blocks:
            raise ValueError(f"request {request_id!r}: {what} sequences of up to {longest} tokens need {need} KV "
                             f"blocks but the pool has {self.kv.num_blocks}; lower max_tokens or {what.split('=')[0]}, "
                             "or enlarge the pool")
        if beam:
            k = max(2, 1 + (0 if params.ignore_eos else len(self.spec.eos_token_ids))) * size
            if k > self.spec.vocab_size:
                raise ValueError(f"request {request_id!r}: {what} keeps {k} candidates a step, more than the "
                                 f"vocabulary ({self.spec.vocab_size}); lower beam_width")

    def add_request(self, request_id: str, prompt_token_ids, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        ids = self.validate_request(request_id, prompt_token_ids, params)
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        if isinstance(params, BeamSearchParams):
            self.requests[request_id] = self.groups.add_beam_search(request_id, ids, params, arrival)
            return
        if params.num_sequences > 1:
            self.requests[request_id] = self.groups.add_sampling(request_id, ids, params, arrival)
            return
        req = Request(request_id, ids, params, arrival, self.spec.eos_token_ids)
        self.requests[request_id] = req
        self.scheduler.add_request(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix, so that the next requests start from a cold cache (a repeated
        measurement of one workload would otherwise reuse the previous run's prompts). Only while no request
        is in the engine (RuntimeError otherwise, nothing changed); returns the number of blocks forgotten."""
        self.drain()
        if self.has_unfinished_requests():
            raise RuntimeError(f"reset_prefix_cache: {self.scheduler.num_unfinished} requests are unfinished; "
                               "finish or abort them first")
        return self.kv.pool.reset_prefix_cache()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.drain()  # async scheduling: the request's state is exact once its step in flight is processed
        for i, out in enumerate(self._undelivered):
            if out.request_id == request_id:
                return self._undelivered.pop(i)
        if request_id in self.groups.groups:
            group = self.groups.abort(request_id, time.perf_counter())
            del self.requests[request_id]
            self._forget_timeline(group)
            return self._output(group)
        req = self.scheduler.abort(request_id, time.perf_counter())
        if req is None:
            return None
        del self.requests[request_id]
        self.runner.release(request_id)
        self._request_log.forget(request_id)
        if self.proposer is not None:
            self.proposer.release(request_id)
        return self._output(req)

    # ----- one iteration ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one batch; returns the outputs of the requests that finished in it (with async
        scheduling: launches the batch and returns the outputs of the requests the previous step finished, which the
        device ran meanwhile; see engine/async_step.py).

        If the step raises (KeyboardInterrupt included), it is rolled back before the exception propagates
        (Scheduler.rollback): its requests wait to be recomputed, no block it wrote stays in the prefix cache,
        and requests it had already finished are returned by the next step.
        """
        use_async = self.async_scheduling and self.proposer is None and not self.groups.active
        if not use_async:
            self.drain()  # falling back to a synchronous step (rolls back itself if it fails)
        try:
            outputs = self._step_async() if use_async else self._step()
        except BaseException:
            self._rollback_async() if use_async else self._rollback()
            raise
        if self._undelivered:
            outputs, self._undelivered = self._undelivered + outputs, []
        return outputs

    def _rollback(self) -> None:
        finished = self.scheduler.rollback()
        # Sequence groups re-enter whole; the groups the step finished (or that are complete now) are delivered.
        finished = self.groups.rollback(finished, time.perf_counter())
        # Whatever a fork interrupted half-way left in the KV cache: after the rollback only running requests
        # (those the step did not schedule) hold blocks.
        self.kv.free_unowned({r.request_id for r in self.scheduler.running})
        for req in finished:
            self.requests.pop(req.request_id, None)
            self._forget_timeline(req)
            self._undelivered.append(self._output(req))
        self.runner.release_all()

    # ----- async scheduling (engine/async_step.py) ------------------------------------------------
    def drain(self) -> None:
        """Async scheduling: wait for the steps in flight and process them (their finished requests are returned
        by the next step()), so that every request's state is exact; a no-op without steps in flight."""
        if not self._inflight:
            return
        try:
            self._drain()
        except BaseException:
            self._rollback_async()
            raise

    def _drain(self) -> None:
        while self._inflight:
            self._process(self._inflight[0])

    def _step_async(self) -> list[RequestOutput]:
        """Schedule and launch a batch, then process the previous step's outputs while the device runs it."""
        profiler = self.kernel_profiler
        if profiler is not None:
            profiler.before_step(len(self._steps))
        start = time.perf_counter()
        queries, hits = self.kv.prefix_cache_queries, self.kv.prefix_cache_hits
        sched = self.scheduler.schedule()
        prev = self._inflight[0] if self._inflight else None
        launched, recomputed = None, 0
        t_execute = time.perf_counter()
        if sched.is_empty:
            self.scheduler.commit()
            if prev is None:
                if self.scheduler.waiting and not sched.preempted:
                    raise RuntimeError("the scheduler could not run any request (no free KV block); this is a bug")
                return []
        else:
            for req in sched.preempted:
                self.runner.release(req.request_id)
            recomputed = self._request_log.on_schedule(len(self._steps), sched) if self.timeline_enabled else 0
            t_execute = time.perf_counter()
            launched = self.runner.launch(sched, prev)
            self.scheduler.advance(sched)
            # Every write of the blocks this step registered is queued on the device: a failure from here on waits
            # for the device (_rollback_async), after which they hold their KV.
            self.scheduler.commit()
            self._inflight.append(launched)
        wait, discarded, hidden = 0.0, 0, 0.0
        if prev is not None:
            t_wait = time.perf_counter()
            if not prev.done:  # the host got here while the device was still busy: what it did so far was hidden
                hidden = t_wait - start - (launched.result.device_wait if launched is not None else 0.0)
            wait, discarded = self._process(prev)
            t_processed = time.perf_counter()
            if launched is not None and not launched.done:
                hidden += t_processed - t_wait - wait
        if launched is not None and not self.scheduler.num_unfinished and self._inflight:
            # The last requests finished: the step in flight only computes discarded tokens; drain it.
            w, d = self._process(launched)
            wait, discarded = wait + w, discarded + d
        if launched is not None:
            result = launched.result
            # After processing prev, not at the launch: a trim waits for the device (async_step.py).
            t_trim = time.perf_counter()
            if self.runner.trim_reserved(launched.shape):
                result.device_wait += time.perf_counter() - t_trim
            result.device_wait += wait
            self._record_step(sched, result, start, time.perf_counter(), self.kv.prefix_cache_queries - queries,
                              self.kv.prefix_cache_hits - hits, t_execute, recomputed, len(sched.block_copies),
                              num_sampled=len(launched.samplers))
            step = self._steps[-1]
            step.async_scheduling, step.token_wait_time = True, wait
            step.hidden_host_time, step.num_discarded_tokens = hidden, discarded
        if profiler is not None and launched is not None and profiler.after_step(len(self._steps) - 1):
            self.stop_kernel_profile()
        return []  # the outputs are in self._undelivered, which step() returns

    def _process(self, step: InFlightStep) -> tuple[float, int]:
        """Read a launched step's tokens and apply them; the outputs of the requests it finished join
        self._undelivered (a finished request leaves self.requests as its output is queued). Returns (seconds waited
        for the device, tokens discarded). The step leaves self._inflight last, so that a failure half-way is rolled
        back with it (_rollback_async)."""
        t0 = time.perf_counter()
        sampled = step.read()
        now = time.perf_counter()
        finished, discarded = self.scheduler.update_from_async_output(step.sched, sampled, now)
        for req in finished:
            self.runner.release(req.request_id)
            self._forget_timeline(req)
            self._undelivered.append(self._output(req))
            del self.requests[req.request_id]
        self._num_generation_tokens += len(sampled) - discarded
        self._inflight.remove(step)
        return now - t0, discarded

    def _rollback_async(self) -> None:
        """A failed async step call (or drain): wait for what the device was given, drop every placeholder, and roll
        back the requests of the steps not processed and of the one being scheduled, as _rollback does for a
        synchronous step (they are recomputed from their known tokens). Requests a half-processed step finished
        whose outputs were not queued yet are delivered by the next step."""
        if self.runner.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.runner.device)
            except Exception:  # a device error: the original exception is the one to report
                pass
        steps = [s.sched for s in self._inflight]
        if self.scheduler.current is not None:
            steps.append(self.scheduler.current)
        merged, seen = SchedulerOutput(), set()
        for out in steps:
            for req, num_new in out.scheduled:
                if id(req) in seen:
                    continue
                seen.add(id(req))
                req.drop_placeholders()
                rid = req.request_id
                if req.status.finished:
                    if self.requests.get(rid) is req:  # finished by the failed call, its output not queued yet
                        self.runner.release(rid)
                        self._forget_timeline(req)
                        self._undelivered.append(self._output(req))
                        del self.requests[rid]
                    continue
                if req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                    continue  # preempted while its token was in flight: waits with no KV already
                merged.scheduled.append((req, num_new))
        sched = self.scheduler
        for req in sched.waiting:  # preempted ones whose step was processed keep no placeholder anyway
            req.drop_placeholders()
        # A step interrupted inside update_from_async_output leaves the requests it finished in their queue.
        sched.running = [r for r in sched.running if not r.status.finished]
        if any(r.status.finished for r in sched.waiting):
            sched.waiting = type(sched.waiting)(r for r in sched.waiting if not r.status.finished)
        self._inflight = []
        sched.current = merged
        self._rollback()

    def _forget_timeline(self, req: Request | SequenceGroup) -> None:
        """Drop a finished request's timeline entries (for a group: those of each of its sequences)."""
        log = self._request_log
        log.forget(req.request_id)
        if isinstance(req, SequenceGroup):
            for seq_id in req.seq_ids:
                log.forget(seq_id)

    def _step(self) -> list[RequestOutput]:
        profiler = self.kernel_profiler
        if profiler is not None:  # before the step's clock starts: the profiler's own time is not the step's
            profiler.before_step(len(self._steps))
        start = time.perf_counter()
        queries, hits = self.kv.prefix_cache_queries, self.kv.prefix_cache_hits
        drafts, draft_time = self._propose() if self.proposer is not None else (None, 0.0)
        sched = self.scheduler.schedule(drafts) if drafts else self.scheduler.schedule()
        groups = self.groups.active
        if groups:
            self.groups.after_schedule(sched)  # a group is preempted as a whole
        if sched.is_empty:
            if self.scheduler.waiting and not sched.preempted:
                raise RuntimeError("the scheduler could not run any request (no free KV block); this is a bug")
            # Only sequence groups preempted as a whole leave a step with nothing to run; they wrote nothing.
            self.scheduler.commit()
            self.groups.commit()
            return []
        for req in sched.preempted:
            self.runner.release(req.request_id)
        recomputed = self._request_log.on_schedule(len(self._steps), sched) if self.timeline_enabled else 0
        t_execute = time.perf_counter()
        result = self.runner.execute(sched)  # applies sched.block_copies (copy-on-write) before the forward pass
        now = time.perf_counter()
        sampled = self.groups.take_candidates(result.sampled) if groups else result.sampled
        if sched.spec_drafts:
            finished = self.scheduler.update_from_output(sched, sampled, now, result.spec_sampled)
            for rid in sched.spec_drafts:  # the tables of verified requests shrank to their accepted tokens
                self.runner.truncate_row(rid, len(self.kv.block_ids(rid)))
        else:
            finished = self.scheduler.update_from_output(sched, sampled, now)
        if groups:
            finished = self.groups.after_update(finished, now)
        for req in finished:
            del self.requests[req.request_id]
            self.runner.release(req.request_id)
            self._forget_timeline(req)
            if self.proposer is not None:
                self.proposer.release(req.request_id)
        outputs = [self._output(req) for req in finished]
        self._record_step(sched, result, start, time.perf_counter(), self.kv.prefix_cache_queries - queries,
                          self.kv.prefix_cache_hits - hits, t_execute, recomputed, len(sched.block_copies))
        if self._spec is not None:
            self._record_spec(sched, result, draft_time)
        self.scheduler.commit()
        self.groups.commit()
        if profiler is not None and profiler.after_step(len(self._steps) - 1):
            self.stop_kernel_profile()
        return outputs

    def set_proposer(self, proposer) -> None:
        """Switch speculative decoding's proposer (an engine.spec_decode proposer, or None for off) without
        rebuilding the engine, e.g. to interleave arms of a benchmark; resets the counters (reset_stats)."""
        if self.has_unfinished_requests():
            raise ValueError("set_proposer() with unfinished requests: finish or abort them first")
        if proposer is not None and self.config.tensor_parallel_size != 1:
            raise ValueError("speculative decoding needs tensor_parallel_size=1")
        if proposer is not None and self.config.async_scheduling:
            raise ValueError("speculative decoding is not combined with async_scheduling=True; build the engine with "
                             "async_scheduling=None (auto: synchronous steps while a proposer is set) or False")
        self.drain()
        self.proposer = proposer
        self.reset_stats()

    def set_async_scheduling(self, enabled: bool | None) -> None:
        """Switch async scheduling on (True), off (False) or to the automatic choice (None) without rebuilding the
        engine, e.g. to interleave the arms of a benchmark; the step in flight is processed first. Raises ValueError
        (changing nothing) where True is not supported (see EngineConfig.async_scheduling)."""
        config = self.config.replace(async_scheduling=enabled)
        resolved = self._resolve_async_scheduling(self.runner, config, self.proposer)
        if enabled and self.groups.active:
            raise ValueError("set_async_scheduling(True) while a request of several sequences runs; finish or abort "
                             "it first, or use None (auto)")
        self.drain()
        self.config, self.async_scheduling = config, resolved

    def _propose(self):
        """Drafts for the decoding requests (their last token is the only one not computed): ({request_id:
        Draft}, seconds). Each is asked for at most num_speculative_tokens, fewer near max_tokens or
        max_model_len, so that every verified token can be kept."""
        t0 = time.perf_counter()
        k, max_len = self.config.num_speculative_tokens, self.config.max_model_len
        requests, limits = [], []
        for req in self.scheduler.running:
            if req.num_computed_tokens != req.num_tokens - 1:
                continue
            limit = min(k, req.params.max_tokens - len(req.output_token_ids) - 1, max_len - req.num_tokens - 1)
            if limit > 0:
                requests.append(req)
                limits.append(limit)
        drafts = self.proposer.propose(requests, limits) if requests else {}
        return drafts, time.perf_counter() - t0

    def _record_spec(self, sched, result, draft_time: float) -> None:
        spec, step = self._spec, self._steps[-1]
        spec.draft_time += draft_time
        spec.step_time += step.duration
        step.draft_time = draft_time
        for rid, draft in sched.spec_drafts.items():
            tokens = result.spec_sampled.get(rid)
            if tokens is None:
                continue
            spec.record(len(draft), len(tokens) - 1)
            step.num_draft_tokens += len(draft)
            step.num_accepted_tokens += len(tokens) - 1

    def set_timeline(self, enabled: bool) -> None:
        """Switch the always-on timeline's CUDA events and request events off (False) or on: for measuring
        their cost. Off, device_time stays NaN and request_events empty; the host-phase marks remain."""
        self.timeline_enabled = bool(enabled)
        if self._timer is not None:
            self._timer.enabled = self.timeline_enabled

    def profile_kernels(self, first_step: int = 0, num_steps: int | None = None) -> None:
        """Deep mode: run torch.profiler over steps [first_step, first_step + num_steps) counted from the last
        reset_stats() (num_steps None: until stop_kernel_profile()); the kernels land in stats().kernel_profile."""
        from .profiling import KernelProfiler
        if self.kernel_profiler is not None:
            raise ValueError("a kernel profile is already running; call stop_kernel_profile() first")
        self.kernel_profiler = KernelProfiler(self.runner.device, first_step, num_steps)

    def stop_kernel_profile(self):
        """End the deep-mode window now (if any); returns the KernelProfile (None if no step was profiled)."""
        profiler, self.kernel_profiler = self.kernel_profiler, None
        if profiler is not None:
            self._kernel_profile = profiler.stop()
        return self._kernel_profile

    def _record_step(self, sched, result, start, now, queries, hits, t_execute=None, recomputed=0,
                     cows=0, num_sampled: int | None = None) -> None:
        """num_sampled: async scheduling, the step's sampled rows (its tokens are counted as generated when read)."""
        kv, bs = self.kv, self.config.block_size
        used = kv.num_used_blocks
        load = self._expert_load(sched.num_batched_tokens)
        wasted = kv.wasted_slots(self.scheduler.running)
        t_execute = start if t_execute is None else t_execute
        runner_time = result.prepare_time + result.launch_time + result.sample_time
        step = StepStats(
            time=now, duration=now - start, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_batched_tokens=sched.num_batched_tokens,
            num_prefill_tokens=sched.num_prefill_tokens, num_decode_tokens=sched.num_decode_tokens,
            num_used_blocks=used, num_free_blocks=kv.num_free_blocks,
            num_cached_blocks=kv.num_cached_free_blocks, kv_usage=used / kv.num_blocks,
            internal_fragmentation=wasted / (used * bs) if used else 0.0,
            prefix_cache_queries=queries, prefix_cache_hits=hits, num_preemptions=len(sched.preempted),
            num_sampled_tokens=(len(result.sampled) + sum(map(len, result.spec_sampled.values())) if num_sampled is None
                                else num_sampled),
            num_kv_tokens_read=result.num_kv_tokens_read,
            num_attention_scores=result.num_attention_scores,
            host_time=(now - start) - result.device_wait,
            cuda_graph=result.used_cuda_graph,
            # The phases tile [start, now]: output processing is what the others leave.
            start=start, schedule_time=t_execute - start, prepare_time=result.prepare_time,
            launch_time=result.launch_time, sample_time=result.sample_time,
            output_time=(now - t_execute) - runner_time, num_padding_tokens=result.num_padding_tokens,
            num_recompute_tokens=recomputed, num_decode_kv_tokens_read=result.num_decode_kv_tokens_read,
            expert_imbalance=expert_imbalance(load), num_shared_blocks=kv.num_shared_blocks,
            num_saved_blocks=kv.num_saved_blocks, num_cow_copies=cows, group_used_blocks=kv.group_used_blocks())
        self._steps.append(step)
        if self._timer is not None:
            self._timer.attach(step, result.device_span)
        self._num_prompt_tokens += sched.num_prefill_tokens
        if num_sampled is None:
            self._num_generation_tokens += len(result.sampled) + sum(map(len, result.spec_sampled.values()))
        self._num_cow_copies += cows

    def _expert_load(self, num_tokens: int):
        """This step's tokens per expert per MoE layer ([layers, experts] tensor on the device, added to the
        running totals there); None for dense models (and under tensor parallelism, whose runner holds no model
        here)."""
        model = getattr(self.runner, "model", None)
        load = model.expert_load(num_tokens) if model is not None and hasattr(model, "expert_load") else None
        if load is not None:
            self._expert_tokens = load.clone() if self._expert_tokens is None else self._expert_tokens.add_(load)
        return load

    def _output(self, req: Request | SequenceGroup) -> RequestOutput:
        if isinstance(req, SequenceGroup):
            return req.output(self.tokenizer)
        finished = req.status.finished
        text = None
        if finished and self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        token_ids = list(req.output_token_ids)
        reason = req.status.value if finished else None
        return RequestOutput(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                             token_ids=token_ids, text=text, finished=finished, finish_reason=reason,
                             metrics=req.metrics,
                             outputs=[CompletionOutput(0, token_ids, text, req.cumulative_logprob, reason)])

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this model has none, so pass token ids")
        return self.tokenizer.encode(text)

    # ----- counters -----------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.drain()  # async scheduling: the step in flight counts before the reset
        self._steps: list[StepStats] = []
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._kernel_profile = None
        self._expert_tokens = None  # MoE: a [moe layers, experts] tensor on the device
        self._spec = (SpecDecodeStats(self.proposer.name, self.config.num_speculative_tokens)
                      if self.proposer is not None else None)
        self._base = (self.kv.prefix_cache_queries, self.kv.prefix_cache_hits, self.scheduler.num_preemptions)
        self._num_cow_copies = 0  # blocks copied on write by the steps since the reset
        compile_watch.install()
        self._compiles_base = len(compile_watch.events)
        # Requests mid-prefill or awaiting recompute keep their entries across a reset; only events go.
        log = getattr(self, "_request_log", None) or RequestLog()
        log.events = []
        self._request_log = log
        # A tensor-parallel runner times the forward on rank 0's ModelRunner.
        self._timer = getattr(self.runner, "device_timer", None) or getattr(
            getattr(self.runner, "runner", None), "device_timer", None)
        if self._timer is not None:
            self._timer.reset()

    def last_step_stats(self) -> StepStats | None:
        """The StepStats of the latest step since reset_stats() (None before one), without copying the history."""
        return self._steps[-1] if self._steps else None

    def stats(self) -> EngineStats:
        self.drain()  # async scheduling: counters of the step in flight included
        kv, runner = self.kv.snapshot(), self.runner
        q0, h0, p0 = self._base
        if self._timer is not None:
            self._timer.flush()  # the device times of the last steps (waits for the device once)
        dev = runner.device
        return EngineStats(
            num_gpu_blocks=kv.num_blocks, block_size=self.config.block_size, num_used_blocks=kv.num_used_blocks,
            num_free_blocks=kv.num_free_blocks, num_cached_blocks=kv.num_cached_blocks,
            prefix_cache_queries=kv.prefix_cache_queries - q0, prefix_cache_hits=kv.prefix_cache_hits - h0,
            num_preemptions=self.scheduler.num_preemptions - p0, num_steps=len(self._steps),
            num_prompt_tokens=self._num_prompt_tokens, num_generation_tokens=self._num_generation_tokens,
            attention_backend=runner.backend.name, weight_bytes=weight_bytes(runner.model),
            kv_bytes_per_token=runner.kv_bytes_per_token, quantization=self.config.quantization,
            kv_cache_dtype=self.config.kv_cache_dtype,
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            cuda_graphs=bool(runner.graphs), memory=runner.memory, steps=list(self._steps),
            request_events=list(self._request_log.events), kernel_profile=self._kernel_profile,
            expert_tokens=self._expert_tokens.tolist() if self._expert_tokens is not None else None,
            spec_decode=copy.deepcopy(self._spec),
            num_shared_blocks=kv.num_shared_blocks, num_saved_blocks=kv.num_saved_blocks,
            num_cow_copies=self._num_cow_copies, group_used_blocks=kv.group_used_blocks,
            kv_cache_groups=tuple(g.sliding_window for g in getattr(self.kv, "specs", ())),
            kernel_compiles=tuple(compile_watch.events[self._compiles_base:]),
            async_scheduling=self.async_scheduling)

    def block_map(self) -> dict:
        """A copy of the KV pool's state, for pictures: "blocks" [(ref_count, cached)] per physical block
        (cached: holds a prefix-cache hash), "block_tables" {request_id: [block ids]}, "running"
        {request_id: num_computed_tokens} in admission order, "waiting" [request_id] in queue order."""
        kv, sched = self.kv.snapshot(detail=True), self.scheduler
        out = {"block_size": self.config.block_size,
               "blocks": list(kv.blocks),
               "block_tables": {rid: list(ids) for rid, ids in kv.block_tables.items()},
               "running": {r.request_id: r.num_computed_tokens for r in sched.running},
               "waiting": [r.request_id for r in sched.waiting]}
        if kv.group_block_tables is not None:
            # Sliding-window models: the KV cache groups' windows, each block's group (-1: free) and every table per
            # group (block_tables is group 0's; id num_gpu_blocks marks a slot whose block left the window).
            out.update(kv_cache_groups=[g.sliding_window for g in self.kv.specs], block_groups=list(kv.block_groups),
                       group_block_tables={rid: [list(t) for t in ts] for rid, ts in kv.group_block_tables.items()})
        return out


def _default_device(config: EngineConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLM:
    """A model with its weights loaded once, and an engine over them that reconfigure() can replace."""

    _ids = itertools.count()

    def __init__(self, spec: ModelSpec, state: dict | None, config: EngineConfig | None = None, tokenizer=None,
                 dtype: torch.dtype | None = None, seed: int = 0, calibration: list[list[int]] | None = None,
                 prequantized=None):
        config = config or EngineConfig()
        config = self.resolve_config(spec, config, _default_device(config))
        # quantization "awq"/"gptq": token-id sequences to calibrate on (None: seeded random tokens), or a
        # loaded Hub checkpoint's int4 layers (engine.quant.checkpoint.Prequantized), used as they are.
        self.calibration, self.prequantized = calibration, prequantized
        self.spec, self.tokenizer = spec, tokenizer
        self.device = _default_device(config)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.check_config(spec, config, self.device)
        self._check_weights_fit(config)
        # The unquantized weights stay on the host (random ones: their seed), so that reconfigure() to
        # another quantization or tensor_parallel_size rebuilds the model from them.
        self._host_state = None if state is None else {k: v.detach().to("cpu") for k, v in state.items()}
        self._seed = seed
        # The whole model on self.device, for tensor_parallel_size 1 (None while the engine is tensor-parallel:
        # each rank then holds its shard, and no GPU the whole model).
        self.model: torch.nn.Module | None = None
        self._quantization: str | None = None  # what self.model holds now
        # The draft model of speculative_method "draft" (or a costed "synthetic"), kept across reconfigure.
        self._draft: LLM | None = None
        self._draft_name: str | None = None
        self._engine: LLMEngine | None = None
        self.reconfigure(config)

    def _check_weights_fit(self, config: EngineConfig) -> None:
        if self.device.type != "cuda":
            return
        need = self.spec.num_params() * torch.empty((), dtype=self.dtype).element_size()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = config.gpu_memory_utilization * total * config.tensor_parallel_size
        if need > budget:
            raise ValueError(f"the weights need {need / 2**30:.1f} GiB but gpu_memory_utilization="
                             f"{config.gpu_memory_utilization} of this GPU is {budget / 2**30:.1f} GiB: quantize the "
                             "weights, use more GPUs (tensor_parallel_size) or a smaller model")

    # ----- loaders ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None,
                        dtype: torch.dtype | None = None) -> "LLM":
        """Load an HF checkpoint folder (config.json + safetensors or .bin), offline, with its tokenizer if any.
        An AWQ or GPTQ folder (quantization_config in config.json) runs its own codes under quantization
        "awq"/"gptq" (the default for it when config.quantization is None), dequantized under other modes."""
        hf_config = load_hf_config(path)
        spec = ModelSpec.from_hf_config(hf_config)
        files = [f for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pt") for f in Path(path).glob(pattern)]
        cls._check_host_weights(spec, config, dtype, f"loading {Path(path).name}",
                                sum(f.stat().st_size for f in files))
        raw = load_checkpoint_state(path)
        config, prequantized = load_prequantized_checkpoint(raw, hf_config, spec, config or EngineConfig())
        state = convert_hf_state_dict(raw, spec)
        tokenizer = None
        if any(Path(path).glob("tokenizer*")):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(spec, state, config, tokenizer, dtype, prequantized=prequantized)

    @classmethod
    def from_hf_model(cls, hf_model, config: EngineConfig | None = None, tokenizer=None,
                      dtype: torch.dtype | None = None) -> "LLM":
        """Take the weights of an in-memory transformers *ForCausalLM model (copied, not shared)."""
        spec = ModelSpec.from_hf_config(hf_model.config)
        dtype = dtype or next(hf_model.parameters()).dtype
        cls._check_host_weights(spec, config, dtype, "a copy of this transformers model")
        state = convert_hf_state_dict({k: v.detach() for k, v in hf_model.state_dict().items()}, spec)
        return cls(spec, state, config, tokenizer, dtype)

    @classmethod
    def random(cls, model: str, config: EngineConfig | None = None, dtype: torch.dtype | None = None,
               seed: int = 0) -> "LLM":
        """A preset architecture (see engine.model.PRESETS) or transformers config, with seeded random weights."""
        hf_config = preset_config(model) if isinstance(model, str) else model
        spec = ModelSpec.from_hf_config(hf_config)
        cls._check_host_weights(spec, config, dtype, str(model) if isinstance(model, str) else "this model")
        return cls(spec, None, config, None, dtype, seed)

    @staticmethod
    def _check_host_weights(spec: ModelSpec, config: EngineConfig | None, dtype: torch.dtype | None, what: str,
                            checkpoint_bytes: int = 0) -> None:
        """Before anything is allocated: a checkpoint read into host memory, and on the CPU the model's
        weights as well, must fit the host memory available (else a ValueError, not the kernel's OOM killer)."""
        device = _default_device(config or EngineConfig())
        need = checkpoint_bytes
        if device.type == "cpu":
            dtype = dtype or torch.float32
            need += spec.num_params() * torch.empty((), dtype=dtype).element_size()
            advice = "use a GPU, a smaller model (e.g. the preset 'tiny'), or dtype=torch.bfloat16"
        else:
            advice = "free host memory or use a machine with more"
        name = str(dtype).removeprefix("torch.") if device.type == "cpu" else "checkpoint"
        check_host_memory(f"{what} ({spec.num_params() / 1e9:.2f}B parameters, {name} weights on the host)", need,
                          advice)

    # ----- what the engine accepts, without loading anything -----------------------------------
    CPU_KV_BUDGET_BYTES = CPU_KV_BUDGET_BYTES  # on the CPU, the pool is gpu_memory_utilization x this
    # The engine's sizing rule (engine/memory.py), for planners: bytes in, blocks out, verdict and reason.
    size_kv_cache = staticmethod(size_kv_cache)
    # The share of the device a speculative draft model's engine gets (CUDA), for planners.
    draft_memory_share = staticmethod(draft_memory_share)

    @staticmethod
    def draft_config(config: EngineConfig, draft_spec: ModelSpec, share: float) -> EngineConfig:
        """The config of a speculative draft model's engine: the target's, less speculation and prefix caching (the
        draft keeps one sequence per request across steps, see draft_model.py), max_model_len capped at the draft's
        positions, at gpu_memory_utilization `share` (draft_memory_share on CUDA)."""
        return config.replace(speculative_method=None, speculative_model=None, enable_prefix_caching=False,
                              max_model_len=min(config.max_model_len, draft_spec.max_position_embeddings),
                              gpu_memory_utilization=share)
    # KV cache groups of sliding-window models (engine/kv/groups.py): which the engine keeps for a model, and the
    # blocks one request holds in them; for the planner.
    kv_cache_groups = staticmethod(engine_kv_groups)
    request_kv_blocks = staticmethod(request_blocks)
    MEMORY_VERDICTS = MEMORY_VERDICTS

    @staticmethod
    def presets() -> list[str]:
        """Names LLM.random accepts (published architectures; "tiny" for tests)."""
        return sorted(PRESETS)

    @staticmethod
    def hf_config(preset: str):
        """The transformers config of a preset (the architecture LLM.random builds), e.g. for an HF twin."""
        return preset_config(preset)

    @staticmethod
    def model_spec(model) -> ModelSpec:
        """The shape of a preset name, an HF config (object or dict) or an HF checkpoint folder."""
        if isinstance(model, (str, Path)):
            if str(model) in PRESETS:
                return ModelSpec.from_hf_config(preset_config(str(model)))
            if (Path(model) / "config.json").exists():
                return ModelSpec.from_hf_config(load_hf_config(model))
            raise ValueError(f"model {str(model)!r} is neither a preset ({sorted(PRESETS)}) nor a folder with "
                             "config.json")
        return ModelSpec.from_hf_config(model)

    @staticmethod
    def resolve_config(spec: ModelSpec, config: EngineConfig, device: torch.device | str | None = None,
                       total_bytes: int | None = None, device_name: str = "") -> EngineConfig:
        """The config the engine runs: max_model_len=None becomes the model's context length
        (max_position_embeddings), as in vLLM; max_num_seqs / max_num_batched_tokens left at None are picked
        from the device's memory as vLLM's offline LLM picks them (engine.config.default_batch_limits: 1024 /
        16384 on a GPU of >= 70 GiB other than an A100, else 256 / 8192). The device is total_bytes and
        device_name when given (a planned GPU), else `device` asked (CUDA: its total memory and name); with
        neither, or on the CPU, the CPU's limits."""
        if config.max_model_len is None:
            config = config.replace(max_model_len=spec.max_position_embeddings)
        if total_bytes is None and device is not None and torch.device(device).type == "cuda" and (
                config.max_num_seqs is None or config.max_num_batched_tokens is None):
            props = torch.cuda.get_device_properties(torch.device(device))
            total_bytes, device_name = props.total_memory, props.name
        return config.with_batch_limits(total_bytes, device_name)

    @staticmethod
    def check_config(spec: ModelSpec, config: EngineConfig, device: torch.device | None = None) -> None:
        """Raise the ValueError the engine raises for a config this model cannot run at all (quantization,
        tensor_parallel_size, max_model_len), before anything is built; device None skips what depends on
        the GPUs present (fp8 support, GPU count)."""
        with torch.device("meta"):  # shapes only, for the int4 group-size check
            check_quantization(LlamaModel(spec, 1), config.quantization, device)
        if config.tensor_parallel_size > 1:
            check_tensor_parallel_config(spec, config, device)
        if config.max_model_len is not None and config.max_model_len > spec.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} is more than the model's "
                             f"max_position_embeddings={spec.max_position_embeddings}; lower max_model_len")

    # ----- use ----------------------------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        return self._engine

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def vocab_size(self) -> int:
        """Token ids of prompts must lie in [0, vocab_size)."""
        return self.spec.vocab_size

    def reconfigure(self, config: EngineConfig) -> None:
        """Replace the KV cache and scheduler with ones built from `config`; the weights stay loaded."""
        if self._engine is not None and self._engine.has_unfinished_requests():
            raise ValueError("reconfigure() with unfinished requests would drop them: finish or abort them first")
        config = self.resolve_config(self.spec, config, self.device)
        self.check_config(self.spec, config, self.device)
        if _default_device(config) != self.device:
            raise ValueError(f"device={config.device!r} differs from the device the weights are on ({self.device}); "
                             "load the model again to move it")
        previous = self._engine.config if self._engine is not None else None
        # Same tensor-parallel degree: the workers and their shards stay, only each rank's runner is rebuilt.
        kept = self._tp_runner_for(config)
        self._release_engine(keep_runner=kept is not None)
        try:
            self._build_engine(config, kept)
        except BaseException:
            # The new setting does not fit (say, too little KV for max_model_len): put the old engine back,
            # so that a failed point of a sweep leaves a usable LLM behind, then report the error.
            self._release_engine()
            if kept is not None:
                kept.close()
            if previous is not None:
                self._build_engine(previous)
            raise

    def _tp_runner_for(self, config: EngineConfig):
        """The current tensor-parallel runner if `config` can reuse it (same degree, still open), else None."""
        runner = self._engine.runner if self._engine is not None else None
        if isinstance(runner, TPRunner) and not runner.closed and runner.world_size == config.tensor_parallel_size:
            return runner
        return None

    def _release_engine(self, keep_runner: bool = False) -> None:
        """Drop the engine and its KV cache (and CUDA graphs), returning the memory to the device.
        keep_runner: leave the runner open (a tensor-parallel runner about to be reconfigured frees its ranks'
        KV caches and graphs itself, and keeps its workers)."""
        if self._engine is None:
            return
        # The KV cache and CUDA graphs go now (and a tensor-parallel runner's worker processes stop now), not
        # whenever the runner is collected.
        if not keep_runner:
            self._engine.runner.close()
        self._engine = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _build_engine(self, config: EngineConfig, tp_runner: TPRunner | None = None) -> None:
        if tp_runner is not None:
            tp_runner.reconfigure(config)
            runner = tp_runner
        elif config.tensor_parallel_size > 1:
            self._drop_model()  # rank 0's GPU holds a shard, not the whole model as well
            runner = TPRunner(self.spec, self._host_state, config, self.device, self.dtype, self._seed)
        else:
            if self.model is None or config.quantization != self._quantization:
                if self.model is None or self._quantization is not None:  # else quantize the float model in place
                    self._drop_model()
                    self.model = build_model(self.spec, self._host_state, self.dtype, self.device,
                                             self.spec.max_position_embeddings, self._seed)
                quantize_model(self.model, config.quantization, calibration=self.calibration,
                               prequantized=self.prequantized)
                self._quantization = config.quantization
            runner = ModelRunner(self.model, self.spec, config, self.device, self.dtype)
        # The draft's engine exists before the target sizes its KV pool, which then counts the draft's memory.
        proposer = self._make_proposer(config)
        self._engine = LLMEngine(runner, config, self.tokenizer, proposer)

    def _make_proposer(self, config: EngineConfig):
        """The speculative-decoding proposer of config (None when off); loads the draft model if needed."""
        from .spec_decode import DraftModelProposer, NgramProposer, SyntheticProposer
        method = config.speculative_method
        if method is None or config.speculative_model is None:
            self._drop_draft()
        if method is None:
            return None
        if method == "ngram":
            return NgramProposer()
        draft = self._draft_engine(config) if config.speculative_model is not None else None
        if method == "draft":
            return DraftModelProposer(draft)
        return SyntheticProposer(config.speculative_acceptance, seed=config.seed,
                                 cost_proposer=None if draft is None else DraftModelProposer(draft))

    def _draft_engine(self, config: EngineConfig) -> LLMEngine:
        """The draft model's engine, built from the target's config (speculation off; on CUDA, 15% of the device
        memory on top of what is in use, the target's weights included: engine.memory.draft_memory_share). Raises
        ValueError if the vocabularies differ. Its scheduler is never used: the proposer drives its runner and block
        pool (draft_model.py)."""
        name = config.speculative_model
        draft_spec = self.model_spec(name)
        if draft_spec.vocab_size != self.spec.vocab_size:
            raise ValueError(f"speculative_model={name!r} has vocab_size={draft_spec.vocab_size}, the target "
                             f"{self.spec.vocab_size}: the draft must share the target's vocabulary")
        share = config.gpu_memory_utilization
        if self.device.type == "cuda":
            # An engine only a reference cycle keeps (a notebook's earlier LLM, a finished test's) would count as in
            # use and give the draft its pool: collect it first (as ModelRunner._profile_cuda_memory does).
            gc.collect()
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            share = draft_memory_share(gpu_memory_utilization=share, total_bytes=total, free_bytes=free,
                                       reserved_bytes=torch.cuda.memory_reserved(self.device),
                                       allocated_bytes=torch.cuda.memory_allocated(self.device))
        draft_config = self.draft_config(config, draft_spec, share)
        try:
            if self._draft is not None and self._draft_name == name:
                self._draft.reconfigure(draft_config)
            else:
                self._drop_draft()
                if name in PRESETS:
                    self._draft = LLM.random(name, draft_config, dtype=self.dtype, seed=self._seed + 1)
                else:
                    self._draft = LLM.from_pretrained(name, draft_config, dtype=self.dtype)
                self._draft_name = name
        except ValueError as exc:
            if share == config.gpu_memory_utilization:
                raise
            raise ValueError(f"speculative_model={name!r}, the draft model, runs at gpu_memory_utilization={share:.3f},"
                             f" a draft's share of the device (what is in use when it starts, the target's weights "
                             f"included, plus {DRAFT_EXTRA_SHARE}): {exc}") from exc
        return self._draft.engine

    def _drop_draft(self) -> None:
        """Release the draft model and its KV cache now (before the target sizes its pool)."""
        if self._draft is not None:
            self._draft._release_engine()
            self._draft._drop_model()
            self._draft, self._draft_name = None, None

    def _drop_model(self) -> None:
        """Drop the model. On CUDA, also with no model yet (before every build), return what torch's allocator keeps
        cached to the device: a new model's weights carved from an earlier engine's freed segments would keep those
        segments reserved for as long as the weights live (empty_cache() cannot return a segment with a live block
        in it), and their free space would read as in use (engine.memory.draft_memory_share)."""
        dropped, self.model = self.model is not None, None
        if dropped or self.device.type == "cuda":
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (see LLMEngine.reset_prefix_cache): the next requests start cold."""
        return self._engine.reset_prefix_cache()

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits [len, vocab] (float32, CPU) at every position of token_ids, in one prefill."""
        return self._engine.runner.prompt_logits(self._engine.validate_request("logits", token_ids,
                                                                              SamplingParams()))

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 profile: str | None = None) -> list[RequestOutput]:
        """Run prompts (strings, or lists of token ids) to completion; outputs in prompt order.

        profile="kernels" runs torch.profiler over every step of this call (deep mode): the kernels by
        class are then in llm.engine.stats().kernel_profile.
        """
        if profile not in (None, "kernels"):
            raise ValueError(f"profile={profile!r} is not allowed: use None or 'kernels'")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one, or one each")
        engine = self._engine
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        checked = [engine.validate_request(i, p, sp) for i, p, sp in zip(ids, prompts, params)]
        for i, p, sp in zip(ids, checked, params):
            engine.add_request(i, p, sp)
        done: dict[str, RequestOutput] = {}
        if profile == "kernels":
            engine.stop_kernel_profile()
            engine.profile_kernels(len(engine.stats().steps))
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    done[out.request_id] = out
            if profile == "kernels":
                engine.stop_kernel_profile()
        except BaseException:
            if profile == "kernels":
                engine.stop_kernel_profile()
            # A failed step (or Ctrl-C in a notebook) must not strand requests in the engine.
            for i in ids:
                if i not in done:
                    engine.abort_request(i)
            raise
        return [done[i] for i in ids]

    def beam_search(self, prompts, params: BeamSearchParams) -> list[RequestOutput]:
        """Beam search over each prompt (strings, or lists of token ids); outputs in prompt order, each with
        beam_width completions (outputs), best first, scored as HF transformers scores them."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.generate(prompts, [params] * len(prompts))
