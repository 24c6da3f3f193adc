"""Issue 19's families on one GPU: the Triton engine (CUDA graphs for decode, fused MoE, windowed attention,
q/k-norm kernel) gives the torch engine's greedy tokens on the same GPU, float32 tiny random models; and the
windowed / soft-capped Triton attention and the fused MoE kernels in bf16 against their references."""
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

from family_models import FAMILIES, make_family_model  # noqa: E402


@pytest.mark.parametrize("kind", FAMILIES)
def test_triton_engine_with_cuda_graphs_matches_torch_engine(kind):
    """Same greedy tokens, or a first divergence where the torch engine's top two logits are within the
    Triton kernels' tf32 rounding (a near-tie)."""
    model = make_family_model(kind)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 9, 40, 90)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens, llms = {}, {}
    for backend in ("torch", "triton"):
        # A fixed pool: both engines live at once, and a share of the GPU would leave the second nothing.
        cfg = EngineConfig(device="cuda", max_model_len=128, block_size=16, max_num_batched_tokens=48,
                           max_num_seqs=8, attention_backend=backend, num_gpu_blocks=256)
        llms[backend] = LLM.from_hf_model(model, cfg, dtype=torch.float32)
        tokens[backend] = [o.token_ids for o in llms[backend].generate(prompts, params)]
    assert llms["triton"].engine.stats().cuda_graphs
    for prompt, a, b in zip(prompts, tokens["triton"], tokens["torch"]):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                logits = llms["torch"].prompt_logits(prompt + b[:i])[-1]
                top = logits.topk(2).values
                assert top[0] - top[1] < 2e-2, f"{kind}: token {i} differs ({x} vs {y}) without a near-tie"
                break


@pytest.mark.parametrize("window,softcap", [(None, 50.0), (64, None), (1024, 30.0)])
def test_windowed_attention_bf16(window, softcap):
    from engine.kernels.metadata import AttentionMetadata
    from engine.kernels.reference import paged_attention_reference, random_paged_batch
    from engine.kernels.triton_backend import TritonBackend
    requests = [(700, 1), (3000, 1), (0, 300), (900, 77)]
    q, k, v, meta, _, _ = random_paged_batch(requests, num_kv_heads=8, group=2, head_dim=256, block_size=16,
                                             dtype=torch.bfloat16, seed=1, device="cuda")
    scale = 256 ** -0.5
    got = TritonBackend().attend(q, k, v, meta, scale, sliding_window=window, softcap=softcap)
    cpu_meta = AttentionMetadata(meta.slot_mapping.cpu(), meta.query_start_loc.cpu(), meta.seq_lens.cpu(),
                                 meta.block_tables.cpu(), meta.num_decodes, meta.max_query_len, meta.max_seq_len,
                                 meta.query_start_loc_cpu, meta.seq_lens_cpu)
    expected = paged_attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), cpu_meta, scale,
                                         sliding_window=window, softcap=softcap)
    torch.testing.assert_close(got.float().cpu(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("t", [1, 3, 64, 700])
@pytest.mark.parametrize("shape", [(128, 8, 2048, 768), (8, 2, 4096, 1792)])  # Qwen3-30B-A3B; Mixtral, I/8
def test_fused_moe_bf16_real_shapes(t, shape):
    from engine.kernels.moe import fused_moe
    from engine.kernels.moe_reference import fused_moe_reference, route_topk
    e, k, h, i = shape
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) / i ** 0.5).bfloat16()
    weights, ids = route_topk(torch.randn(t, e, device="cuda", generator=g), k, True)
    expected = fused_moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_moe(x, w13, w2, weights, ids).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("t", [1, 2, 4, 16])
@pytest.mark.parametrize("path", ["gemv", "dedup"])
@pytest.mark.parametrize("shape", [(128, 8, 2048, 768), (8, 2, 4096, 1792)])  # Qwen3-30B-A3B; Mixtral, I/8
def test_small_batch_moe_paths_bf16_in_a_cuda_graph(t, path, shape):
    """The decode path with the routing fused into gate_up and the dedup path (fused_moe_from_logits), captured
    in a CUDA graph after one eager call (the autotuner's), replayed on new inputs: the reference's output and
    route_topk's experts, written to routing_out."""
    from engine.kernels.moe import fused_moe_from_logits
    from engine.kernels.moe_reference import fused_moe_reference, route_topk
    e, k, h, i = shape
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    logits = torch.randn(t, e, device="cuda", generator=g)  # float32: in bf16, ties (topk's order among equals
    # is unspecified) would be likely among 128 experts
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) / i ** 0.5).bfloat16()
    routing = torch.zeros(t, k, dtype=torch.int64, device="cuda")
    fused_moe_from_logits(x, logits, w13, w2, k, True, routing, path=path)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_from_logits(x, logits, w13, w2, k, True, routing, path=path)
    x.copy_(torch.randn(t, h, device="cuda", generator=g))
    logits.copy_(torch.randn(t, e, device="cuda", generator=g))
    graph.replay()
    weights, ids = route_topk(logits, k, True)
    assert torch.equal(routing, ids)
    expected = fused_moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert (out.float() - expected).abs().max() <= 0.02 * expected.abs().max()
