"""TPRunner: ModelRunner's interface over a tensor-parallel group, so LLMEngine runs unchanged.

The scheduler and the KV cache manager run once, in rank 0 (this process). TPRunner owns rank 0's
ModelRunner (a TPModelRunner over rank 0's shard) and a WorkerGroup of ranks 1..W-1. Every rank holds
its shard of the weights and its shard of the KV cache (its KV heads) in a pool with the same number
of blocks, so one block table serves all ranks (one per KV cache group for a sliding-window model: every
rank keeps the same groups, engine/kv/groups.py, and receives rank 0's per-group tables and slot mappings).
A step is prepared by rank 0's runner as without tensor parallelism; its inputs reach the workers by one
broadcast (step_broadcast.py), all ranks run the forward (replaying the same CUDA graph for decode steps),
and rank 0 samples.

The weights are cut into shards one tensor at a time on rank 0 (from the host copy of a checkpoint,
or drawn on rank 0's GPU for random weights) and scattered: no GPU ever holds the whole model.
Numbers it reports are per GPU (rank 0's): weight bytes, KV bytes per token, the memory profile.
The weights are not quantized (quantization must be None). On GPUs a collective that hangs is
handled by torch's NCCL watchdog, which by default ends the process rather than raising.
"""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import torch

from ..config import EngineConfig
from ..model.spec import ModelSpec
from ..model.weights import full_weights
from ..runner import StepResult
from ..scheduler import SchedulerOutput
from .sharding import build_shard, check_tensor_parallel, rank_spec, scatter_shards
from .step_broadcast import TPModelRunner
from .worker_group import TensorParallelError, WorkerGroup


# Longest wait (seconds) for a collective or a worker's answer before the engine raises: a dead rank is
# seen at once (its process has ended, or its sockets closed); this bounds the wait for a hung one.
TP_TIMEOUT_S = 60.0


def check_tensor_parallel_config(spec: ModelSpec, config: EngineConfig, device: torch.device | None = None) -> None:
    """Raise ValueError for a tensor-parallel setting that cannot run, before any process starts; device
    None skips the check of the GPUs present (for planning on another machine)."""
    tp = config.tensor_parallel_size
    check_tensor_parallel(spec, tp)
    if tp > 1 and config.quantization is not None:
        raise ValueError(f"quantization={config.quantization!r} with tensor_parallel_size={tp} is not supported "
                         "(quantized layers are not sharded): use quantization=None or tensor_parallel_size=1")
    if device is not None and device.type == "cuda" and tp > 1:
        if device.index not in (None, 0):
            raise ValueError(f"tensor_parallel_size={tp} puts rank r on cuda:r, so rank 0 must be cuda:0, "
                             f"not device={str(device)!r}")
        if torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs but {torch.cuda.device_count()} are "
                             "visible: lower tensor_parallel_size")


class TPRunner:
    """Runs each step on W ranks; same interface as ModelRunner (execute, release, KV sizing, prompt_logits).

    Invariants: the workers hold the same KV pool size as rank 0 (determine_num_blocks takes the
    minimum over ranks and allocate_kv_cache sends it to all); persistent block-table rows live only in
    rank 0's ModelRunner (workers receive finished tables each step). After a failure the runner is
    closed and every later call raises; close() (also run when the runner is garbage-collected or the
    interpreter exits) leaves no worker process behind.
    """

    def __init__(self, spec: ModelSpec, host_state: dict | None, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, timeout_s: float | None = None):
        """host_state: the full weights (our names) on the host, or None for build_model's random weights
        drawn with `seed`."""
        check_tensor_parallel_config(spec, config, device)
        timeout_s = TP_TIMEOUT_S if timeout_s is None else timeout_s
        self.spec, self.config, self.device, self.dtype = spec, config, device, dtype
        self.world_size = config.tensor_parallel_size
        self.workers = WorkerGroup(spec, config, device, dtype, timeout_s)
        self._finalizer = weakref.finalize(self, self.workers.close)
        with self._guard():
            self.model = build_shard(spec, 0, self.world_size, dtype, device)
            scatter_shards(self.model, full_weights(spec, host_state, dtype, device, seed))
            self.runner = TPModelRunner(self.model, rank_spec(spec, self.world_size), config, device, dtype,
                                        send_plan=lambda plan: self.workers.send(("step", plan)))

    # ----- what LLMEngine and LLM read ------------------------------------------------------------
    @property
    def backend(self):
        return self.runner.backend

    @property
    def kv_groups(self):
        """The KV cache groups every rank keeps (rank 0's; the workers build the same), or None: one table."""
        return self.runner.kv_groups

    @property
    def kv_bytes_per_token(self) -> int:
        """Per GPU: this rank's KV heads."""
        return self.runner.kv_bytes_per_token

    @property
    def memory(self):
        return self.runner.memory

    @property
    def kv_caches(self) -> list:
        return self.runner.kv_caches

    @kv_caches.setter
    def kv_caches(self, caches: list) -> None:
        self.runner.kv_caches = caches

    def reconfigure(self, config: EngineConfig) -> None:
        """Rebuild every rank's runner for `config` (KV pool, CUDA graphs, step buffers) and keep the worker
        processes, the process group and every rank's shard of the weights: a sweep's next point costs no
        process start and no weight transfer. The tensor_parallel_size must stay (else build a new TPRunner);
        the engine sizes and allocates the new KV pool afterwards, as for a new runner."""
        if config.tensor_parallel_size != self.world_size:
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size}: this runner's group has "
                             f"{self.world_size} ranks; build a new TPRunner")
        check_tensor_parallel_config(self.spec, config, self.device)
        with self._guard():
            self.runner.close()
            self.runner = None
            self.workers.send(("reconfigure", config))
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.runner = TPModelRunner(self.model, rank_spec(self.spec, self.world_size), config, self.device,
                                        self.dtype, send_plan=lambda plan: self.workers.send(("step", plan)))
            self.workers.collect()
            self.config = config

    # ----- KV cache -------------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """The smallest pool any rank can hold (every rank sizes its own; on CUDA they profile together)."""
        with self._guard():
            self.workers.send(("num_blocks",))
            mine = self.runner.determine_num_blocks()
            return min([mine, *self.workers.collect()])

    def allocate_kv_cache(self, num_blocks: int) -> None:
        with self._guard():
            self.workers.send(("allocate_kv_cache", num_blocks))
            self.runner.allocate_kv_cache(num_blocks)
            self.workers.collect()

    def capture_cuda_graphs(self) -> None:
        """Every rank captures the same ladder of decode graphs (the collectives inside them included)."""
        with self._guard():
            self.workers.send(("capture",))
            self.runner.capture_cuda_graphs()
            self.workers.collect()

    @property
    def graphs(self) -> dict:
        return self.runner.graphs

    @graphs.setter
    def graphs(self, graphs: dict) -> None:
        self.runner.graphs = graphs

    # ----- steps ----------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> StepResult:
        if sched.block_copies:  # LLMEngine refuses n > 1 and beam search under tensor parallelism
            raise NotImplementedError("copy-on-write block copies are not implemented for tensor parallelism")
        with self._guard():
            return self.runner.execute(sched)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)

    def release_all(self) -> None:
        self.runner.release_all()

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """As ModelRunner.prompt_logits (every rank runs the prefill; the LM head is in the model dtype)."""
        with self._guard():
            self.workers.send(("prompt_logits", token_ids))
            logits = self.runner.prompt_logits(token_ids)
            self.workers.collect()
            return logits

    def describe_ranks(self) -> list[dict]:
        """What each worker rank holds (pid, device, heads, KV cache shape, NCCL environment, peak bytes
        torch allocated on its GPU)."""
        with self._guard():
            self.workers.send(("describe",))
            return self.workers.collect()

    # ----- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and free rank 0's KV cache and CUDA graphs; later calls raise."""
        if getattr(self, "runner", None) is not None:
            self.runner.graphs = {}  # before the process group's teardown (the graphs hold its collectives)
            self.runner.kv_caches = []
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self.workers.closed

    @contextmanager
    def _guard(self):
        """Run one exchange with the workers; on any failure close the group (it is out of step) and raise."""
        if self.workers.closed:
            raise TensorParallelError("this tensor-parallel engine was closed (after a failure, a reconfigure, or "
                                      "a newer tensor-parallel engine in this process): llm.reconfigure(config) "
                                      "starts a new one")
        try:
            self.workers.check_alive()
            yield
        except BaseException as exc:
            error = exc
            if isinstance(exc, Exception) and not isinstance(exc, (ValueError, TensorParallelError)):
                error = self.workers.failure(exc)  # a collective failed on rank 0: find the rank to blame
            # A ValueError (a setting that does not fit) leaves the workers in step: let them exit cleanly.
            self.workers.close(graceful=isinstance(exc, ValueError))
            self.close()
            if error is exc:
                raise
            raise error from exc
