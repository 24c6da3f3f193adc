"""LLM (the user API: load, generate, reconfigure) and LLMEngine (the step API and its counters)."""
from __future__ import annotations

import gc
import itertools
import time
from pathlib import Path

import torch

from .config import EngineConfig
from .distributed import TPRunner, check_tensor_parallel_config
from .kv import KVCacheManager
from .model.llama import LlamaModel
from .model.presets import PRESETS, preset_config
from .model.spec import ModelSpec
from .model.weights import build_model, convert_hf_state_dict, load_checkpoint_state, load_hf_config, weight_bytes
from .quant import check_quantization, quantize_model
from .request import CompletionOutput, Request, RequestOutput, SequenceGroup
from .runner import CPU_KV_BUDGET_BYTES, ModelRunner
from .sampling import BeamSearchParams, SamplingParams
from .scheduler import Scheduler
from .sequence_group import SequenceGroups
from .stats import EngineStats, StepStats


class LLMEngine:
    """The step API over one KV cache and scheduler: add_request, step, abort_request, stats.

    Each step schedules a batch, runs it, samples, and appends one StepStats. Bad requests are
    rejected in add_request, before any state changes, so the engine stays usable.
    """

    def __init__(self, runner: ModelRunner, config: EngineConfig, tokenizer=None):
        self.runner, self.config, self.tokenizer = runner, config, tokenizer
        self.spec = runner.spec
        num_blocks = runner.determine_num_blocks()
        runner.allocate_kv_cache(num_blocks)
        runner.capture_cuda_graphs()
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv)
        self.groups = SequenceGroups(self.scheduler, self.kv, runner, self.spec.eos_token_ids, config.max_model_len)
        self.requests: dict[str, Request | SequenceGroup] = {}
        self.reset_stats()

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
        if self.config.tensor_parallel_size > 1:
            raise ValueError(f"request {request_id!r}: {what} needs tensor_parallel_size=1 (block copies are not "
                             "implemented for tensor parallelism)")
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

    def abort_request(self, request_id: str) -> RequestOutput | None:
        if request_id in self.groups.groups:
            group = self.groups.abort(request_id, time.perf_counter())
            del self.requests[request_id]
            return self._output(group)
        req = self.scheduler.abort(request_id, time.perf_counter())
        if req is None:
            return None
        del self.requests[request_id]
        self.runner.release(request_id)
        return self._output(req)

    # ----- one iteration ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one batch; returns the outputs of the requests that finished in it."""
        start = time.perf_counter()
        queries, hits = self.kv.prefix_cache_queries, self.kv.prefix_cache_hits
        cows = self.kv.num_cow_copies
        sched = self.scheduler.schedule()
        groups = self.groups.active
        if groups:
            self.groups.after_schedule(sched)  # a group is preempted as a whole
        if sched.is_empty:
            self.kv.take_pending_copies()  # only sequences preempted in this step could have queued any
            if self.scheduler.waiting and not sched.preempted:
                raise RuntimeError("the scheduler could not run any request (no free KV block); this is a bug")
            return []
        for req in sched.preempted:
            self.runner.release(req.request_id)
        copies, copied = self.kv.take_pending_copies()
        if copies:  # copy-on-write: before the forward pass writes into the copies
            self.runner.copy_blocks(copies)
            for rid in copied:
                self.runner.release(rid)  # its table row changed in place: the runner rewrites it
        result = self.runner.execute(sched, self.kv)
        now = time.perf_counter()
        sampled = self.groups.take_candidates(result.sampled) if groups else result.sampled
        finished = self.scheduler.update_from_output(sched, sampled, now)
        if groups:
            finished = self.groups.after_update(finished, now)
        for req in finished:
            del self.requests[req.request_id]
            self.runner.release(req.request_id)
        outputs = [self._output(req) for req in finished]
        self._record_step(sched, result, start, time.perf_counter(), self.kv.prefix_cache_queries - queries,
                          self.kv.prefix_cache_hits - hits, self.kv.num_cow_copies - cows)
        return outputs

    def _record_step(self, sched, result, start, now, queries, hits, cows=0) -> None:
        kv, bs = self.kv, self.config.block_size
        used = kv.num_used_blocks
        wasted = sum(len(kv.req_to_blocks.get(r.request_id, ())) * bs - r.num_computed_tokens
                     for r in self.scheduler.running)
        self._steps.append(StepStats(
            time=now, duration=now - start, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_batched_tokens=sched.num_batched_tokens,
            num_prefill_tokens=sched.num_prefill_tokens, num_decode_tokens=sched.num_decode_tokens,
            num_used_blocks=used, num_free_blocks=kv.num_free_blocks,
            num_cached_blocks=kv.pool.num_cached_free_blocks, kv_usage=used / kv.num_blocks,
            internal_fragmentation=wasted / (used * bs) if used else 0.0,
            prefix_cache_queries=queries, prefix_cache_hits=hits, num_preemptions=len(sched.preempted),
            num_sampled_tokens=len(result.sampled), num_kv_tokens_read=result.num_kv_tokens_read,
            num_attention_scores=result.num_attention_scores,
            host_time=(now - start) - result.device_wait,
            cuda_graph=result.used_cuda_graph, num_shared_blocks=kv.num_shared_blocks,
            num_saved_blocks=kv.num_saved_blocks, num_cow_copies=cows))
        self._num_prompt_tokens += sched.num_prefill_tokens
        self._num_generation_tokens += len(result.sampled)

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
        self._steps: list[StepStats] = []
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._base = (self.kv.prefix_cache_queries, self.kv.prefix_cache_hits, self.scheduler.num_preemptions)
        self._cow_base = self.kv.num_cow_copies

    def stats(self) -> EngineStats:
        kv, runner = self.kv, self.runner
        q0, h0, p0 = self._base
        dev = runner.device
        return EngineStats(
            num_gpu_blocks=kv.num_blocks, block_size=self.config.block_size, num_used_blocks=kv.num_used_blocks,
            num_free_blocks=kv.num_free_blocks, num_cached_blocks=kv.pool.num_cached_free_blocks,
            prefix_cache_queries=kv.prefix_cache_queries - q0, prefix_cache_hits=kv.prefix_cache_hits - h0,
            num_preemptions=self.scheduler.num_preemptions - p0, num_steps=len(self._steps),
            num_prompt_tokens=self._num_prompt_tokens, num_generation_tokens=self._num_generation_tokens,
            attention_backend=runner.backend.name, weight_bytes=weight_bytes(runner.model),
            kv_bytes_per_token=runner.kv_bytes_per_token, quantization=self.config.quantization,
            kv_cache_dtype=self.config.kv_cache_dtype,
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            cuda_graphs=bool(runner.graphs), memory=runner.memory, steps=list(self._steps),
            num_shared_blocks=kv.num_shared_blocks, num_saved_blocks=kv.num_saved_blocks,
            num_cow_copies=kv.num_cow_copies - self._cow_base)

    def block_map(self) -> dict:
        """A copy of the KV pool's state, for pictures: "blocks" [(ref_count, cached)] per physical block
        (cached: holds a prefix-cache hash), "block_tables" {request_id: [block ids]}, "running"
        {request_id: num_computed_tokens} in admission order, "waiting" [request_id] in queue order."""
        kv, sched = self.kv, self.scheduler
        return {"block_size": self.config.block_size,
                "blocks": [(b.ref_count, b.block_hash is not None) for b in kv.pool.blocks],
                "block_tables": {rid: list(ids) for rid, ids in kv.req_to_block_ids.items()},
                "running": {r.request_id: r.num_computed_tokens for r in sched.running},
                "waiting": [r.request_id for r in sched.waiting]}


def _default_device(config: EngineConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LLM:
    """A model with its weights loaded once, and an engine over them that reconfigure() can replace."""

    _ids = itertools.count()

    def __init__(self, spec: ModelSpec, state: dict | None, config: EngineConfig | None = None, tokenizer=None,
                 dtype: torch.dtype | None = None, seed: int = 0):
        config = config or EngineConfig()
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
        """Load an HF checkpoint folder (config.json + safetensors or .bin), offline, with its tokenizer if any."""
        spec = ModelSpec.from_hf_config(load_hf_config(path))
        state = convert_hf_state_dict(load_checkpoint_state(path), spec)
        tokenizer = None
        if any(Path(path).glob("tokenizer*")):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(spec, state, config, tokenizer, dtype)

    @classmethod
    def from_hf_model(cls, hf_model, config: EngineConfig | None = None, tokenizer=None,
                      dtype: torch.dtype | None = None) -> "LLM":
        """Take the weights of an in-memory transformers *ForCausalLM model (copied, not shared)."""
        spec = ModelSpec.from_hf_config(hf_model.config)
        state = convert_hf_state_dict({k: v.detach() for k, v in hf_model.state_dict().items()}, spec)
        return cls(spec, state, config, tokenizer, dtype or next(hf_model.parameters()).dtype)

    @classmethod
    def random(cls, model: str, config: EngineConfig | None = None, dtype: torch.dtype | None = None,
               seed: int = 0) -> "LLM":
        """A preset architecture (see engine.model.PRESETS) or transformers config, with seeded random weights."""
        hf_config = preset_config(model) if isinstance(model, str) else model
        return cls(ModelSpec.from_hf_config(hf_config), None, config, None, dtype, seed)

    # ----- what the engine accepts, without loading anything -----------------------------------
    CPU_KV_BUDGET_BYTES = CPU_KV_BUDGET_BYTES  # on the CPU, the pool is gpu_memory_utilization x this

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
    def check_config(spec: ModelSpec, config: EngineConfig, device: torch.device | None = None) -> None:
        """Raise the ValueError the engine raises for a config this model cannot run at all (quantization,
        tensor_parallel_size, max_model_len), before anything is built; device None skips what depends on
        the GPUs present (fp8 support, GPU count)."""
        with torch.device("meta"):  # shapes only, for the int4 group-size check
            check_quantization(LlamaModel(spec, 1), config.quantization, device)
        if config.tensor_parallel_size > 1:
            check_tensor_parallel_config(spec, config, device)
        if config.max_model_len > spec.max_position_embeddings:
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
        self.check_config(self.spec, config, self.device)
        if _default_device(config) != self.device:
            raise ValueError(f"device={config.device!r} differs from the device the weights are on ({self.device}); "
                             "load the model again to move it")
        previous = self._engine.config if self._engine is not None else None
        self._release_engine()
        try:
            self._build_engine(config)
        except BaseException:
            # The new setting does not fit (say, too little KV for max_model_len): put the old engine back,
            # so that a failed point of a sweep leaves a usable LLM behind, then report the error.
            self._release_engine()
            if previous is not None:
                self._build_engine(previous)
            raise

    def _release_engine(self) -> None:
        """Drop the engine and its KV cache (and CUDA graphs), returning the memory to the device."""
        if self._engine is None:
            return
        if isinstance(self._engine.runner, TPRunner):
            self._engine.runner.close()  # its worker processes stop now, not whenever the runner is collected
        self._engine.runner.kv_caches = []
        self._engine.runner.graphs = {}
        self._engine = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _build_engine(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size > 1:
            self._drop_model()  # rank 0's GPU holds a shard, not the whole model as well
            runner = TPRunner(self.spec, self._host_state, config, self.device, self.dtype, self._seed)
        else:
            if self.model is None or config.quantization != self._quantization:
                if self.model is None or self._quantization is not None:  # else quantize the float model in place
                    self._drop_model()
                    self.model = build_model(self.spec, self._host_state, self.dtype, self.device,
                                             self.spec.max_position_embeddings, self._seed)
                quantize_model(self.model, config.quantization)
                self._quantization = config.quantization
            runner = ModelRunner(self.model, self.spec, config, self.device, self.dtype)
        self._engine = LLMEngine(runner, config, self.tokenizer)

    def _drop_model(self) -> None:
        if self.model is not None:
            self.model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits [len, vocab] (float32, CPU) at every position of token_ids, in one prefill."""
        return self._engine.runner.prompt_logits(self._engine.validate_request("logits", token_ids,
                                                                              SamplingParams()))

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings, or lists of token ids) to completion; outputs in prompt order."""
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
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    done[out.request_id] = out
        except BaseException:
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
