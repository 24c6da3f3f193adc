"""Every bad setting raises a clear ValueError naming the field, and the engine stays usable."""
import pytest

from engine import LLM, EngineConfig, SamplingParams

BAD_CONFIGS = [
    ("block_size", 0), ("block_size", 3), ("block_size", 512), ("block_size", 16.0),
    ("max_num_batched_tokens", 0), ("max_num_seqs", 0), ("gpu_memory_utilization", 0.0),
    ("gpu_memory_utilization", 1.5), ("max_model_len", 0), ("quantization", "int3"),
    ("kv_cache_dtype", "fp16"), ("attention_backend", "flash"), ("num_gpu_blocks", 0),
    ("tensor_parallel_size", 0), ("enable_prefix_caching", "yes"),
]
BAD_PARAMS = [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", -2),
              ("max_tokens", 0), ("seed", 1.5)]


@pytest.mark.parametrize("field,value", BAD_CONFIGS)
def test_bad_config_names_field_and_range(field, value):
    with pytest.raises(ValueError) as err:
        EngineConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and "must be" in str(err.value)


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_bad_sampling_params_name_field_and_range(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and "must be" in str(err.value)


def test_valid_edges_accepted():
    EngineConfig(block_size=1, gpu_memory_utilization=1.0)
    EngineConfig(block_size=256, quantization="int4", kv_cache_dtype="fp8")
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, max_tokens=1)


@pytest.fixture(scope="module")
def llm():
    return LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64, num_gpu_blocks=16, block_size=8))


BAD_REQUESTS = [
    ([], "empty"), ([5] * 65, "max_model_len"), ([5, 512], "vocabulary"), ([5, -1], "vocabulary"),
]


@pytest.mark.parametrize("prompt,phrase", BAD_REQUESTS)
def test_bad_requests_rejected_at_add_request_and_engine_still_serves(llm, prompt, phrase):
    engine = llm.engine
    with pytest.raises(ValueError, match=phrase):
        engine.add_request("bad", prompt, SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests()
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_generate_validates_every_prompt_before_adding_any(llm):
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, 6], [9999]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()


def test_duplicate_request_id_rejected(llm):
    engine = llm.engine
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()


def test_kv_too_small_for_max_model_len_is_a_clear_error():
    with pytest.raises(ValueError, match="max_model_len=256 needs 32 blocks"):
        LLM.random("tiny", EngineConfig(device="cpu", max_model_len=256, num_gpu_blocks=4, block_size=8))


def test_triton_backend_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='triton' needs a CUDA device"):
        LLM.random("tiny", EngineConfig(device="cpu", attention_backend="triton", max_model_len=64))


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        LLM.random("gpt-5", EngineConfig(device="cpu"))
