"""Mixture-of-experts decode at batch 1 against the time to read the active weights (issue 19), one GPU.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/moe_bench.py --out data/benchmarks/moe_bench_h200.json

For each model (qwen3-30b-a3b, mixtral-8x7b; bf16, random weights, CUDA graphs, Triton backend):
1. the fused MoE kernels against the pure-torch reference on layer 0's real-size weights (T = 1, 4, 64, 512);
2. the MoE layer alone at T = 1 (route + decode-path kernels) against its own weight bytes, with a small
   sweep of the decode kernels' K tile and warps;
3. decode at batch 1 (128-token prompt, 128 new tokens): TPOT vs active weight bytes (router + the k chosen
   experts + attention + norms + LM head, ModelSpec.active_weight_bytes) / copy bandwidth; --runs runs,
   each next to a fresh copy-bandwidth measurement (interleaved), median and spread. Target: <= 1.5x.
With --parts ...,trace also: 4. the 1000-request ShareGPT-like trace (synthetic lengths), measured time against
a MoE-aware per-step limit (max of FLOPs of the active parameters / matmul rate and bytes / copy bandwidth,
the bytes counting each MoE layer's expected distinct experts E (1 - (1 - k/E)^T) for T batched tokens under
even routing, plus KV reads), reported as limit / measured (workbench.bench.step_limits assumes a dense model).
Writes JSON (command, device, versions, every run) to --out. About 3-4 minutes on an H200 without the trace.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.kernels.moe import fused_moe, fused_moe_decode, route_topk_triton
from engine.kernels.moe_reference import fused_moe_reference, route_topk
from workbench.bench import median_cuda_time

CFG = EngineConfig(block_size=16, max_num_seqs=4, max_num_batched_tokens=2048, max_model_len=1024,
                   num_gpu_blocks=512, attention_backend="triton")
TARGET = 1.5


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_time(fn, repeats=50) -> float:
    """Median seconds of fn() over repeats, CUDA events, after a warm-up call."""
    return median_cuda_time(fn, repeats)


def copy_bandwidth(nbytes=2 * 1024**3) -> float:
    """Device-to-device copy rate, bytes read + written per second (as workbench.bench.measure_device_rates)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t


def moe_layer(llm):
    layer = next(l for l in llm.model.layers if hasattr(l.mlp, "w13"))
    return layer.mlp


def kernel_check(mlp) -> dict:
    """Max |fused - reference| / max |reference| in bf16 for both paths' token counts."""
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (1, 4, 64, 512):
        x = torch.randn(t, mlp.w13.shape[2], device="cuda", dtype=torch.bfloat16, generator=g)
        w, ids = route_topk(mlp.gate(x), mlp.top_k, mlp.renormalize)
        w_k, ids_k = route_topk_triton(mlp.gate(x), mlp.top_k, mlp.renormalize)
        ref = fused_moe_reference(x.float(), mlp.w13.float(), mlp.w2.float(), w, ids)
        got = fused_moe(x, mlp.w13, mlp.w2, w, ids).float()
        out[f"T{t}"] = {"rel_err": float((got - ref).abs().max() / ref.abs().max()),
                        "routing_equal": bool(torch.equal(ids, ids_k))}
    return out


def kernel_time(mlp, bw: float) -> dict:
    """The MoE layer at T = 1: route + decode kernels, vs reading its router and k experts at bw."""
    x = torch.randn(1, mlp.w13.shape[2], device="cuda", dtype=torch.bfloat16)
    e, two_i, h = mlp.w13.shape
    k = mlp.top_k
    ideal = (e * h + k * 3 * h * (two_i // 2)) * 2 / bw
    w, ids = route_topk_triton(mlp.gate(x), k, mlp.renormalize)
    sweep = {}
    for bk in (128, 256, 512):
        for warps in (4, 8):
            sweep[f"bk{bk}_w{warps}"] = cuda_time(
                lambda: fused_moe_decode(x, mlp.w13, mlp.w2, w, ids, block_k=bk, num_warps=warps), 100) * 1e6
    whole = cuda_time(lambda: fused_moe(x, mlp.w13, mlp.w2, *route_topk_triton(mlp.gate(x), k, mlp.renormalize)),
                      100)
    from engine.kernels import moe
    tuned = {name: str(getattr(k, "best_config", None)) for name, k in
             (("gate_up", moe._gate_up_tuned), ("down", moe._down_tuned))}
    return {"moe_layer_us": whole * 1e6, "ideal_us": ideal * 1e6, "ratio": whole / ideal,
            "decode_kernels_sweep_us": sweep, "best_of_sweep": min(sweep, key=sweep.get),
            "autotuned": tuned}


def decode_runs(llm, runs: int) -> dict:
    g = np.random.default_rng(1)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    active = llm.spec.active_weight_bytes(2)
    rows = []
    for r in range(runs):
        bw = copy_bandwidth()
        prompt = g.integers(3, llm.spec.vocab_size, 128).tolist()
        llm.engine.reset_stats()
        out = llm.generate([prompt], params)[0]
        st = llm.engine.stats()
        graph_steps = sum(s.cuda_graph for s in st.steps)
        ideal = active / bw
        rows.append({"run": r, "copy_bandwidth": bw, "tpot_ms": out.metrics.tpot * 1e3, "ideal_ms": ideal * 1e3,
                     "ratio": out.metrics.tpot / ideal, "graph_steps": graph_steps,
                     "expert_imbalance": st.expert_imbalance})
        log(f"  run {r}: TPOT {out.metrics.tpot * 1e3:.3f} ms, ideal {ideal * 1e3:.3f} ms "
            f"({rows[-1]['ratio']:.2f}x), copy {bw / 1e12:.2f} TB/s, {graph_steps} graph steps")
    ratios = [r["ratio"] for r in rows]
    med = float(np.median(ratios))
    return {"runs": rows, "active_weight_bytes": active, "total_weight_bytes": llm.spec.weight_bytes(2),
            "tpot_ms_median": float(np.median([r["tpot_ms"] for r in rows])),
            "ratio_median": med, "ratio_spread": [min(ratios), max(ratios)],
            "target": f"<= {TARGET}", "met": med <= TARGET}


TRACE_CFG = EngineConfig(block_size=16, max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=2048)


def moe_step_limits(steps, spec, kv_bytes_per_token: int, rates: dict):
    """Per step: seconds the GPU needs at least (see the module doc, part 4), as a numpy array."""
    h, e, k, i = spec.hidden_size, spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size
    head = spec.vocab_size * h
    expert_bytes = 3 * h * i * 2
    dense_bytes = spec.active_weight_bytes(2) - spec.num_moe_layers * k * expert_bytes
    tokens = steps["num_batched_tokens"].to_numpy(dtype=float)
    distinct = e * (1 - (1 - k / e) ** tokens)
    moved = (dense_bytes + spec.num_moe_layers * distinct * expert_bytes
             + kv_bytes_per_token * (steps["num_kv_tokens_read"].to_numpy() + tokens))
    attn_width = spec.num_layers * spec.num_heads * spec.head_dim
    flops = (2 * (spec.num_active_params() - head) * tokens + 2 * head * steps["num_sampled_tokens"].to_numpy()
             + 4 * attn_width * steps["num_attention_scores"].to_numpy())
    return np.maximum(flops / rates["matmul_flops"], moved / rates["copy_bandwidth"])


def trace_1000(llm) -> dict:
    from workbench.bench import measure_device_rates, run_engine
    from workbench.workloads import sharegpt_like
    llm.reconfigure(TRACE_CFG)
    rates = measure_device_rates()
    wl = sharegpt_like(num_requests=1000, vocab_size=llm.spec.vocab_size, seed=0)
    run = run_engine(llm, wl)
    st = llm.engine.stats()
    limit = float(moe_step_limits(run.steps, llm.spec, st.kv_bytes_per_token, rates).sum())
    return {"measured_s": run.duration, "limit_s": limit, "limit_ratio": limit / run.duration,
            "output_tok_s": run.summary["output_throughput"], "preemptions": run.summary["num_preemptions"],
            "num_gpu_blocks": st.num_gpu_blocks, "expert_imbalance": st.expert_imbalance, "rates": rates}


def environment() -> dict:
    import transformers
    import triton
    return {"command": " ".join(["python3"] + sys.argv), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parts", default="kernels,decode1", help="comma list of kernels, decode1, trace")
    ap.add_argument("--out", default="data/benchmarks/moe_bench.json")
    args = ap.parse_args()
    parts = args.parts.split(",")
    results = {"environment": environment(), "config": str(CFG), "parts": parts, "models": {}}
    log(f"{results['environment']}")

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    for name in args.models.split(","):
        log(f"--- {name}")
        res = results["models"][name] = {}
        try:
            t0 = time.perf_counter()
            llm = LLM.random(name, CFG, dtype=torch.bfloat16)
            res["load_s"] = time.perf_counter() - t0
            llm.generate([[5] * 64], SamplingParams(max_tokens=8, ignore_eos=True))  # compile the kernels
            log(f"loaded in {res['load_s']:.0f} s; {llm.spec.weight_bytes(2) / 1e9:.1f} GB of weights, "
                f"{llm.spec.active_weight_bytes(2) / 1e9:.2f} GB active; backend {llm.engine.stats().attention_backend}")
            mlp = moe_layer(llm)
            if "kernels" in parts:
                with torch.inference_mode():
                    res["kernel_check"] = kernel_check(mlp)
                    log(f"kernel check {res['kernel_check']}")
                    res["moe_layer"] = kernel_time(mlp, copy_bandwidth())
                    log(f"MoE layer at T=1 {res['moe_layer']}")
                save()
            if "decode1" in parts:
                res["decode_batch1"] = decode_runs(llm, args.runs)
                d = res["decode_batch1"]
                log(f"{name}: decode batch 1 median {d['ratio_median']:.2f}x the active-weight read time "
                    f"(spread {d['ratio_spread'][0]:.2f}-{d['ratio_spread'][1]:.2f}); target {d['target']}: "
                    f"{'MET' if d['met'] else 'MISSED'}")
                save()
            if "trace" in parts:
                mlp = None
                res["trace_1000"] = trace_1000(llm)
                log(f"{name}: trace {res['trace_1000']}")
        except Exception as exc:  # record and go on to the next model
            import traceback
            traceback.print_exc()
            res["error"] = f"{type(exc).__name__}: {exc}"
        save()
        llm = mlp = None
        gc.collect()
        torch.cuda.empty_cache()
        log(f"GPU memory allocated after {name}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    print("\nSUMMARY")
    for name, res in results["models"].items():
        d = res.get("decode_batch1", {})
        print(f"  {name:14s} ratio {d.get('ratio_median', float('nan')):.2f} (target {TARGET}) "
              f"{'MET' if d.get('met') else 'MISSED'} {res.get('error', '')}")


if __name__ == "__main__":
    main()
