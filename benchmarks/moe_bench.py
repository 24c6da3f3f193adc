"""Mixture-of-experts decode at batch 1 against the time to read the active weights (issue 19), one GPU.

One model per command keeps each under the 10-minute limit of a device call:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/moe_bench.py --models qwen3-30b-a3b \
        --out data/benchmarks/moe_bench_qwen3_h200.json                                    # ~4 min
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/moe_bench.py --models mixtral-8x7b \
        --out data/benchmarks/moe_bench_mixtral_h200.json                                  # ~4-5 min
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/moe_bench.py --models qwen3-30b-a3b --parts trace \
        --out data/benchmarks/moe_trace_h200.json                                          # ~5-6 min

For each model (qwen3-30b-a3b, mixtral-8x7b; bf16, random weights, CUDA graphs, Triton backend), --parts of:
- kernels: the fused MoE kernels against the pure-torch reference on layer 0's real-size weights: gemv, dedup
  and grouped at T = 1 and 4, dedup and grouped at T = 16, grouped at T = 512, and the routed decode path;
- layer: one MoE layer (router matmul + routing + experts) per path ("gemv": the unsorted decode kernels, the
  routing fused into gate_up; "gemv_unrouted": the same after a route_topk launch; "dedup": route_topk, then
  unsorted GEMMs over the distinct experts; "grouped": route_topk, then sorted, grouped GEMMs) at T = 1, 2, 4,
  8, 16, timed as all MoE layers in one CUDA graph (no host launch cost, weights not in L2) over the layer
  count, against reading the router and the distinct chosen experts at the copy bandwidth; also the kernels
  one layer launches at T = 1, and the autotuned tiles;
- decode1: decode at batch 1 (128-token prompt, 128 new tokens) with the MoE layers on "auto" (the decode path
  at T = 1) and on "grouped": TPOT vs active weight bytes (router + the k chosen experts + attention + norms +
  LM head, ModelSpec.active_weight_bytes) / copy bandwidth; --runs rounds, paths interleaved, each next to a
  fresh copy-bandwidth measurement; median and spread. Target: <= 1.5x;
- profile: where a batch-1 decode step's time goes: kernel time per step by kernel name (torch profiler over 32
  CUDA-graph steps) against the step's wall time;
- trace (only on --trace-models): the 1000-request ShareGPT-like trace (synthetic lengths; stopped after
  --trace-budget-s), measured time against a MoE-aware per-step limit (max of FLOPs of the active parameters /
  matmul rate and bytes / copy bandwidth, the bytes counting each MoE layer's expected distinct experts
  E (1 - (1 - k/E)^T) for T batched tokens under even routing, plus KV reads), reported as limit / measured
  (workbench.bench.step_limits assumes a dense model).
Writes JSON (command, device, versions, every run) to --out after every part, with each part's seconds.
Estimates (not yet measured): the default parts ~4 minutes per model on an H200 (load, Triton compiles and
autotuning of the decode kernels, then ~1 minute each for layer and decode1); the trace part ~5-6 minutes
(load, graph capture up to 256 sequences, at most --trace-budget-s of trace).
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
from engine.kernels.moe import (fused_moe, fused_moe_decode_routed, fused_moe_from_logits, pick_path,
                               route_topk_triton)
from engine.kernels.moe_reference import fused_moe_reference, route_topk
from workbench.bench import median_cuda_time

CFG = EngineConfig(block_size=16, max_num_seqs=4, max_num_batched_tokens=2048, max_model_len=1024,
                   num_gpu_blocks=512, attention_backend="triton")
TARGET = 1.5
# The layer sweep at every token count: the decode path as the model runs it (routing fused into gate_up), the
# same kernels after a separate route_topk launch (what the fusion saves), the dedup and the grouped paths.
PATHS = ("gemv", "gemv_unrouted", "dedup", "grouped")
# Decode at batch 1: auto takes gemv at T = 1 (pick_path). Not "dedup": the 128-token prefill is past its pair
# limit (the layer part compares it at decode sizes).
DECODE_PATHS = ("auto", "grouped")


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


def moe_mlps(llm) -> list:
    return [layer.mlp for layer in llm.model.layers if hasattr(layer.mlp, "w13")]


def set_path(llm, path: str) -> None:
    """Every MoE layer on `path` ("auto", "gemv" or "grouped"), the CUDA graphs recaptured with it."""
    for mlp in moe_mlps(llm):
        mlp.path = path
    llm.reconfigure(CFG)


def kernel_check(mlp) -> dict:
    """Max |fused - reference| / max |reference| in bf16, both paths at decode sizes, grouped at prefill sizes."""
    out = {}
    g = torch.Generator(device=mlp.w13.device).manual_seed(0)
    for t, paths in ((1, ("gemv", "dedup", "grouped")), (4, ("gemv", "dedup", "grouped")), (16, ("dedup", "grouped")),
                     (512, ("grouped",))):
        x = torch.randn(t, mlp.w13.shape[2], device=mlp.w13.device, dtype=mlp.w13.dtype, generator=g)
        w, ids = route_topk(mlp.gate(x), mlp.top_k, mlp.renormalize)
        w_k, ids_k = route_topk_triton(mlp.gate(x), mlp.top_k, mlp.renormalize)
        ref = fused_moe_reference(x.float(), mlp.w13.float(), mlp.w2.float(), w, ids)
        for path in paths:
            got = fused_moe(x, mlp.w13, mlp.w2, w, ids, path=path).float()
            out[f"T{t}_{path}"] = {"rel_err": float((got - ref).abs().max() / ref.abs().max()),
                                   "routing_equal": bool(torch.equal(ids, ids_k))}
        if t <= 4:  # the decode path as the model runs it: routing fused into the gate_up kernel
            got, w_r, ids_r = fused_moe_decode_routed(x, mlp.gate(x), mlp.w13, mlp.w2, mlp.top_k, mlp.renormalize)
            out[f"T{t}_gemv_routed"] = {"rel_err": float((got.float() - ref).abs().max() / ref.abs().max()),
                                        "routing_equal": bool(torch.equal(ids, ids_r)),
                                        "weights_max_err": float((w_r - w).abs().max())}
    return out


def graph_time(fn, replays: int = 20) -> float:
    """Median seconds of one replay of fn captured in a CUDA graph (no host launch cost in the number)."""
    fn()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t = median_cuda_time(graph.replay, replays)
    del graph
    return t


def layer_kernels(fn) -> list[str]:
    """Names of the GPU kernels one call of fn launches, in order (torch profiler, eager)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def layer_times(llm, runs: int, token_counts=(1, 2, 4, 8, 16)) -> dict:
    """One MoE layer (router matmul + routing + experts) per path and token count, timed as every MoE layer
    of the model in turn inside one CUDA graph (their weights far exceed L2, as in a decode step) over the
    number of layers; against reading the router and the distinct chosen experts at the copy bandwidth.
    runs rounds, the paths interleaved within each; median and spread. Also the kernels one layer launches."""
    mlps = moe_mlps(llm)
    e, two_i, h = mlps[0].w13.shape
    expert_bytes = 3 * h * (two_i // 2) * 2
    dev = mlps[0].w13.device
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"kernels_per_layer_T1": {}, "rows": []}
    with torch.inference_mode():
        for t in token_counts:
            x = torch.randn(t, h, device=dev, dtype=mlps[0].w13.dtype, generator=g)
            distinct = [len(set(route_topk(m.gate(x), m.top_k, m.renormalize)[1].flatten().tolist())) for m in mlps]
            ideal_bytes = sum(e * h * 2 + d * expert_bytes for d in distinct) / len(mlps)

            def layer(m, path):  # as MoEMLP.forward on the Triton backend
                if path == "gemv_unrouted":
                    return fused_moe(x, m.w13, m.w2, *route_topk_triton(m.gate(x), m.top_k, m.renormalize), path="gemv")
                return fused_moe_from_logits(x, m.gate(x), m.w13, m.w2, m.top_k, m.renormalize, path=path)

            def model(path):
                return lambda: [layer(m, path) for m in mlps]

            times, bws = {p: [] for p in PATHS}, []
            for _ in range(runs):
                bws.append(copy_bandwidth())
                for p in PATHS:
                    times[p].append(graph_time(model(p)) / len(mlps))
            ideal = ideal_bytes / float(np.median(bws))
            for p in PATHS:
                med = float(np.median(times[p]))
                res["rows"].append({"tokens": t, "path": p, "layer_us_median": med * 1e6,
                                    "layer_us_spread": [min(times[p]) * 1e6, max(times[p]) * 1e6],
                                    "ideal_us": ideal * 1e6, "ratio": med / ideal,
                                    "distinct_experts_mean": float(np.mean(distinct)),
                                    "auto_picks": pick_path(t, mlps[0].top_k, e, expert_bytes)})
                log(f"  T={t:2d} {p:13s}: {med * 1e6:7.1f} us/layer (spread {min(times[p]) * 1e6:.1f}-"
                    f"{max(times[p]) * 1e6:.1f}), ideal {ideal * 1e6:.1f} us: {med / ideal:.2f}x")
            if t == 1:
                for p in PATHS:
                    names = layer_kernels(lambda: layer(mlps[0], p))
                    res["kernels_per_layer_T1"][p] = {"count": len(names), "names": names}
                    log(f"  T=1 {p}: {len(names)} kernels per MoE layer: {names}")
    from engine.kernels import moe_decode
    res["autotuned"] = {name: {str(key): str(cfg) for key, cfg in k.cache.items()}
                        for name, k in (("gate_up", moe_decode._gate_up_tuned), ("down", moe_decode._down_tuned))}
    return res


def decode_runs(llm, runs: int) -> dict:
    """Decode at batch 1 (128-token prompt, 128 new tokens) with the MoE layers on each path: TPOT against the
    active weight bytes at a copy bandwidth measured next to each run; runs rounds, paths interleaved."""
    g = np.random.default_rng(1)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    active = llm.spec.active_weight_bytes(2)
    rows = []
    for r in range(runs):
        prompt = g.integers(3, llm.spec.vocab_size, 128).tolist()
        for path in DECODE_PATHS:
            set_path(llm, path)
            bw = copy_bandwidth()
            llm.engine.reset_stats()
            out = llm.generate([prompt], params)[0]
            st = llm.engine.stats()
            graph_steps = sum(s.cuda_graph for s in st.steps)
            ideal = active / bw
            rows.append({"run": r, "path": path, "copy_bandwidth": bw, "tpot_ms": out.metrics.tpot * 1e3,
                         "ideal_ms": ideal * 1e3, "ratio": out.metrics.tpot / ideal, "graph_steps": graph_steps,
                         "expert_imbalance": st.expert_imbalance})
            log(f"  run {r} {path:7s}: TPOT {out.metrics.tpot * 1e3:.3f} ms, ideal {ideal * 1e3:.3f} ms "
                f"({rows[-1]['ratio']:.2f}x), copy {bw / 1e12:.2f} TB/s, {graph_steps} graph steps")
    set_path(llm, "auto")
    res = {"active_weight_bytes": active, "total_weight_bytes": llm.spec.weight_bytes(2), "runs": rows,
           "target": f"<= {TARGET}"}
    for path in DECODE_PATHS:
        ratios = [r["ratio"] for r in rows if r["path"] == path]
        med = float(np.median(ratios))
        res[path] = {"tpot_ms_median": float(np.median([r["tpot_ms"] for r in rows if r["path"] == path])),
                     "ratio_median": med, "ratio_spread": [min(ratios), max(ratios)], "met": med <= TARGET}
    res["ratio_median"], res["ratio_spread"], res["met"] = (res["auto"]["ratio_median"], res["auto"]["ratio_spread"],
                                                            res["auto"]["met"])
    return res


def decode_profile(llm, steps: int = 32) -> dict:
    """Where a batch-1 decode step's time goes: GPU kernel time per step by kernel name (torch profiler over
    `steps` CUDA-graph decode steps), the kernels per step, and the rest of the step time (gaps, host)."""
    from torch.profiler import ProfilerActivity, profile
    eng = llm.engine
    eng.add_request("profile", list(range(3, 131)),
                    SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    for _ in range(4):  # prefill and a few decode steps outside the window
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    while eng.has_unfinished_requests():
        eng.step()
    per_name: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            row = per_name.setdefault(ev.name, [0, 0.0])
            row[0] += 1
            row[1] += ev.device_time_total
    kernels = sorted(({"name": n[:120], "calls_per_step": c / steps, "us_per_step": us / steps}
                      for n, (c, us) in per_name.items()), key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in kernels)
    return {"steps": steps, "step_wall_us": wall * 1e6, "kernel_us_per_step": busy,
            "kernels_per_step": sum(r["calls_per_step"] for r in kernels), "busy_share": busy / (wall * 1e6),
            "top_kernels": kernels[:25]}


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


def trace_1000(llm, num_requests: int, budget_s: float) -> dict:
    """The ShareGPT-like trace (synthetic lengths) through the engine, stopped after budget_s seconds (then the
    limit covers the steps that ran); measured time against the MoE-aware per-step limit (module doc)."""
    from workbench.bench import measure_device_rates
    from workbench.point_run import run_point
    from workbench.schema import C
    from workbench.workloads import sharegpt_like
    llm.reconfigure(TRACE_CFG)
    rates = measure_device_rates()
    wl = sharegpt_like(num_requests=num_requests, vocab_size=llm.spec.vocab_size, seed=0)
    run = run_point(llm, wl, max_duration=budget_s)
    st = llm.engine.stats()
    limit = float(moe_step_limits(run.steps, llm.spec, st.kv_bytes_per_token, rates).sum())
    llm.reconfigure(CFG)
    return {"num_requests": num_requests, "budget_s": budget_s, "num_finished": run.metrics.get(C.num_finished),
            "measured_s": run.duration, "limit_s": limit, "limit_ratio": limit / run.duration,
            "output_tok_s": run.metrics.get(C.output_throughput), "preemptions": run.metrics.get(C.num_preemptions),
            "num_steps": len(run.steps), "num_gpu_blocks": st.num_gpu_blocks, "expert_imbalance": st.expert_imbalance,
            "rates": rates, "config": str(TRACE_CFG)}


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
    ap.add_argument("--parts", default="kernels,layer,decode1,profile",
                    help="comma list of kernels, layer, decode1, profile, trace")
    ap.add_argument("--trace-models", default="qwen3-30b-a3b", help="the models the trace part runs on")
    ap.add_argument("--trace-requests", type=int, default=1000)
    ap.add_argument("--trace-budget-s", type=float, default=240.0, help="stop the trace after this many seconds")
    ap.add_argument("--out", default="data/benchmarks/moe_bench.json")
    args = ap.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - {"kernels", "layer", "decode1", "profile", "trace"}
    if unknown:
        raise ValueError(f"--parts has {sorted(unknown)}: allowed are kernels, layer, decode1, profile, trace")
    from engine.kernels import moe
    results = {"environment": environment(), "config": str(CFG), "parts": parts, "models": {},
               "path_rule": {"GEMV_MAX_PAIRS": moe.GEMV_MAX_PAIRS, "GEMV_MAX_EXTRA_BYTES": moe.GEMV_MAX_EXTRA_BYTES,
                             "DEDUP_MAX_PAIRS": moe.DEDUP_MAX_PAIRS, "DECODE_FUSED_ROUTING": moe.DECODE_FUSED_ROUTING}}
    log(f"{results['environment']}")
    start = time.perf_counter()

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    for name in args.models.split(","):
        log(f"--- {name}")
        res = results["models"][name] = {}
        llm = None
        try:
            t0 = time.perf_counter()
            llm = LLM.random(name, CFG, dtype=torch.bfloat16)
            res["load_s"] = time.perf_counter() - t0
            llm.generate([[5] * 64], SamplingParams(max_tokens=8, ignore_eos=True))  # compile the kernels
            log(f"loaded in {res['load_s']:.0f} s; {llm.spec.weight_bytes(2) / 1e9:.1f} GB of weights, "
                f"{llm.spec.active_weight_bytes(2) / 1e9:.2f} GB active; "
                f"backend {llm.engine.stats().attention_backend}; "
                f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")
            timings = res["part_s"] = {}
            for part in ("kernels", "layer", "decode1", "profile", "trace"):
                if part not in parts or (part == "trace" and name not in args.trace_models.split(",")):
                    continue
                t0 = time.perf_counter()
                if part == "kernels":
                    with torch.inference_mode():
                        res["kernel_check"] = kernel_check(moe_mlps(llm)[0])
                    log(f"kernel check {res['kernel_check']}")
                elif part == "layer":
                    res["moe_layer"] = layer_times(llm, args.runs)
                elif part == "decode1":
                    d = res["decode_batch1"] = decode_runs(llm, args.runs)
                    for path in DECODE_PATHS:
                        log(f"{name}: decode batch 1 ({path}) median {d[path]['ratio_median']:.2f}x the active-weight "
                            f"read time (spread {d[path]['ratio_spread'][0]:.2f}-{d[path]['ratio_spread'][1]:.2f}); "
                            f"target {d['target']}: {'MET' if d[path]['met'] else 'MISSED'}")
                elif part == "profile":
                    p = res["decode_profile"] = decode_profile(llm)
                    log(f"decode step: {p['step_wall_us']:.0f} us wall, {p['kernel_us_per_step']:.0f} us of kernels "
                        f"({p['kernels_per_step']:.0f} launches); top: "
                        + ", ".join(f"{k['name'][:40]} {k['us_per_step']:.0f}" for k in p["top_kernels"][:8]))
                else:
                    tr = res["trace_1000"] = trace_1000(llm, args.trace_requests, args.trace_budget_s)
                    log(f"{name}: trace {tr['num_finished']}/{tr['num_requests']} finished in "
                        f"{tr['measured_s']:.1f} s, "
                        f"limit {tr['limit_s']:.1f} s: limit ratio {tr['limit_ratio']:.3f}")
                timings[part] = time.perf_counter() - t0
                log(f"part {part} took {timings[part]:.0f} s ({time.perf_counter() - start:.0f} s so far)")
                save()
        except Exception as exc:  # record and go on to the next model
            import traceback
            traceback.print_exc()
            res["error"] = f"{type(exc).__name__}: {exc}"
        save()
        llm = None
        gc.collect()
        torch.cuda.empty_cache()
        log(f"GPU memory allocated after {name}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    print("\nSUMMARY")
    for name, res in results["models"].items():
        d = res.get("decode_batch1", {})
        for path in DECODE_PATHS:
            r = d.get(path, {})
            print(f"  {name:14s} decode batch 1 {path:7s} ratio {r.get('ratio_median', float('nan')):.2f} "
                  f"(target {TARGET}) {'MET' if r.get('met') else 'MISSED'}")
        for row in res.get("moe_layer", {}).get("rows", []):
            if row["tokens"] == 1:
                print(f"  {name:14s} MoE layer T=1 {row['path']:13s} {row['layer_us_median']:.1f} us, "
                      f"{row['ratio']:.2f}x its weight read time")
        if "trace_1000" in res:
            print(f"  {name:14s} trace limit ratio {res['trace_1000']['limit_ratio']:.3f}")
        if "error" in res:
            print(f"  {name:14s} ERROR {res['error']}")


if __name__ == "__main__":
    main()
