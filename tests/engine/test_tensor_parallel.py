"""Tensor parallelism on the CPU: gloo, 2 ranks (this process and one spawned worker), tiny float32 models.

The models come from conftest's make_hf_model (weights of std 0.08, so greedy choices are well separated
and the different summation order of the all-reduces cannot flip them).
"""
import dataclasses
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.distributed import shard_tensor
from engine.distributed import tp_runner as tp_runner_module
from engine.model.spec import ModelSpec

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# A pool of 24 blocks of 4 tokens for 8 requests of up to 31 tokens: preemptions; shared first blocks:
# prefix-cache hits; a 32-token budget: prefills chunked.
CFG = EngineConfig(device="cpu", max_model_len=64, block_size=4, num_gpu_blocks=24, max_num_batched_tokens=32)
TP2 = CFG.replace(tensor_parallel_size=2)
PROMPTS = [[7, 8, 9, 10, 11, 12, 13, 14] + [20 + i] * (3 + 2 * i) for i in range(8)]


def _tp_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("paged-workbench-tp")]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _generate(llm, prompts=PROMPTS, params=GREEDY):
    llm.engine.reset_stats()
    outs = llm.generate(prompts, params)
    return [o.token_ids for o in outs], llm.engine.stats()


@pytest.fixture(scope="class")
def llama_pair(hf_models):
    """(TP=1 reference, TP=2 engine) over the same weights; class-scoped, as a later tensor-parallel engine
    in this process would close this one."""
    ref = LLM.from_hf_model(hf_models["llama"], CFG)
    tp = LLM.from_hf_model(hf_models["llama"], TP2)
    yield ref, tp
    tp.reconfigure(CFG)
    assert not _tp_processes()


def test_shard_tensor_slices_q_k_v_and_gate_up_sections_separately():
    spec = ModelSpec.from_hf_config(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=6,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=2))
    rows = torch.arange(4 * 2 + 2 * 2 * 2, dtype=torch.float32)[:, None].expand(-1, 8)  # row i holds i
    qkv = shard_tensor("layers.0.self_attn.qkv_proj.weight", rows, spec, 1, 2)[:, 0].tolist()
    # q: heads 2, 3 (rows 4..7); k: KV head 1 (rows 8 + 2..3); v: KV head 1 (rows 12 + 2..3)
    assert qkv == [4, 5, 6, 7, 10, 11, 14, 15]
    gate_up = shard_tensor("layers.0.mlp.gate_up_proj.weight", torch.arange(12.0)[:, None], spec, 0, 2)[:, 0]
    assert gate_up.tolist() == [0, 1, 2, 6, 7, 8]
    o = shard_tensor("layers.0.self_attn.o_proj.weight", torch.arange(8.0)[None].expand(8, -1), spec, 1, 2)
    assert o[0].tolist() == [4, 5, 6, 7]
    # vocabulary 10 over 4 ranks: padded to 12, rank 3 holds rows 9 and one zero row
    embed = shard_tensor("embed_tokens.weight", torch.arange(1.0, 11.0)[:, None], spec, 3, 4)
    assert embed[:, 0].tolist() == [10, 0, 0]


def test_settings_that_cannot_be_sharded_are_refused_before_any_process_starts(hf_models):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_heads=4, num_kv_heads=2"):
        LLM.from_hf_model(hf_models["llama"], CFG.replace(tensor_parallel_size=3))
    llm = LLM.from_hf_model(hf_models["llama"], CFG)
    with pytest.raises(ValueError, match=r"quantization='int8' with tensor_parallel_size=2"):
        llm.reconfigure(TP2.replace(quantization="int8"))
    assert llm.config == CFG.with_batch_limits() and not _tp_processes()  # limits None: the CPU's


class TestAgainstTP1:
    def test_greedy_outputs_match_with_prefix_hits_preemption_and_chunked_prefill(self, llama_pair):
        ref, tp = llama_pair
        expected, ref_stats = _generate(ref)
        got, stats = _generate(tp)
        assert got == expected
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        # One scheduler, the same decisions: every step has the same shape on both engines.
        assert (stats.num_preemptions, stats.prefix_cache_hits) == (ref_stats.num_preemptions,
                                                                    ref_stats.prefix_cache_hits)
        assert [s.num_batched_tokens for s in stats.steps] == [s.num_batched_tokens for s in ref_stats.steps]
        assert max(s.num_prefill_tokens for s in stats.steps) == 32
        # Prompt logits (every position, one prefill) agree to float32 rounding.
        torch.testing.assert_close(tp.prompt_logits(PROMPTS[3]), ref.prompt_logits(PROMPTS[3]), atol=1e-4, rtol=1e-4)

    def test_each_rank_holds_its_heads_and_its_shard_of_the_kv_cache(self, llama_pair):
        from workbench.planner import weight_bytes

        ref, tp = llama_pair
        runner = tp.engine.runner
        (rank1,) = runner.describe_ranks()
        assert rank1["rank"] == 1 and rank1["num_heads"] == 2 and rank1["num_kv_heads"] == 1
        assert rank1["kv_cache_shape"] == (24 + 1, 4, 1, 16) == tuple(runner.kv_caches[0][0].shape)
        assert rank1["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                "NVSHMEM_DISABLE_NVLS": "1"}
        stats, ref_stats = tp.engine.stats(), ref.engine.stats()
        assert stats.kv_bytes_per_token * 2 == ref_stats.kv_bytes_per_token
        # Per-GPU weight bytes: the planner's tensor-parallel arithmetic is what the engine holds.
        assert stats.weight_bytes == weight_bytes(tp.spec, None, "float32", tensor_parallel_size=2)
        assert not stats.cuda_graphs


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_backend_at_tp2_matches_tp1(hf_models):
    """The Triton backend's inputs reach every rank: the decode order and the prefill work list go in the
    step's broadcast (staged_sizes), through chunked prefill and mixed steps."""
    expected, _ = _generate(LLM.from_hf_model(hf_models["llama"], CFG))
    tp = LLM.from_hf_model(hf_models["llama"], TP2.replace(attention_backend="triton"))
    try:
        got, stats = _generate(tp)
        assert stats.attention_backend == "triton"
        assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats.steps)  # a mixed step ran
        assert got == expected
    finally:
        tp.reconfigure(CFG)
    assert not _tp_processes()


def test_reconfigure_at_the_same_degree_keeps_the_workers_and_matches_tp1_under_the_new_config(hf_models):
    """A sweep's next tensor-parallel point: new block size, pool and batch limits on every rank, same worker
    processes and shards; greedy outputs and KV pools equal TP=1's under the new config, and a config that
    does not fit leaves the previous engine usable."""
    llm = LLM.from_hf_model(hf_models["llama"], TP2)
    (pid,) = llm.engine.runner.workers.pids
    expected_first, _ = _generate(llm)
    cfg2 = CFG.replace(block_size=8, num_gpu_blocks=14, max_num_batched_tokens=24, max_num_seqs=3)
    llm.reconfigure(cfg2.replace(tensor_parallel_size=2))
    assert llm.engine.runner.workers.pids == [pid] and llm.model is None
    (rank1,) = llm.engine.runner.describe_ranks()
    assert rank1["kv_cache_shape"] == (14 + 1, 8, 1, 16) == tuple(llm.engine.runner.kv_caches[0][0].shape)
    got, stats = _generate(llm)
    with pytest.raises(ValueError, match="max_model_len=64 needs"):
        llm.reconfigure(TP2.replace(num_gpu_blocks=2))
    assert _generate(llm)[0] == got and llm.config.block_size == 8  # the previous engine, rebuilt
    llm.reconfigure(cfg2)
    assert _gone(pid) and not _tp_processes()
    expected, ref_stats = _generate(llm)
    assert got == expected and max(s.num_running for s in stats.steps) == 3  # the new max_num_seqs
    assert [s.num_batched_tokens for s in stats.steps] == [s.num_batched_tokens for s in ref_stats.steps]
    llm.reconfigure(CFG)
    assert _generate(llm)[0] == expected_first


def test_tied_embeddings_and_qkv_bias_shard_correctly(hf_models):
    llm = LLM.from_hf_model(hf_models["qwen2"], CFG)  # tied LM head, q/k/v biases
    expected, _ = _generate(llm)
    llm.reconfigure(TP2)
    got, _ = _generate(llm)
    llm.reconfigure(CFG)
    assert got == expected and not _tp_processes()


def test_random_weights_are_cut_into_shards_without_a_whole_model_and_equal_tp1s():
    """LLM.random at tensor_parallel_size=2 draws each tensor as the TP=1 model does and keeps no whole model."""
    cfg = EngineConfig(device="cpu", max_model_len=64)
    llm = LLM.random("tiny", cfg.replace(tensor_parallel_size=2), seed=3)
    assert llm.model is None
    ids = [5, 9, 2, 7, 7, 1, 30, 4]
    sharded = llm.prompt_logits(ids)
    rank0 = llm.engine.runner.model
    llm.reconfigure(cfg)
    assert not _tp_processes() and llm.model is not None
    half = llm.model.layers[1].mlp.down_proj.weight.shape[1] // 2
    assert torch.equal(rank0.layers[1].mlp.down_proj.weight, llm.model.layers[1].mlp.down_proj.weight[:, :half])
    torch.testing.assert_close(sharded, llm.prompt_logits(ids), atol=1e-5, rtol=1e-5)
    other_seed = LLM.random("tiny", cfg, seed=4).prompt_logits(ids)
    assert (other_seed - sharded).abs().max() > 1e-3


def test_a_dead_rank_raises_a_clear_error_and_reconfigure_recovers(hf_models):
    llm = LLM.from_hf_model(hf_models["llama"], TP2)
    expected, _ = _generate(llm, PROMPTS[:2])
    llm.engine.add_request("a", PROMPTS[0], GREEDY)
    llm.engine.step()
    (pid,) = llm.engine.runner.workers.pids
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {pid}\) died with exit code -9"):
        llm.engine.step()
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="was closed"):
        llm.engine.step()
    llm.engine.abort_request("a")
    llm.reconfigure(TP2)
    assert _generate(llm, PROMPTS[:2])[0] == expected
    # A worker's ValueError reaches rank 0 with its message, and the worker goes on serving (in step).
    workers = llm.engine.runner.workers
    workers.send(("no-such-command",))
    with pytest.raises(ValueError, match="rank 1: unknown command 'no-such-command'"):
        workers.collect()
    assert _generate(llm, PROMPTS[:2])[0] == expected
    # Any other exception ends the worker, and rank 0 says which rank failed and how.
    workers.send(("allocate_kv_cache", "many"))
    with pytest.raises(RuntimeError, match="rank 1 failed: TypeError"):
        workers.collect()
    workers.processes[0].join(10)
    assert _gone(workers.pids[0])
    llm.reconfigure(CFG)
    assert not _tp_processes()


def test_a_hung_rank_times_out(hf_models, monkeypatch):
    monkeypatch.setattr(tp_runner_module, "TP_TIMEOUT_S", 2.0)
    llm = LLM.from_hf_model(hf_models["llama"], TP2)
    (pid,) = llm.engine.runner.workers.pids
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="tensor parallelism failed"):
            llm.generate(PROMPTS[:1], GREEDY)
    finally:
        if not _gone(pid):  # only if the engine did not stop it: never leave a stopped process behind
            os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - start < 30
    assert _gone(pid) and not _tp_processes()


def test_reconfigure_garbage_collection_and_a_second_engine_leave_no_stray_processes(hf_models):
    llm = LLM.from_hf_model(hf_models["llama"], CFG)
    # A setting that fails once the workers run (a pool too small for max_model_len) stops them and
    # leaves the previous engine in place.
    with pytest.raises(ValueError, match="max_model_len=64 needs 16"):
        llm.reconfigure(TP2.replace(num_gpu_blocks=2))
    assert llm.config == CFG.with_batch_limits() and not _tp_processes()  # limits None: the CPU's
    llm.reconfigure(TP2)
    first = llm.engine.runner.workers.pids
    # The same degree keeps the workers (and their shards); only each rank's runner is rebuilt.
    llm.reconfigure(TP2.replace(block_size=8, num_gpu_blocks=12))
    assert llm.engine.runner.workers.pids == first and len(_tp_processes()) == 1
    # Another degree (here 1, then 2 again) starts new ones.
    llm.reconfigure(CFG)
    assert all(map(_gone, first)) and not _tp_processes()
    llm.reconfigure(TP2.replace(block_size=8, num_gpu_blocks=12))
    second = llm.engine.runner.workers.pids
    assert set(first).isdisjoint(second)
    # A second tensor-parallel engine in this process takes over the process group; the first is closed.
    other = LLM.from_hf_model(hf_models["llama"], TP2)
    assert all(map(_gone, second))
    llm.engine.add_request("x", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="was closed"):
        llm.engine.step()
    llm.engine.abort_request("x")
    llm.reconfigure(CFG)
    assert len(_tp_processes()) == 1
    pids = other.engine.runner.workers.pids
    del other  # garbage collection stops the workers too
    gc.collect()
    assert all(map(_gone, pids)) and not _tp_processes()


SCRIPT = """
import os
from engine import LLM, EngineConfig, SamplingParams
print("body", os.getpid(), flush=True)
llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, tensor_parallel_size=2))
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
print("worker", llm.engine.runner.workers.pids[0], flush=True)
"""


def test_a_script_without_a_main_guard_runs_once_and_exits_without_stray_workers(tmp_path):
    """Spawned workers do not re-run the caller's script, and interpreter exit stops them (no close() called)."""
    script = tmp_path / "tp_script.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    assert lines.count("body") == 1 and lines.count("worker") == 1
    assert _gone(int(lines[lines.index("worker") + 1]))


def test_the_planner_refuses_what_the_engine_refuses():
    from workbench.planner import plan, plan_table

    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 .*num_heads=28, num_kv_heads=4"):
        plan("qwen2.5-7b", "H100-80GB", EngineConfig(), tensor_parallel_size=8)
    with pytest.raises(ValueError, match="quantization='int8' with tensor_parallel_size=2"):
        plan("llama-3.1-70b", "H100-80GB", EngineConfig(quantization="int8"), tensor_parallel_size=2)
    df = plan_table("qwen2.5-7b", "H100-80GB", [EngineConfig()], tensor_parallel_sizes=(1, 2, 4, 8))
    assert list(df.verdict == "not allowed") == [False, False, False, True]


def test_sweep_over_tensor_parallel_size_and_the_planner_agree_with_the_engine(tmp_path):
    from workbench import Sweep
    from workbench.planner import plan

    base = EngineConfig(device="cpu", max_model_len=128)
    sweep = Sweep(model="tiny", workload="shared-prefix", num_requests=4, progress=False, warmup=False,
                  workload_args=dict(num_prefixes=1, prefix_len=32, suffix_len=8, output_len=4),
                  grid={"tensor_parallel_size": [1, 2]}, base_config=base)
    df = sweep.run()
    assert list(df["tensor_parallel_size"]) == [1, 2] and (df["status"] == "ok").all(), df["error"]
    assert (df["total_output_tokens"] == 16).all() and list(df["label"]) == ["tp=1", "tp=2"]
    for tp, blocks in zip(df["tensor_parallel_size"], df["kv_blocks"]):
        assert plan("tiny", "cpu", base, tensor_parallel_size=tp, dtype="float32").num_gpu_blocks == blocks
    pids = sweep.llm.engine.runner.workers.pids
    del sweep
    gc.collect()
    assert all(map(_gone, pids)) and not _tp_processes()


# ----- sliding-window KV cache groups (engine/kv/groups.py) under tensor parallelism -----------------------------

SLIDING_KINDS = ["gemma2", "gemma3", "mistral_window"]


@pytest.fixture(scope="module")
def sliding_models():
    """Tiny float32 Gemma 2 (3 groups), Gemma 3 (4 groups: 1 full, 3 sliding) and Mistral with a window on every
    layer (1 sliding group), window 21 (family_models.WINDOW), and HF's greedy tokens for prompts up to 3x the window:
    a 64-token one, one sharing its first 40 tokens (prefix hits), and shorter ones."""
    from family_models import make_family_model
    from test_model_families import hf_greedy, make_prompts

    prompts = make_prompts(11, [64, 9, 33, 50])
    prompts[3] = prompts[0][:40] + prompts[3][:24]
    out = {}
    for kind in SLIDING_KINDS:
        model = make_family_model(kind)
        out[kind] = (model, prompts, [hf_greedy(model, p, 10) for p in prompts])
    return out


def _sliding_config(kind: str, **kw) -> EngineConfig:
    """Blocks of 8, a 16-token budget (prefills chunked), prefix caching, and a pool of 9 blocks per KV cache group
    (the 64-token prompt alone needs 8 in a full group): the four requests preempt one another."""
    from family_models import tiny_family_config

    spec = LLM.model_spec(tiny_family_config(kind))
    groups = LLM.kv_cache_groups(spec.layer_windows, spec.num_layers)
    return EngineConfig(device="cpu", max_model_len=96, block_size=8, max_num_batched_tokens=16,
                        enable_prefix_caching=True, num_gpu_blocks=9 * len(groups), **kw)


@pytest.mark.parametrize("kind", SLIDING_KINDS)
def test_sliding_window_groups_at_tp2_match_tp1_and_hf(sliding_models, kind):
    """Every rank keeps the KV cache groups and receives rank 0's per-group tables and slot mappings: TP=2 gives
    TP=1's greedy tokens (which are HF's) and the same steps, with chunked prefill, prefix hits and preemption over
    prompts up to 3x the window, and each rank holds one KV tensor per layer of a group (not one per layer)."""
    from family_models import tiny_family_config
    from test_model_families import assert_same_greedy

    model, prompts, refs = sliding_models[kind]
    cfg = _sliding_config(kind)
    spec = LLM.model_spec(tiny_family_config(kind))
    groups = LLM.kv_cache_groups(spec.layer_windows, spec.num_layers, 2)
    assert groups == LLM.kv_cache_groups(spec.layer_windows, spec.num_layers, 1) and groups is not None
    windows = tuple(g.sliding_window for g in groups)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    llm = LLM.from_hf_model(model, cfg.replace(tensor_parallel_size=2))
    try:
        got, stats = _generate(llm, prompts, greedy)
        (rank1,) = llm.engine.runner.describe_ranks()
        logits = llm.prompt_logits(prompts[0])
    finally:
        llm.reconfigure(cfg)
    assert not _tp_processes()
    torch.testing.assert_close(logits, llm.prompt_logits(prompts[0]), atol=1e-4, rtol=1e-4)
    expected, ref_stats = _generate(llm, prompts, greedy)
    for p, tokens, (hf_tokens, gaps) in zip(prompts, expected, refs):
        assert_same_greedy(tokens, hf_tokens, gaps, f"{kind} TP=1: prompt of {len(p)} tokens")
    assert got == expected
    assert stats.kv_cache_groups == windows == ref_stats.kv_cache_groups
    assert rank1["kv_cache_groups"] == windows and rank1["num_kv_tensors"] == len(groups[0].layers)
    assert rank1["kv_cache_shape"] == (9 * len(groups) + 1, 8, 1, 16)  # one of the 2 KV heads
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert max(s.num_prefill_tokens for s in stats.steps) == 16
    assert [(s.num_batched_tokens, s.group_used_blocks) for s in stats.steps] == [
        (s.num_batched_tokens, s.group_used_blocks) for s in ref_stats.steps]
    if None in windows:  # the sliding groups freed what left their windows: fewer blocks than the full group
        assert any(min(s.group_used_blocks[1:]) < s.group_used_blocks[0] for s in stats.steps)
    assert stats.num_used_blocks == 0 and stats.group_used_blocks == (0,) * len(groups)


def test_sliding_window_pool_at_tp2_holds_as_many_long_requests_as_tp1(sliding_models):
    """Gemma 3 (1 full + 3 sliding groups, window 21), requests of 128 tokens, blocks of 8: a request holds at most
    16 + 3 x (cdiv(20, 8) + 1) = 28 blocks of the pool, so 150 blocks hold 5 at once, at TP=1 and at TP=2 (each rank's
    pool has the same blocks, of its KV heads); the planner says the same, and without windows (16 blocks per request
    of 4x the layers: 150 // 4 // 16) 2. Blocks per request are counted from the pool's per-group counters."""
    from family_models import tiny_family_config
    from test_model_families import make_prompts
    from workbench.planner import plan

    model = sliding_models["gemma3"][0]
    spec = LLM.model_spec(tiny_family_config("gemma3"))
    prompts = make_prompts(3, [100] * 10)
    params = SamplingParams(max_tokens=28, temperature=0.0, ignore_eos=True)
    base = EngineConfig(device="cpu", max_model_len=128, block_size=8, max_num_batched_tokens=128)
    windows = (None, 21, 21, 21)
    assert LLM.request_kv_blocks(windows, 128, 8) == 28
    llm = LLM.from_hf_model(model, base.replace(tensor_parallel_size=2))
    try:
        # The memory-sized pool (the CPU budget per rank): the planner's count at TP=2 is the engine's.
        assert llm.engine.stats().num_gpu_blocks == plan(spec, "cpu", base, tensor_parallel_size=2,
                                                         dtype="float32").num_gpu_blocks
        results = {}
        for tp in (2, 1):
            cfg = base.replace(num_gpu_blocks=150, tensor_parallel_size=tp)
            llm.reconfigure(cfg)
            got, stats = _generate(llm, prompts, params)
            p = plan(spec, "cpu", cfg, dtype="float32")
            assert p.num_gpu_blocks == 150 and p.max_concurrent_requests == 5
            decoding = [s for s in stats.steps if s.num_prefill_tokens == 0 and s.num_running]
            per_request = max(sum(s.group_used_blocks) / s.num_running for s in decoding)
            assert 20 <= per_request <= 28  # 128 tokens: up to 16 full-group blocks and 3 x 4 sliding ones
            for s in decoding:
                assert all(u <= s.num_running * 4 for u in s.group_used_blocks[1:])
            assert stats.num_preemptions == 0 and max(s.num_running for s in stats.steps) == 5
            results[tp] = got, [s.group_used_blocks for s in stats.steps]
    finally:
        llm.reconfigure(base)
    assert results[1] == results[2] and not _tp_processes()
    no_window = dataclasses.replace(spec, layer_windows=(None,) * spec.num_layers)
    blocks = plan(no_window, "cpu", base.replace(num_gpu_blocks=150 // 4), dtype="float32")
    assert blocks.max_concurrent_requests == 2
