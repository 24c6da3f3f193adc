"""The vllm serve line of a results row: the key settings always, others only when not the default."""
from workbench.recommend import vllm_serve_command

ROW = {"block_size": 32, "max_num_batched_tokens": 4096, "max_num_seqs": 128, "enable_prefix_caching": True}


def test_async_scheduling_flag_only_when_chosen():
    assert "async-scheduling" not in vllm_serve_command({**ROW, "async_scheduling": None})  # auto: vLLM's default
    assert vllm_serve_command({**ROW, "async_scheduling": True}).endswith(" --async-scheduling")
    assert vllm_serve_command({**ROW, "async_scheduling": False}).endswith(" --no-async-scheduling")
    assert vllm_serve_command(ROW, "m") == ("vllm serve m --block-size 32 --max-num-batched-tokens 4096 "
                                            "--max-num-seqs 128 --enable-prefix-caching")
