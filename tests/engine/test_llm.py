"""The user API: loaders, the step API, abort, reconfigure, counters and per-request metrics."""
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.model.presets import PRESETS, preset_config
from engine.model.spec import ModelSpec

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

def test_from_pretrained_safetensors_and_bin(tmp_path, hf_models):
    hf = hf_models["qwen2"]
    prompt = [[5, 17, 99, 3]]
    expected = LLM.from_hf_model(hf, EngineConfig(device="cpu", max_model_len=64)).generate(prompt, GREEDY)
    for safe in (True, False):
        folder = tmp_path / f"ckpt-{safe}"
        hf.save_pretrained(folder, safe_serialization=safe)
        llm = LLM.from_pretrained(folder, EngineConfig(device="cpu", max_model_len=64))
        assert llm.generate(prompt, GREEDY)[0].token_ids == expected[0].token_ids

def test_missing_checkpoint_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM.from_pretrained(tmp_path)

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_published_shapes(name):
    spec = ModelSpec.from_hf_config(preset_config(name))
    billions = {"llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21,
                "mistral-7b": 7.25, "qwen2.5-7b": 7.62, "tiny": None, "qwen3-8b": 8.19, "qwen3-30b-a3b": 30.5,
                "gemma-2-9b": 9.24, "gemma-3-12b": 11.77, "phi-3-mini": 3.82, "mixtral-8x7b": 46.7}[name]
    if billions is not None:
        assert spec.num_params() / 1e9 == pytest.approx(billions, rel=0.01)
    if name == "llama-3.1-8b":
        assert spec.kv_bytes_per_token(2) == 128 * 1024  # 2 x 32 layers x 8 heads x 128 dims x 2 bytes

def test_random_weights_are_seeded_and_not_degenerate():
    a = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64), seed=1).model
    b = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64), seed=1).model
    w = a.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w, b.layers[0].self_attn.qkv_proj.weight)
    assert 0.015 < w.std().item() < 0.025 and w.unique().numel() > w.numel() // 2

def test_step_api_abort_and_metrics():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, block_size=4))
    eng = llm.engine
    eng.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    eng.add_request("b", [10, 11], SamplingParams(max_tokens=50, ignore_eos=True, temperature=0))
    finished = {}
    while "a" not in finished:
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    aborted = eng.abort_request("b")
    assert aborted.finish_reason == "abort" and not eng.has_unfinished_requests()
    assert eng.abort_request("nope") is None
    m = finished["a"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.num_prompt_tokens == 5 and m.num_output_tokens == 4 and len(m.itl) == 3
    assert m.tpot == pytest.approx((m.finished_time - m.first_token_time) / 3)
    assert m.ttft == pytest.approx(m.first_token_time - m.arrival_time) and m.e2e >= m.ttft
    st = eng.stats()
    assert st.num_used_blocks == 0 and st.num_generation_tokens == 4 + len(aborted.token_ids)
    assert st.num_prompt_tokens == 7 and st.num_steps == len(st.steps) == 4
    assert st.steps[0].num_batched_tokens == 7 and st.steps[0].num_prefill_tokens == 7
    assert st.steps[1].num_decode_tokens == 2
    # 5 + 2 tokens stored in 2 + 1 blocks of 4 after step 1: (12 - 7) / 12 slots wasted
    assert st.steps[0].internal_fragmentation == pytest.approx(5 / 12)
    assert st.attention_backend == "torch" and st.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert [s.num_running for s in st.steps] == [2, 2, 2, 1]

def test_reconfigure_keeps_weights_and_changes_pool():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, block_size=16))
    before = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    weights = llm.model.layers[0].mlp.down_proj.weight
    llm.reconfigure(llm.config.replace(block_size=4, num_gpu_blocks=32, enable_prefix_caching=False))
    assert llm.model.layers[0].mlp.down_proj.weight is weights
    st = llm.engine.stats()
    assert st.block_size == 4 and st.num_gpu_blocks == 32
    assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids == before
    llm.engine.add_request("x", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="unfinished"):
        llm.reconfigure(llm.config)
    llm.engine.abort_request("x")
    # A setting that cannot be built leaves the previous engine in place, still serving.
    with pytest.raises(ValueError, match="max_model_len=64 needs 16 blocks"):
        llm.reconfigure(llm.config.replace(num_gpu_blocks=2))
    assert llm.config.num_gpu_blocks == 32 and llm.engine.stats().block_size == 4
    assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids == before

def test_prefix_hits_and_stats_reset():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, block_size=8))
    shared = list(range(20, 60))  # 40 tokens: 5 full blocks
    llm.generate([shared + [1, 2]], GREEDY)
    llm.engine.reset_stats()
    outs = llm.generate([shared + [3], shared + [4, 5]], GREEDY)
    st = llm.engine.stats()
    assert [o.metrics.num_cached_tokens for o in outs] == [40, 40]
    assert st.prefix_cache_hits == 80 and st.prefix_cache_queries == 41 + 42
    assert st.prefix_cache_hit_rate == pytest.approx(80 / 83)

def test_reset_prefix_cache_makes_the_next_run_cold():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=128, block_size=8))
    prompt = list(range(20, 60)) + [1, 2]  # 42 tokens: 5 full blocks
    first = llm.generate([prompt], GREEDY)[0]
    assert llm.generate([prompt], GREEDY)[0].metrics.num_cached_tokens == 40  # warm: the 5 blocks hit
    assert llm.reset_prefix_cache() == 5 + 1  # the prompt's 5 blocks and the full block its output filled
    cold = llm.generate([prompt], GREEDY)[0]
    assert cold.metrics.num_cached_tokens == 0 and cold.token_ids == first.token_ids
    # Not while a request holds blocks: a clear error, nothing changed, the request still finishes.
    llm.engine.add_request("x", prompt, GREEDY)
    llm.engine.step()
    with pytest.raises(RuntimeError, match="1 requests are unfinished"):
        llm.reset_prefix_cache()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.generate([prompt], GREEDY)[0].metrics.num_cached_tokens == 40

def test_block_map_is_a_copy_of_the_pool():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, block_size=4, num_gpu_blocks=16))
    eng = llm.engine
    shared = list(range(20, 28))  # two full blocks
    eng.add_request("a", shared + [1], GREEDY)
    eng.add_request("b", shared + [2], GREEDY)
    eng.add_request("c", [3] * 52, GREEDY)  # 13 blocks: waits for a and b to finish
    eng.step()
    m = eng.block_map()
    assert m["block_size"] == 4 and len(m["blocks"]) == 16 and m["waiting"] == ["c"]
    assert list(m["running"]) == ["a", "b"] and m["running"]["a"] == 9
    a, b = m["block_tables"]["a"], m["block_tables"]["b"]
    assert a[:2] == b[:2] and a[2] != b[2]  # the prefix blocks are shared, the tails are not
    assert [m["blocks"][i] for i in a] == [(2, True), (2, True), (1, False)]
    m["block_tables"]["a"].append(99)
    m["blocks"].clear()
    fresh = eng.block_map()
    assert 99 not in fresh["block_tables"]["a"] and len(fresh["blocks"]) == 16
    while eng.has_unfinished_requests():
        eng.step()
    m = eng.block_map()
    assert m["block_tables"] == {} and m["running"] == {} and all(ref == 0 for ref, _ in m["blocks"])
    assert m["blocks"][a[0]] == (0, True)  # freed, still a cached prefix

def test_text_prompts_need_a_tokenizer():
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["hello"], GREEDY)

def test_mixed_params_per_prompt(hf_models):
    llm = LLM.from_hf_model(hf_models["llama"], EngineConfig(device="cpu", max_model_len=64))
    outs = llm.generate([[5, 6], [7, 8]], [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                          SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [2, 5]
    with pytest.raises(ValueError, match="one each"):
        llm.generate([[5], [6]], [GREEDY] * 3)


def test_failed_step_leaves_no_request_behind(monkeypatch):
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner, "execute", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([[5, 6], [7, 8]], GREEDY)
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_used_blocks == 0
    monkeypatch.undo()
    assert len(llm.generate([[5, 6]], GREEDY)[0].token_ids) == GREEDY.max_tokens
