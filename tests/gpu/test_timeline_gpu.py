"""The step timeline and deep mode on CUDA: lazily read CUDA-event device times, graph padding, kernel classes."""
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _llm(**kw):
    from engine import LLM, EngineConfig
    return LLM.random("tiny", EngineConfig(max_model_len=256, block_size=16, **kw), dtype=torch.float16)


def test_device_time_padding_and_phases_on_cuda():
    from engine import SamplingParams
    llm = _llm()
    # 3 requests decode together: the CUDA graph of batch size 4 runs them with one padding row.
    llm.generate([[5] * 20, [6] * 30, [7] * 40], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    st = llm.engine.stats()
    for s in st.steps:
        assert math.isfinite(s.device_time) and 0 < s.device_time <= s.duration
        assert s.start - 1e-3 <= s.device_start <= s.time + 1e-3
        phases = s.schedule_time + s.prepare_time + s.launch_time + s.sample_time + s.output_time
        assert phases == pytest.approx(s.duration, abs=1e-9)
    graph_steps = [s for s in st.steps if s.cuda_graph]
    assert graph_steps and all(s.num_padding_tokens == 1 for s in graph_steps if s.num_decode_tokens == 3)
    assert all(s.num_padding_tokens == 0 for s in st.steps if not s.cuda_graph)


def test_deep_mode_sees_gemm_and_attention_kernels():
    from engine import SamplingParams
    from engine.profiling import KERNEL_CLASSES
    llm = _llm()
    llm.generate([[5] * 40, [6] * 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                 profile="kernels")
    prof = llm.engine.stats().kernel_profile
    by = prof.by_class()
    assert prof.device == "cuda" and set(by) == set(KERNEL_CLASSES) | {"idle"}
    assert by["gemm"] > 0 and by["attention_prefill"] + by["attention_decode"] > 0
    # Kernels that overlap (a PDL launch starts before the kernel before it ends) count once, for the earlier one
    # (engine.profiling.KernelProfile): the classes add up to the busy time, and busy + idle is the window.
    assert sum(v for k, v in by.items() if k != "idle") == pytest.approx(prof.window - by["idle"], rel=0.01)


def test_deep_mode_counts_int4_kernels_as_gemm():
    """A quantized engine's linears run the int4 kernels (GEMV at 1-2 rows, MMA/tc tiles above): deep mode counts
    them as GEMM time."""
    from transformers import LlamaConfig

    from engine import LLM, EngineConfig, SamplingParams
    hf = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    llm = LLM.random(hf, EngineConfig(max_model_len=512, max_num_seqs=32, gpu_memory_utilization=0.3,
                                      quantization="int4"), dtype=torch.bfloat16)
    prompts = [[3 + i] * (10 + i) for i in range(20)]  # decode steps of 20 rows, prefill of ~390 tokens
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), profile="kernels")
    prof = llm.engine.stats().kernel_profile
    names = {k[0]: k[1] for k in prof.kernels}
    quant = [n for n in names if n.startswith(("_int4_", "_x_limbs"))]
    assert quant and all(names[n] == "gemm" for n in quant), names
    assert prof.by_class()["gemm"] > 0
