"""ModelRunner._prepare's vectorised inputs against a per-request loop written from the definitions.

Random workloads with chunked prefill, preemption (a pool too small for all) and requests finishing at
different lengths: every step, the token ids, positions, slot mapping, query start locations, sequence lengths,
block-table rows and the sampling rows the runner wrote must equal what each scheduled request implies.
"""
import numpy as np
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams


def expected_inputs(sched, block_size):
    """The step's inputs, one request at a time: decodes (one token) first, then the rest in schedule order."""
    batch = sorted(sched.scheduled, key=lambda rn: rn[1] != 1)
    ids, pos, slots, qsl, lens, tables, samplers = [], [], [], [0], [], [], []
    for req, k in batch:
        c = req.num_computed_tokens
        table = sched.block_tables[req.request_id]
        for p in range(c, c + k):
            ids.append(req.all_token_ids[p])
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + k)
        lens.append(c + k)
        tables.append(list(table[:-(-(c + k) // block_size)]))
        if c + k == len(req.all_token_ids):
            samplers.append(req.request_id)
    return ids, pos, slots, qsl, lens, tables, samplers


@pytest.mark.parametrize("seed", [0, 1])
def test_prepared_inputs_match_per_request_definition(seed):
    bs = 4
    cfg = EngineConfig(block_size=bs, max_num_batched_tokens=48, max_num_seqs=12, num_gpu_blocks=40,
                       max_model_len=128, device="cpu", enable_prefix_caching=seed == 1)
    llm = LLM.random("tiny", cfg, dtype=torch.float32, seed=0)
    eng, runner = llm.engine, llm.engine.runner
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 500, 8).tolist()
    for i in range(30):
        prompt = (shared if i % 3 == 0 else []) + rng.integers(3, 500, int(rng.integers(1, 40))).tolist()
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0.0,
                                                        ignore_eos=True))
    original = runner._prepare
    checked = {"steps": 0, "mixed": 0, "new_blocks": 0}

    def check(sched):
        before = dict(runner.rows_written)  # block-table entries written per request before this step
        plan, samplers, kv_read, scores = original(sched)
        ids, pos, slots, qsl, lens, tables, sample_ids = expected_inputs(sched, bs)
        b, n, t = runner.buffers, len(lens), len(ids)
        assert (plan.num_tokens, plan.num_seqs) == (t, n)
        assert b.ids_np[:t].tolist() == ids and b.pos_np[:t].tolist() == pos and b.slots_np[:t].tolist() == slots
        assert b.qsl_np[:n + 1].tolist() == qsl and b.lens_np[:n].tolist() == lens
        for row, table in zip(b.tables_np[:n], tables):
            assert row[:len(table)].tolist() == table
        assert [r.request_id for r in samplers] == sample_ids
        assert kv_read == sum(lens)
        assert scores == sum(k * L - k * (k - 1) // 2 for k, L in zip(np.diff(qsl).tolist(), lens))
        checked["steps"] += 1
        checked["mixed"] += t != n
        checked["new_blocks"] += any(before.get(r.request_id, -1) != len(sched.block_tables[r.request_id])
                                     for r, _ in sched.scheduled)
        return plan, samplers, kv_read, scores

    runner._prepare = check
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats().num_preemptions > 0  # the pool of 40 blocks cannot hold every request at once
    assert checked["steps"] > 20 and checked["mixed"] > 0 and checked["new_blocks"] > 0


@pytest.mark.parametrize("max_seqs", [1, 8, 31, 256, 257])
def test_prefill_views_behind_any_decode_count_share_one_alignment(max_seqs):
    """The prefill kernel gets query_start_loc[n:] and seq_lens[n:] behind n decodes. Triton builds a variant per
    16-byte-alignment combination of its pointers, and warm-up builds those of n = 0, 1, 2: both views must be
    aligned alike for every n, or n = 3 (mod 4) needs a variant no warm-up built (a stall inside a measurement)."""
    from engine.runner import InputBuffers

    b = InputBuffers(max_tokens=64, max_seqs=max_seqs, max_blocks=5, device=torch.device("cpu"))
    for n in range(max_seqs):  # a prefill behind n decodes: n < max_seqs
        assert b.qsl_dev[n:].data_ptr() % 16 == b.lens_dev[n:].data_ptr() % 16, n
    # the regions stay disjoint and in place
    assert b.qsl_dev.data_ptr() + 4 * (max_seqs + 1) <= b.lens_dev.data_ptr()
    assert b.lens_dev.numel() == b.qsl_dev.numel() - 1 == max_seqs
