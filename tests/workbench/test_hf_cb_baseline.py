"""`bench --baseline hf-cb`: transformers' continuous batching over a workload gives HF generate's greedy tokens,
exactly max_tokens of them per request (EOS disabled), on a tiny random Llama."""
import torch

from workbench.baselines import HF_CB_LABEL, run_hf_cb_baseline
from workbench.workloads import RequestSpec, Workload


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():  # well-separated greedy choices (HF's 0.02 init gives near-ties)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def test_hf_cb_matches_hf_generate_token_for_token():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    lens = [(5, 7), (23, 3), (1, 9), (40, 12), (17, 1)]
    reqs = [RequestSpec(f"q{i}", tuple(torch.randint(3, 512, (p,), generator=g).tolist()), o)
            for i, (p, o) in enumerate(lens)]
    # EOS (2) inside a prompt and as a likely output must not stop anything.
    reqs.append(RequestSpec("eos", (2, 2, 5, 2), 6))
    run = run_hf_cb_baseline(model, Workload("hand-made", tuple(reqs)), num_blocks=16, max_batch_tokens=64)
    assert run.name == HF_CB_LABEL and run.summary["num_length_mismatches"] == 0
    assert run.requests["request_id"].tolist() == [r.request_id for r in reqs]
    for r, got in zip(reqs, run.requests["token_ids"]):
        ref = model.generate(torch.tensor([r.prompt_token_ids]), attention_mask=torch.ones(1, r.prompt_len, dtype=torch.long),
                             max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, r.prompt_len:].tolist()
        assert got == ref, r.request_id
    assert run.summary["total_output_tokens"] == sum(r.max_tokens for r in reqs)
    assert run.summary["output_throughput"] > 0 and run.duration > 0


def test_bench_command_runs_the_hf_cb_baseline(tmp_path, capsys):
    import json

    from workbench.__main__ import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--workload", "fixed", "--num-requests", "4", "--device", "cpu",
                 "--workload-arg", "prompt_len=12", "--workload-arg", "output_len=5", "--baseline", "hf-cb",
                 "--set", "max_model_len=128", "--out", str(out)]) == 0
    assert f"engine / {HF_CB_LABEL} (output tok/s)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["baseline"]["name"] == HF_CB_LABEL and result["baseline"]["num_length_mismatches"] == 0
    assert result["engine"]["total_output_tokens"] == result["baseline"]["total_output_tokens"] == 20
    assert result["config"]["max_num_seqs"] == 256  # the limits the engine picked on the CPU, not None
