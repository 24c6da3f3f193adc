"""How one step's inputs travel from rank 0 to the workers.

Rank 0's ModelRunner prepares a step as it does without tensor parallelism and calls its model; the
model it holds is a DriverModel, which first sends the call to the workers: a small StepHeader (sizes
and scalars) through each worker's pipe, then the input tensors (token ids, positions, slot mapping,
query_start_loc, seq_lens, block tables) packed into one int64 tensor by one torch.distributed
broadcast. A worker rebuilds the same AttentionMetadata and runs the same forward over its shard; the
LM-head call sends the selected hidden rows (those of the requests that sample) the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..kernels.metadata import AttentionMetadata


@dataclass
class StepHeader:
    """The scalars of one forward call; the tensors follow in one broadcast of `numel` int64s."""

    num_tokens: int
    num_seqs: int
    num_cols: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int] | None
    seq_lens_cpu: list[int] | None
    k_scale: float
    v_scale: float

    @property
    def numel(self) -> int:
        return 3 * self.num_tokens + 2 * self.num_seqs + 1 + self.num_seqs * self.num_cols


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor,
              meta: AttentionMetadata) -> tuple[StepHeader, torch.Tensor]:
    """(header, flat int64 tensor) of one forward call's inputs."""
    n, cols = meta.block_tables.shape
    header = StepHeader(input_ids.shape[0], n, cols, meta.num_decodes, meta.max_query_len, meta.max_seq_len,
                        meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.k_scale, meta.v_scale)
    flat = torch.cat([input_ids, positions, meta.slot_mapping, meta.query_start_loc.long(), meta.seq_lens.long(),
                      meta.block_tables.reshape(-1).long()])
    return header, flat


def unpack_step(header: StepHeader, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids, positions, metadata) back from pack_step's output."""
    t, n = header.num_tokens, header.num_seqs
    ids, pos, slots, qsl, lens, tables = flat.split([t, t, t, n + 1, n, n * header.num_cols])
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=qsl.int(), seq_lens=lens.int(),
        block_tables=tables.view(n, header.num_cols).int(), num_decodes=header.num_decodes,
        max_query_len=header.max_query_len, max_seq_len=header.max_seq_len,
        query_start_loc_cpu=header.query_start_loc_cpu, seq_lens_cpu=header.seq_lens_cpu,
        k_scale=header.k_scale, v_scale=header.v_scale)
    return ids, pos, meta


class DriverModel(nn.Module):
    """Rank 0's shard, seen by its ModelRunner as the model.

    While `mirroring` is on (TPRunner.execute sets it for one step), each forward and compute_logits
    call is first sent to the workers, which make the same call on their shards with their own KV
    cache; the collectives inside the shards then line up. Off, calls run on rank 0 alone, for work
    that every rank starts itself (the memory profile, prompt_logits).
    """

    def __init__(self, model: nn.Module, workers):
        super().__init__()
        self.model = model
        self.workers = workers
        self.mirroring = False

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def spec(self):
        return self.model.spec

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, backend) -> torch.Tensor:
        if self.mirroring:
            header, flat = pack_step(input_ids, positions, meta)
            self.workers.send(("forward", header))
            dist.broadcast(flat, src=0)
        return self.model(input_ids, positions, kv_caches, meta, backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mirroring:
            hidden = hidden.contiguous()
            self.workers.send(("logits", hidden.shape[0]))
            dist.broadcast(hidden, src=0)
        return self.model.compute_logits(hidden)
