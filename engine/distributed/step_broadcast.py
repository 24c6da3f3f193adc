"""How one step's inputs reach every rank of a tensor-parallel group.

Rank 0's ModelRunner prepares a step as it does without tensor parallelism (the host buffers and a
StepPlan: sizes, the CUDA graph to replay, the rows that sample). Then, in upload():
- rank 0 sends the plan to the workers through their pipes (a few hundred bytes, pickled);
- rank 0 packs the used part of its host buffers (token ids, positions, slot mapping, query_start_loc,
  seq_lens, the decode rows' order, the prefill rows' work list, block tables, and for a sliding-window model
  the block tables and slot mappings of its KV cache groups past the first, engine/kv/groups.py) into one
  pinned int64 tensor and copies it to its device;
- one torch.distributed broadcast gives every rank that tensor, and every rank unpacks it into its
  device input buffers.
From there each rank runs forward_step(plan) on its shard: the same CUDA graph replayed, or the same
eager forward; only rank 0 samples. A CUDA graph holds the model's collectives too, so a replayed
step costs the host one broadcast and a graph launch per rank.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from ..runner import ModelRunner, StepPlan


def staged_sizes(plan: StepPlan, num_extra_groups: int = 0) -> list[int]:
    """Lengths of the packed sections: ids, positions, slots (tokens), query_start_loc, seq_lens, the decode rows'
    order, the prefill work list, tables, then the extra KV cache groups' tables ([groups, seqs, cols]) and slot
    mappings ([groups, tokens])."""
    t, n, e = plan.padded_tokens, plan.padded_seqs, num_extra_groups
    return [t, t, t, n + 1, n, plan.decode_rows, plan.num_work, n * plan.num_cols, e * n * plan.num_cols, e * t]


class TPModelRunner(ModelRunner):
    """A rank's ModelRunner whose step inputs come from rank 0 by one broadcast (see the module docstring).

    send_plan: on rank 0, the function that sends a StepPlan to the workers; None on a worker.
    """

    def __init__(self, model, spec, config, device: torch.device, dtype: torch.dtype,
                 send_plan: Callable[[StepPlan], None] | None = None):
        super().__init__(model, spec, config, device, dtype)
        self.send_plan = send_plan
        b = self.buffers
        capacity = 3 * b.ids.numel() + 3 * b.lens.numel() + 1 + b.max_work + b.tables.numel()
        if b.num_extra_groups:
            capacity += b.group_tables.numel() + b.group_slots.numel()
        self.staging = torch.empty(capacity, dtype=torch.int64, device=device)
        self.staging_host = self.staging_np = self.staging_copied = None  # rank 0's pinned copy and its copy event
        if send_plan is not None:
            self.staging_host = torch.empty(capacity, dtype=torch.int64, pin_memory=device.type == "cuda")
            self.staging_np = self.staging_host.numpy()
            self.staging_copied = torch.cuda.Event() if device.type == "cuda" else None
        # The torch backend (and any CPU run) reads query_start_loc and seq_lens on the host as well.
        self.host_lists = device.type == "cpu" or self.backend.name == "torch"

    def wait_host_buffers(self) -> None:
        if self.staging_copied is not None:
            self.staging_copied.synchronize()  # rank 0's last copy has read the pinned staging buffer

    def upload(self, plan: StepPlan) -> None:
        b = self.buffers
        e = b.num_extra_groups
        sizes = staged_sizes(plan, e)
        flat = self.staging[:sum(sizes)]
        t, n, c, d, w = plan.padded_tokens, plan.padded_seqs, plan.num_cols, plan.decode_rows, plan.num_work
        if self.send_plan is not None:
            self.send_plan(plan)
            b.sort_decodes(d)
            pos = 0
            parts = [b.ids_np[:t], b.pos_np[:t], b.slots_np[:t], b.qsl_np[:n + 1], b.lens_np[:n], b.order_np[:d],
                     b.work_np[:w], b.tables_np[:n, :c]]
            if e:
                parts += [b.group_tables_np[:, :n, :c], b.group_slots_np[:, :t]]
            for part in parts:
                self.staging_np[pos:pos + part.size] = part.reshape(-1)
                pos += part.size
            flat.copy_(self.staging_host[:pos], non_blocking=True)
            if self.staging_copied is not None:
                self.staging_copied.record()
        dist.broadcast(flat, src=0)
        ids, positions, slots, qsl, lens, order, work, tables, group_tables, group_slots = flat.split(sizes)
        b.ids_dev[:t].copy_(ids)
        b.pos_dev[:t].copy_(positions)
        b.slots_dev[:t].copy_(slots)
        b.qsl_dev[:n + 1].copy_(qsl)
        b.lens_dev[:n].copy_(lens)
        b.order_dev[:d].copy_(order)
        b.work_dev[:w].copy_(work)
        b.tables_dev[:n, :c].copy_(tables.view(n, c))
        if e:
            b.group_tables_dev[:, :n, :c].copy_(group_tables.view(e, n, c))
            b.group_slots_dev[:, :t].copy_(group_slots.view(e, t))
        if self.send_plan is None and self.host_lists:
            b.qsl_np[:n + 1] = qsl.cpu().numpy()
            b.lens_np[:n] = lens.cpu().numpy()

