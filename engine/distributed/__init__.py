"""Tensor parallelism across the GPUs of one machine (gloo on the CPU): Megatron-style sharding of the
model (sharding.py), worker processes started by the engine (worker_group.py, worker.py), each step's
inputs broadcast from rank 0 (step_broadcast.py), and TPRunner, which LLM uses in place of ModelRunner
when EngineConfig.tensor_parallel_size > 1 (tp_runner.py)."""
from .sharding import check_tensor_parallel, rank_spec, shard_model, shard_tensor
from .tp_runner import TP_TIMEOUT_S, TPRunner, check_tensor_parallel_config
from .worker_group import TensorParallelError

__all__ = ["TPRunner", "TP_TIMEOUT_S", "TensorParallelError", "check_tensor_parallel", "check_tensor_parallel_config",
           "rank_spec", "shard_model", "shard_tensor"]
