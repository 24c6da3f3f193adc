"""ModelRunner: turns a SchedulerOutput into model inputs, runs the forward pass, samples tokens."""
from __future__ import annotations

import numpy as np
import torch

from .config import EngineConfig
from .kernels import AttentionMetadata, select_backend
from .kv import KVCacheManager
from .model.llama import LlamaModel
from .model.spec import ModelSpec
from .model.weights import dtype_bytes, weight_bytes
from .sampling import Sampler
from .scheduler import SchedulerOutput
from .stats import MemoryProfile

CPU_KV_BUDGET_BYTES = 2 * 1024**3  # on the CPU, the pool is sized from this budget x gpu_memory_utilization


class ModelRunner:
    """Owns the model, the physical KV cache tensors and the attention backend of one engine."""

    def __init__(self, model: LlamaModel, spec: ModelSpec, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.spec, self.config = model, spec, config
        self.device, self.dtype = device, dtype
        self.backend = select_backend(config.attention_backend, device)
        self.sampler = Sampler(config.seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_dtype = dtype
        self.memory: MemoryProfile | None = None

    # ----- KV cache sizing and allocation -------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.spec.kv_bytes_per_token(dtype_bytes(self.kv_dtype))

    def determine_num_blocks(self) -> int:
        """Blocks the pool can have: the config's override, else what the memory budget leaves."""
        cfg = self.config
        bytes_per_block = self.kv_bytes_per_token * cfg.block_size
        if self.device.type == "cuda":
            self.memory = self._profile_cuda_memory()
            kv_bytes = self.memory.kv_cache_bytes
        else:
            kv_bytes = int(cfg.gpu_memory_utilization * CPU_KV_BUDGET_BYTES)
        num_blocks = cfg.num_gpu_blocks if cfg.num_gpu_blocks is not None else kv_bytes // bytes_per_block
        if num_blocks * cfg.block_size < cfg.max_model_len:
            need = -(-cfg.max_model_len // cfg.block_size)
            raise ValueError(
                f"the KV cache has {num_blocks} blocks of {cfg.block_size} tokens ({num_blocks * cfg.block_size} "
                f"tokens) but max_model_len={cfg.max_model_len} needs {need} blocks "
                f"({need * bytes_per_block / 2**30:.2f} GiB) for one request: lower max_model_len, raise "
                "gpu_memory_utilization or num_gpu_blocks, quantize the weights or the KV cache, or use more GPUs")
        return num_blocks

    def _profile_cuda_memory(self) -> MemoryProfile:
        """vLLM's rule: KV = util x total - weights - peak activations of a max-size step - non-torch memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        weights = weight_bytes(self.model)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        kv = int(self.config.gpu_memory_utilization * total) - base - peak - non_torch
        return MemoryProfile(total, weights, peak, non_torch, kv)

    def _profile_run(self) -> None:
        """A forward + sampling of max_num_batched_tokens tokens spread over max_num_seqs sequences."""
        cfg = self.config
        num_tokens = cfg.max_num_batched_tokens
        num_seqs = max(1, min(cfg.max_num_seqs, num_tokens))
        lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        bs = cfg.block_size
        blocks_per_seq = -(-max(lens) // bs)
        self.allocate_kv_cache(blocks_per_seq * num_seqs)
        block_tables = np.arange(blocks_per_seq * num_seqs, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
        positions = np.concatenate([np.arange(n) for n in lens])
        slots = np.concatenate([block_tables[i, np.arange(n) // bs] * bs + np.arange(n) % bs
                                for i, n in enumerate(lens)])
        meta = self._metadata(slots, lens, lens, block_tables, num_decodes=0)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.as_tensor(positions, device=self.device), self.kv_caches, meta, self.backend)
            self.model.compute_logits(hidden[torch.as_tensor(np.cumsum(lens) - 1, device=self.device)]).argmax(-1)
        self.kv_caches = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.config.block_size, self.spec.num_kv_heads, self.spec.head_dim)
        self.kv_caches = []
        for _ in range(self.spec.num_layers):
            k = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
            v = torch.empty(shape, dtype=self.kv_dtype, device=self.device)
            self.kv_caches.append((k, v))

    # ----- one step -----------------------------------------------------------------------------
    def _metadata(self, slots, query_lens, seq_lens, block_tables, num_decodes) -> AttentionMetadata:
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.as_tensor(np.asarray(slots, dtype=np.int64), device=dev),
            query_start_loc=torch.as_tensor(qsl, device=dev),
            seq_lens=torch.as_tensor(np.asarray(seq_lens, dtype=np.int32), device=dev),
            block_tables=torch.as_tensor(block_tables, device=dev),
            num_decodes=num_decodes,
            max_query_len=int(max(query_lens)),
            max_seq_len=int(max(seq_lens)),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=[int(s) for s in seq_lens],
        )

    def execute(self, sched: SchedulerOutput, kv: KVCacheManager) -> dict[str, int]:
        """Run one step; returns {request_id: sampled token} for requests whose last token was computed."""
        bs = self.config.block_size
        # Decodes first, so attention backends can send them to the decode kernel as one group.
        batch = sorted(sched.scheduled, key=lambda rn: rn[1] != 1)
        num_decodes = sum(1 for _, n in batch if n == 1)
        tables = [kv.block_ids(req.request_id) for req, _ in batch]
        block_tables = np.zeros((len(batch), max(len(t) for t in tables)), dtype=np.int32)
        ids, positions, slots, query_lens, seq_lens, logits_idx, samplers = [], [], [], [], [], [], []
        for i, ((req, n), table) in enumerate(zip(batch, tables)):
            block_tables[i, :len(table)] = table
            start = req.num_computed_tokens
            pos = np.arange(start, start + n)
            ids.extend(req.all_token_ids[start:start + n])
            positions.append(pos)
            slots.append(block_tables[i, pos // bs].astype(np.int64) * bs + pos % bs)
            query_lens.append(n)
            seq_lens.append(start + n)
            if start + n == req.num_tokens:
                logits_idx.append(len(ids) - 1)
                samplers.append(req)
        meta = self._metadata(np.concatenate(slots), query_lens, seq_lens, block_tables, num_decodes)
        dev = self.device
        with torch.inference_mode():
            hidden = self.model(torch.as_tensor(ids, dtype=torch.long, device=dev),
                                torch.as_tensor(np.concatenate(positions), device=dev),
                                self.kv_caches, meta, self.backend)
            if not samplers:
                return {}
            logits = self.model.compute_logits(hidden[torch.as_tensor(logits_idx, device=dev)])
            tokens = self.sampler(logits, [r.params for r in samplers], [r.generator for r in samplers])
        return {r.request_id: t for r, t in zip(samplers, tokens)}
