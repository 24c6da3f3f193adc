"""Qwen3, Phi-3, Gemma 2, Gemma 3, Mixtral and Qwen3-MoE: greedy tokens equal HF transformers' (float32, CPU),
loaded from an in-memory model and from a (sharded) save_pretrained folder, with chunked prefill, prefix
caching and preemption, prompts several times longer than the sliding window included."""
import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.kv.groups import kv_cache_groups
from engine.model.spec import ModelSpec
from family_models import (FAMILIES, WINDOW, assert_case_counters, make_family_model, perturb_weights,
                           tiny_family_config)

TIE_GAP = 1e-4  # a first divergence is accepted only where HF's top two logits are this close


def hf_greedy(model, prompt, max_new_tokens):
    """HF's greedy tokens and, per step, the gap between its two best logits."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), gaps


def assert_same_greedy(got, expected, gaps, what):
    """Equal tokens, or equal up to a step where HF itself had a near-tie (then the paths may part)."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert gaps[i] < TIE_GAP, f"{what}: token {i} is {a}, HF chose {b} (top-2 gap {gaps[i]:.2e})"
            return
    assert len(got) == len(expected), what


def make_prompts(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models():
    return {kind: make_family_model(kind) for kind in FAMILIES}


@pytest.fixture(scope="module")
def references(models):
    """Prompts of 1..130 tokens (up to 5x the window) with mixed output lengths, and HF's greedy run of each."""
    lengths, max_tokens = [1, 9, 33, 70, 130], [10, 20, 6, 14, 12]
    refs = {}
    for kind, model in models.items():
        prompts = make_prompts(1, lengths)
        prompts.append(prompts[4][:64] + make_prompts(2, [20])[0])  # shares 64 tokens with the 130-token prompt
        refs[kind] = [(p, n, *hf_greedy(model, p, n)) for p, n in zip(prompts, max_tokens + [10])]
    return refs


CASES = {
    "block4": dict(block_size=4, max_num_batched_tokens=2048),
    "block16-prefix-cache": dict(block_size=16, enable_prefix_caching=True),
    "chunked-prefill": dict(block_size=8, max_num_batched_tokens=29),
    # 20 blocks of 8 = 160 slots for 6 requests of up to 142 tokens: forces preemption.
    "preemption": dict(block_size=8, num_gpu_blocks=20, max_num_batched_tokens=256, max_model_len=144),
}


def case_config(kind: str, case: str) -> dict:
    """CASES[case], with the preemption pool of a sliding-window model scaled to the same memory: its blocks each
    hold one KV cache group (1/num_groups of the layers), and a sliding group keeps only its window's blocks, so
    the requests also prefill in chunks of 64 to still run out of blocks."""
    cfg = dict(CASES[case])
    spec = LLM.model_spec(tiny_family_config(kind))
    groups = kv_cache_groups(spec.layer_windows, spec.num_layers)
    if case == "preemption" and any(g.sliding_window for g in groups):
        cfg.update(num_gpu_blocks=20 * len(groups), max_num_batched_tokens=64)
    return cfg


def run(llm, refs):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n, _, _ in refs]
    return llm.generate([p for p, _, _, _ in refs], params)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf(models, references, kind, case):
    cfg = EngineConfig(device="cpu", **{"max_model_len": 256, **case_config(kind, case)})
    llm = LLM.from_hf_model(models[kind], cfg)
    outs = run(llm, references[kind])
    for (prompt, n, expected, gaps), out in zip(references[kind], outs):
        assert_same_greedy(out.token_ids, expected, gaps, f"{kind}/{case}: prompt of {len(prompt)} tokens")
        assert out.finish_reason == "length" and len(out.token_ids) == n
    assert_case_counters(llm.engine.stats(), case, 29)


@pytest.mark.parametrize("kind", FAMILIES)
def test_from_sharded_folder_matches_hf(models, references, kind, tmp_path):
    """save_pretrained in small shards (per-expert tensors on disk for the MoE models), loaded offline."""
    models[kind].save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    llm = LLM.from_pretrained(tmp_path, EngineConfig(device="cpu", max_model_len=256, block_size=16))
    for (prompt, n, expected, gaps), out in zip(references[kind], run(llm, references[kind])):
        assert_same_greedy(out.token_ids, expected, gaps, f"{kind} from folder: prompt of {len(prompt)} tokens")


@pytest.mark.parametrize("kind", FAMILIES)
def test_prompt_logits_match_hf(models, kind):
    model = models[kind]
    ids = make_prompts(3, [90])[0]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=128, block_size=16))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.prompt_logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_window_changes_the_output(models):
    """The sliding window is not a no-op on these prompts: full attention gives other logits."""
    from dataclasses import replace
    model = models["gemma3"]
    ids = make_prompts(4, [80])[0]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=128, block_size=16))
    windowed = llm.prompt_logits(ids)
    for layer in llm.model.layers:
        layer.self_attn.attend_options.pop("sliding_window", None)
    full = llm.prompt_logits(ids)
    assert (windowed[WINDOW:] - full[WINDOW:]).abs().max() > 1e-3
    torch.testing.assert_close(windowed[:WINDOW], full[:WINDOW])  # within the window nothing changes


def test_spec_reads_each_family():
    specs = {k: ModelSpec.from_hf_config(tiny_family_config(k)) for k in FAMILIES}
    assert specs["gemma2"].layer_windows == (WINDOW, None, WINDOW)
    assert specs["gemma3"].layer_windows == (WINDOW, WINDOW, None, WINDOW)
    assert specs["gemma3"].rope_local_theta == 10000.0 and specs["gemma3"].rope_theta == 1e6
    assert specs["gemma3"].rope_scaling["factor"] == 4.0
    assert specs["gemma2"].attn_scale == 24 ** -0.5 and specs["gemma2"].final_softcap == 20.0
    assert specs["phi3"].layer_windows == (WINDOW, WINDOW)
    assert specs["qwen3"].qk_norm and specs["qwen3"].layer_windows == (None, None)
    assert specs["qwen3_moe"].moe_layers == (True, False, True) and not specs["qwen3_moe"].norm_topk_prob
    assert specs["mixtral"].num_experts == 4 and specs["mixtral"].norm_topk_prob
    assert specs["mistral_window"].layer_windows == (WINDOW, WINDOW)


@pytest.mark.parametrize("kind", FAMILIES)
def test_num_params_counts_the_hf_model(models, kind):
    hf = sum(p.numel() for p in models[kind].parameters())  # a tied head counted once, as ours
    assert ModelSpec.from_hf_config(models[kind].config).num_params() == hf


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelSpec.from_hf_config({"model_type": "gpt2"})


@pytest.mark.parametrize("window,softcap", [(None, 1.5), (5, None), (16, 2.0), (40, None)])
def test_attention_backends_take_window_and_softcap(window, softcap):
    """The Triton kernels (CPU interpreter) and the torch decode path against the reference, for decodes and
    (chunked) prefills with contexts longer than the window; keys older than every window are NaN for the
    decodes, so reading one fails."""
    import os
    from engine.kernels import TorchBackend
    from engine.kernels.reference import paged_attention_reference, random_paged_batch
    requests = [(37, 1), (3, 1), (50, 1), (0, 23), (30, 9)]
    q, k_cache, v_cache, meta, _, _ = random_paged_batch(requests, num_kv_heads=2, group=2, head_dim=16,
                                                         block_size=4, dtype=torch.float32, seed=7)
    expected = paged_attention_reference(q, k_cache, v_cache, meta, 0.25, sliding_window=window, softcap=softcap)
    if window is not None:  # no decode may read a key older than its window
        for i, (ctx, n) in enumerate(requests[:3]):
            old = max(ctx + n - window, 0)
            for pos in range(old):
                blk = int(meta.block_tables[i, pos // 4])
                k_cache[blk, pos % 4] = float("nan")
                v_cache[blk, pos % 4] = float("nan")
    backends = [TorchBackend()]
    if os.environ.get("TRITON_INTERPRET") == "1":
        from engine.kernels.triton_backend import TritonBackend
        backends.append(TritonBackend())
    for backend in backends:
        got = backend.attend(q, k_cache, v_cache, meta, 0.25, sliding_window=window, softcap=softcap)
        torch.testing.assert_close(got[:3], expected[:3], atol=2e-5, rtol=2e-5, msg=f"{backend.name} decode")
        if window is None:
            torch.testing.assert_close(got[3:], expected[3:], atol=2e-5, rtol=2e-5, msg=f"{backend.name} prefill")
    if window is not None:  # prefills, over the cache without NaNs
        q, k_cache, v_cache, meta, _, _ = random_paged_batch(requests[3:], num_kv_heads=2, group=2, head_dim=16,
                                                             block_size=4, dtype=torch.float32, seed=8)
        expected = paged_attention_reference(q, k_cache, v_cache, meta, 0.25, sliding_window=window, softcap=softcap)
        for backend in backends:
            got = backend.attend(q, k_cache, v_cache, meta, 0.25, sliding_window=window, softcap=softcap)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=f"{backend.name} prefill")
        full = paged_attention_reference(q, k_cache, v_cache, meta, 0.25, softcap=softcap)
        if window < 30:  # the prefills reach 39 tokens: a window of 40 changes nothing there
            assert (full - expected).abs().max() > 1e-3


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_triton_engine_runs_sliding_windows_like_torch(models, kind="gemma2"):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 40)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM.from_hf_model(models[kind], EngineConfig(device="cpu", max_model_len=64, block_size=8,
                                                            max_num_batched_tokens=16, attention_backend=backend))
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]


# Published parameter counts (billions): total, and activated per token with the embedding table included.
PUBLISHED = {"qwen3-8b": (8.19, None), "qwen3-30b-a3b": (30.5, 3.3), "mixtral-8x7b": (46.7, 12.9),
             "gemma-2-9b": (9.24, None), "gemma-3-12b": (11.77, None), "phi-3-mini": (3.82, None)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_the_published_sizes(name):
    spec = LLM.model_spec(name)
    total, active = PUBLISHED[name]
    assert spec.num_params() / 1e9 == pytest.approx(total, rel=0.01)
    if active is not None:
        embed = spec.vocab_size * spec.hidden_size
        assert (spec.num_active_params() + embed) / 1e9 == pytest.approx(active, rel=0.02)
        assert spec.active_weight_bytes(2) == 2 * spec.num_active_params() < spec.weight_bytes(2) / 3


def test_kv_bytes_count_sliding_layers_once_the_window_is_full():
    spec = LLM.model_spec("gemma-3-12b")  # 40 sliding layers (window 1024) and 8 global ones
    per_layer_token = 2 * spec.num_kv_heads * spec.head_dim * 2
    assert spec.kv_bytes_for_tokens(4096, 2) == (8 * 4096 + 40 * 1024) * per_layer_token
    assert spec.kv_bytes_for_tokens(512, 2, block_size=16) == 48 * 512 * per_layer_token
    # With 16-token blocks a sliding layer keeps the blocks its 1024-token window can touch: 65.
    assert spec.kv_bytes_for_tokens(4096, 2, block_size=16) == (8 * 4096 + 40 * 65 * 16) * per_layer_token
    assert spec.kv_bytes_per_token(2) * 4096 / spec.kv_bytes_for_tokens(4096, 2, 16) > 1.5
    dense = LLM.model_spec("qwen3-8b")
    assert dense.kv_bytes_for_tokens(4096, 2) == dense.kv_bytes_per_token(2) * 4096


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_kernel_matches_the_torch_path(dtype):
    from engine.kernels import TorchBackend
    from engine.kernels.qk_norm import qk_norm_triton_
    from engine.model.llama import Attention
    from engine.model.rotary import RotaryEmbedding
    spec = ModelSpec.from_hf_config(tiny_family_config("qwen3"))
    attn = Attention(spec, RotaryEmbedding(spec.head_dim, 64, 1e4, None), 0).to(dtype)
    with torch.no_grad():
        attn.q_norm.weight.normal_(1.0, 0.2)
        attn.k_norm.weight.normal_(1.0, 0.2)
    qkv = torch.randn(7, attn.q_size + 2 * attn.kv_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = attn._norm_qk(qkv.clone(), TorchBackend())
    got = qk_norm_triton_(qkv.clone(), attn.q_norm.weight, attn.k_norm.weight, spec.num_heads, spec.num_kv_heads,
                          spec.head_dim, attn.q_norm.eps)
    torch.testing.assert_close(got, expected, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-5)


def test_hub_style_configs_and_multimodal_gemma3_folder(models, references, tmp_path):
    """config.json as older Hub checkpoints have it (no layer_types: Gemma 2's windows alternate by
    transformers' default; Gemma 3's from sliding_window_pattern and legacy rope fields), and Gemma 3 saved
    as the multimodal checkpoint people download (language_model.model.* tensors beside a vision tower)."""
    import json
    from safetensors.torch import save_file
    for kind in ("gemma2", "gemma3"):
        model = models[kind]
        folder = tmp_path / kind
        model.save_pretrained(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("layer_types")
        if kind == "gemma3":
            rope = cfg.pop("rope_parameters")
            cfg.update(rope_theta=rope["full_attention"]["rope_theta"], sliding_window_pattern=6,
                       rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                       rope_scaling={"rope_type": "linear", "factor": rope["full_attention"]["factor"]})
            # Our tiny Gemma 3 has layer types [s, s, full, s]: pattern 6 gives [s, s, s, s]. Compare specs only.
            spec = ModelSpec.from_hf_config(cfg)
            assert spec.layer_windows == (WINDOW,) * 4 and spec.rope_local_theta == 10000.0
            assert spec.rope_scaling == {"rope_type": "linear", "factor": 4.0}
            continue
        (folder / "config.json").write_text(json.dumps(cfg))
        llm = LLM.from_pretrained(folder, EngineConfig(device="cpu", max_model_len=256, block_size=16))
        assert llm.spec.layer_windows == (WINDOW, None, WINDOW)
        for (prompt, n, expected, gaps), out in zip(references[kind], run(llm, references[kind])):
            assert_same_greedy(out.token_ids, expected, gaps, f"{kind} hub config: prompt of {len(prompt)} tokens")
    # The multimodal layout: Gemma3Config with a text_config; tensors under language_model.model.*.
    text = models["gemma3"]
    folder = tmp_path / "gemma3-mm"
    folder.mkdir()
    state = {f"language_model.model.{k.removeprefix('model.')}": v.contiguous() for k, v in text.state_dict().items()
             if k != "lm_head.weight"}
    state["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    save_file(state, str(folder / "model.safetensors"))
    text_cfg = text.config.to_dict()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_cfg,
                                                    "vision_config": {"model_type": "siglip_vision_model"}}))
    llm = LLM.from_pretrained(folder, EngineConfig(device="cpu", max_model_len=256, block_size=16))
    for (prompt, n, expected, gaps), out in zip(references["gemma3"], run(llm, references["gemma3"])):
        assert_same_greedy(out.token_ids, expected, gaps, f"multimodal gemma3 folder: prompt of {len(prompt)} tokens")


def test_unsupported_rope_scaling_is_a_value_error():
    cfg = tiny_family_config("phi3").to_dict()
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                              "long_factor": [1.0] * 8, "original_max_position_embeddings": 512}
    with pytest.raises(ValueError, match="longrope"):
        ModelSpec.from_hf_config(cfg)


def test_multimodal_gemma3_in_memory_runs_its_language_model():
    """Gemma3ForConditionalGeneration (vision tower included) through from_hf_model: text-only logits equal HF's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=300, sliding_window=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        boi_token_index=290, eoi_token_index=291,
                                                        image_token_index=292)).eval()
    perturb_weights(model)
    ids = make_prompts(6, [30], vocab=280)[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    llm = LLM.from_hf_model(model, EngineConfig(device="cpu", max_model_len=64, block_size=8))
    assert llm.spec.model_type == "gemma3_text" and llm.spec.layer_windows == (8, 8)
    torch.testing.assert_close(llm.prompt_logits(ids), expected, atol=1e-4, rtol=1e-4)
