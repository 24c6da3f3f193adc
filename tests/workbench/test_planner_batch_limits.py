"""The planner plans the batch limits the engine would pick on the planned GPU when a config leaves them at None."""
from engine import EngineConfig
from workbench.planner import plan


def test_planner_uses_the_engines_batch_defaults():
    big = plan("llama-3.1-8b", "H200", EngineConfig())
    assert (big.max_num_seqs, big.max_num_batched_tokens) == (1024, 16384)
    a100 = plan("llama-3.1-8b", "A100-80GB", EngineConfig())
    assert (a100.max_num_seqs, a100.max_num_batched_tokens) == (256, 8192)
    cpu = plan("tiny", "cpu", EngineConfig())
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (256, 8192)
    explicit = plan("llama-3.1-8b", "H200", EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192))
    assert (explicit.max_num_seqs, explicit.max_num_batched_tokens) == (256, 8192)
