"""engine.memory: the one sizing rule against hand-computed values; max_model_len=None; host-memory checks that
refuse, with a ValueError naming the setting, what would otherwise be killed by the kernel's OOM killer."""
from pathlib import Path

import pytest
import torch

import engine.memory as memory
from engine import LLM, EngineConfig, SamplingParams
from engine.memory import GiB, MiB, size_kv_cache

MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "models" / "pystdlib-llama-6m"
LLAMA_8B_KV = 128 * 1024  # bytes per token: 2 x 32 layers x 8 heads x 128 x 2 bytes


def h100(**kw):
    args = dict(total_bytes=80 * GiB, gpu_memory_utilization=0.9, weight_bytes=15 * GiB, other_bytes=100 * MiB,
                activation_peak_bytes=3 * GiB, graph_pool_bytes=500 * MiB, non_torch_bytes=600 * MiB,
                kv_bytes_per_token=LLAMA_8B_KV, block_size=16, max_model_len=8192)
    return size_kv_cache(**{**args, **kw})


def test_sizing_rule_is_hand_computed():
    s = h100()
    budget = int(0.9 * 80 * GiB)  # 72 GiB
    kv = budget - 15 * GiB - 100 * MiB - 3 * GiB - 500 * MiB - 600 * MiB - 1 * GiB  # the 1 GiB margin
    assert s.budget_bytes == budget and s.kv_cache_bytes == kv == 53 * GiB - 1200 * MiB
    assert s.bytes_per_block == 2 * MiB and s.num_blocks == kv // (2 * MiB) - 1 == 26536 - 1
    assert s.fits and s.verdict == "fits" and s.largest_max_model_len == 26535 * 16
    assert s.margin_bytes == memory.MEMORY_MARGIN_BYTES == GiB


def test_draft_share_counts_cached_segments_as_free_and_leaves_the_draft_its_15_percent():
    """engine.memory.draft_memory_share against hand-computed figures. An 80 GiB device: 6 GiB of live tensors (the
    target's weights among them), 1 GiB outside torch, and 40 GiB reserved by torch's allocator, 34 of them a cached
    segment that empty_cache() cannot return (one live block in it). cudaMemGetInfo then says 41 GiB in use, but the
    draft can have those 34: in use is 7 GiB, so the share is 7 / 80 + 0.15, and the draft's sizing (its 1 GiB of
    weights, the 6 GiB allocated before it as other memory, the 1 GiB outside torch) leaves it 15% of the device less
    its weights, 11 GiB. Counting the cached segment as in use gave it 45 GiB (the GPU test's failure)."""
    total, reserved, allocated, outside = 80 * GiB, 40 * GiB, 6 * GiB, 1 * GiB
    free = total - reserved - outside
    share = memory.draft_memory_share(gpu_memory_utilization=0.9, total_bytes=total, free_bytes=free,
                                      reserved_bytes=reserved, allocated_bytes=allocated)
    assert share == pytest.approx(7 / 80 + 0.15)
    draft = size_kv_cache(total_bytes=total, gpu_memory_utilization=share, weight_bytes=GiB, other_bytes=allocated,
                          non_torch_bytes=outside, margin_bytes=0, kv_bytes_per_token=MiB // 16, block_size=16,
                          max_model_len=256)
    assert draft.kv_cache_bytes == pytest.approx(int(0.15 * total) - GiB, abs=1) == 11 * GiB
    # nothing cached: in use is total - free, as cudaMemGetInfo says; the share never exceeds the target's
    uncached = memory.draft_memory_share(gpu_memory_utilization=0.9, total_bytes=total, free_bytes=total - 7 * GiB,
                                         reserved_bytes=allocated, allocated_bytes=allocated)
    assert uncached == pytest.approx(7 / 80 + 0.15)
    assert memory.draft_memory_share(gpu_memory_utilization=0.2, total_bytes=total, free_bytes=free,
                                     reserved_bytes=reserved, allocated_bytes=allocated) == 0.2


def test_every_build_on_cuda_returns_the_allocators_cache_first(monkeypatch):
    """LLM._drop_model, which runs before every model build: on CUDA it collects garbage and empties torch's cache even
    with no model yet (a new model's weights must not be carved from a dead engine's cached segments; the GPU test
    test_a_new_engine_returns_cached_memory_before_placing_its_weights checks the effect); on the CPU with no model it
    does nothing (no collection per build)."""
    import gc
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append("collect") or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    llm = object.__new__(LLM)
    llm.model, llm.device = None, torch.device("cuda")
    llm._drop_model()
    assert calls == ["collect", "empty_cache"]
    calls.clear()
    llm.device = torch.device("cpu")
    llm._drop_model()
    assert calls == []
    llm.model = object()
    llm._drop_model()
    assert calls == ["collect"] and llm.model is None


def test_sizing_verdicts_and_reasons():
    big = h100(num_gpu_blocks=10**9)
    assert big.verdict == "num_gpu_blocks does not fit" and "lower num_gpu_blocks to 26535" in big.reason
    assert h100(num_gpu_blocks=1000).fits and h100(num_gpu_blocks=1000).num_blocks == 1000
    weights = h100(weight_bytes=75 * GiB)
    assert weights.verdict == "weights do not fit" and "gpu_memory_utilization=0.9" in weights.reason
    long = h100(activation_peak_bytes=51 * GiB, max_model_len=131072)  # 3920 MiB left: 1959 blocks
    assert long.verdict == "max_model_len needs more KV than is left" and long.num_blocks == 1959
    assert f"the largest max_model_len that fits is {long.num_blocks * 16}" in long.reason
    assert f"lower max_model_len to {long.num_blocks * 16}" in long.reason
    # On the CPU only the budget counts (the engine's CPU pool).
    cpu = size_kv_cache(total_bytes=512 * MiB, gpu_memory_utilization=0.5, weight_bytes=10**12,
                        kv_bytes_per_token=1024, block_size=16, max_model_len=64, device="cpu")
    assert cpu.fits and cpu.num_blocks == (256 * MiB) // (16 * 1024) - 1


def test_a_changed_engine_constant_changes_the_rule(monkeypatch):
    before = h100().num_blocks
    monkeypatch.setattr(memory, "MEMORY_MARGIN_BYTES", 3 * GiB)
    assert h100().num_blocks == before - 1024  # 2 GiB more margin: 1024 fewer 2 MiB blocks
    monkeypatch.setattr(memory, "SCRATCH_BLOCKS", 5)
    assert h100().num_blocks == before - 1024 - 4


def test_shipped_model_loads_with_default_config():
    llm = LLM.from_pretrained(MODEL_DIR, EngineConfig())
    assert EngineConfig().max_model_len is None and llm.config.max_model_len == 2048  # the model's context
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3


def test_max_model_len_that_does_not_fit_names_the_largest_that_does():
    with pytest.raises(ValueError, match="the largest max_model_len that fits is 32"):
        LLM.random("tiny", EngineConfig(device="cpu", num_gpu_blocks=4, block_size=8))  # tiny's context: 4096
    llm = LLM.random("tiny", EngineConfig(device="cpu", num_gpu_blocks=4, block_size=8, max_model_len=32))
    assert llm.config.max_model_len == 32


def no_host_memory(monkeypatch, available: int):
    monkeypatch.setattr(memory, "available_host_bytes", lambda: available)


def test_preset_too_large_for_the_host_is_refused_before_loading(monkeypatch):
    no_host_memory(monkeypatch, 23 * GiB)
    with pytest.raises(ValueError, match=r"llama-3.1-8b \(8.03B parameters, float32 weights.*needs 29.9 GiB.*"
                                         r"23.0 GiB available.*dtype=torch.bfloat16"):
        LLM.random("llama-3.1-8b", EngineConfig(device="cpu"))


def test_checkpoint_too_large_for_the_host_is_refused_before_loading(monkeypatch):
    no_host_memory(monkeypatch, 10 * MiB)
    with pytest.raises(ValueError, match="loading pystdlib-llama-6m .*host memory"):
        LLM.from_pretrained(MODEL_DIR, EngineConfig(device="cpu"))


@pytest.mark.parametrize("field, value", [("max_num_batched_tokens", 10**9), ("num_gpu_blocks", 10**9)])
def test_cpu_buffers_beyond_host_memory_are_refused(field, value):
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    with pytest.raises(ValueError, match=f"{field}={value}.*GiB of host memory; this machine has"):
        llm.reconfigure(llm.config.replace(**{field: value}))
    assert llm.config.max_model_len == 64 and llm.generate([[5, 6]], SamplingParams(max_tokens=2))  # still serves


def test_both_runners_implement_the_runner_protocol():
    from engine.distributed import TPRunner
    from engine.runner import ModelRunner, Runner
    methods = [n for n in vars(Runner) if not n.startswith("_") and callable(getattr(Runner, n))]
    assert {"execute", "close", "determine_num_blocks", "release_all"} <= set(methods)
    for cls in (ModelRunner, TPRunner):
        assert all(callable(getattr(cls, n, None)) for n in methods), cls
    llm = LLM.random("tiny", EngineConfig(device="cpu", max_model_len=64))
    assert isinstance(llm.engine.runner, Runner)


def test_building_a_bf16_model_never_allocates_float32_parameters(monkeypatch):
    # Casting after to_empty() allocated every weight in float32 first: mixtral-8x7b needed 187 GB to load 93 GB.
    import torch

    from engine.model import ModelSpec, preset_config
    from engine.model.weights import build_model
    allocated = []
    to_empty = torch.nn.Module.to_empty

    def spy(self, *, device, recurse=True):
        allocated.extend(p.dtype for p in self.parameters())
        return to_empty(self, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    model = build_model(ModelSpec.from_hf_config(preset_config("tiny")), None, torch.bfloat16, torch.device("cpu"), 64)
    assert allocated and set(allocated) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
