"""Issue 3's targets on one GPU, in one process (weights loaded once per model, reconfigured between parts).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/engine_targets.py [--parts decode1,host,limit,prefill,parity,naive]

Prints one line per target (met / missed with the measured figure) and writes JSON to
data/benchmarks/engine_targets_<device>.json (and $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from engine import LLM, EngineConfig, SamplingParams
from workbench.bench import environment, measure_device_rates, run_engine, run_naive_baseline, step_limits
from workbench.workloads import fixed, sharegpt_like

MODEL = "llama-3.1-8b"
DEFAULT = EngineConfig(block_size=16, max_num_batched_tokens=8192, max_num_seqs=256, max_model_len=4096)
GREEDY = dict(temperature=0.0, ignore_eos=True)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def decode_batch1(llm, rates):
    """128-token prompt, 256 output tokens, alone: TPOT vs weight bytes / copy bandwidth."""
    wl = fixed(num_requests=1, prompt_len=128, output_len=256, vocab_size=llm.spec.vocab_size, seed=1)
    run = run_engine(llm, wl)
    tpot = float(run.requests["tpot"].iloc[0])
    st = llm.engine.stats()
    ideal = st.weight_bytes / rates["copy_bandwidth"]
    return {"tpot_ms": tpot * 1e3, "weight_bytes": st.weight_bytes, "ideal_ms": ideal * 1e3,
            "ratio": tpot / ideal, "target": "<= 1.25", "met": tpot / ideal <= 1.25,
            "cuda_graphs": st.cuda_graphs, "graph_steps": int(run.steps["cuda_graph"].sum())}


def host_time_256(llm):
    """256 running requests decoding: host time per decode step (target < 2 ms)."""
    wl = fixed(num_requests=256, prompt_len=128, output_len=64, vocab_size=llm.spec.vocab_size, seed=2)
    run = run_engine(llm, wl)
    dec = run.steps[(run.steps["num_running"] == 256) & (run.steps["num_prefill_tokens"] == 0)]
    host = float(dec["host_time"].median() * 1e3)
    return {"decode_steps_at_256": len(dec), "host_time_p50_ms": host,
            "host_time_p90_ms": float(dec["host_time"].quantile(0.9) * 1e3),
            "step_time_p50_ms": float(dec["duration"].median() * 1e3), "target": "< 2 ms", "met": host < 2.0}


def limit_1000(llm, rates):
    """1000 requests of 1024 prompt + 256 output tokens: limit time / measured time (target >= 0.6)."""
    wl = fixed(num_requests=1000, prompt_len=1024, output_len=256, vocab_size=llm.spec.vocab_size, seed=3)
    run = run_engine(llm, wl)
    st = llm.engine.stats()
    per = step_limits(run.steps, llm.spec, st.weight_bytes, st.kv_bytes_per_token, rates)
    ratio = float(per["limit_time"].sum() / run.duration)
    return {"measured_s": run.duration, "limit_s": float(per["limit_time"].sum()), "ratio": ratio,
            "output_tok_s": run.summary["output_throughput"], "preemptions": run.summary["num_preemptions"],
            "compute_bound_steps": float((per["compute_time"] > per["memory_time"]).mean()),
            "target": ">= 0.6", "met": ratio >= 0.6}


def prefill_8x2048(llm, rates):
    """8 prompts of 2048 tokens in one 16384-token step: model FLOPs / step time vs the matmul rate."""
    wl = fixed(num_requests=8, prompt_len=2048, output_len=1, vocab_size=llm.spec.vocab_size, seed=4)
    times, flops = [], None
    for _ in range(3):
        run = run_engine(llm, wl, warmup=False)
        st = llm.engine.stats()
        per = step_limits(run.steps, llm.spec, st.weight_bytes, st.kv_bytes_per_token, rates)
        times.append(float(run.steps["duration"].iloc[0]))
        flops = float(per["flops"].iloc[0])
        assert run.steps["num_batched_tokens"].iloc[0] == 16384
    t = float(np.median(times))
    share = flops / t / rates["matmul_flops"]
    return {"step_s": t, "model_flops": flops, "achieved_tflops": flops / t / 1e12, "share_of_matmul_rate": share,
            "target": ">= 0.5", "met": share >= 0.5}


def parity(llm):
    """Greedy tokens of 16 requests, Triton vs the torch reference backend (bf16): first 32 tokens."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, llm.spec.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 400, (16,), generator=g)]
    params = SamplingParams(max_tokens=32, **GREEDY)
    fast = [o.token_ids for o in llm.generate(prompts, params)]
    backend = llm.engine.stats().attention_backend
    llm.reconfigure(llm.config.replace(attention_backend="torch", enforce_eager=True))
    ref = [o.token_ids for o in llm.generate(prompts, params)]
    rows = []
    for p, a, b in zip(prompts, fast, ref):
        if a == b:
            rows.append({"match": True})
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = llm.prompt_logits(p + b[:k])[-1]
        top2 = torch.topk(logits, 2).values
        rows.append({"match": False, "first_divergence": k, "top2_gap": float(top2[0] - top2[1])})
    gaps = [r["top2_gap"] for r in rows if not r["match"]]
    return {"backend": backend, "identical": sum(r["match"] for r in rows), "of": len(rows), "divergences": rows,
            "max_gap_at_divergence": max(gaps) if gaps else None, "target": "identical or top-2 gap < 0.05",
            "met": all(g < 0.05 for g in gaps)}


def naive(llm_factory, rates):
    """256 ShareGPT-like requests (synthetic lengths): engine vs HF generate in static batches of 128."""
    from transformers import AutoModelForCausalLM
    from engine.model.presets import preset_config
    wl = sharegpt_like(num_requests=256, vocab_size=128256, seed=0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(preset_config(MODEL), dtype=torch.bfloat16).eval()
    base = run_naive_baseline(hf, wl, max_batch_size=128)
    del hf
    torch.cuda.empty_cache()
    llm = llm_factory()
    eng = run_engine(llm, wl)
    ratio = eng.summary["output_throughput"] / base.summary["output_throughput"]
    return {"engine_out_tok_s": eng.summary["output_throughput"], "naive_out_tok_s": base.summary["output_throughput"],
            "engine_s": eng.duration, "naive_s": base.duration, "ratio": ratio, "target": ">= 5", "met": ratio >= 5,
            "workload": wl.summary()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="decode1,host,prefill,limit,parity,naive")
    args = ap.parse_args()
    parts = args.parts.split(",")
    env = environment(torch.device("cuda"))
    log(f"device {env['device_name']}, torch {env['torch']}, triton {env['triton']}")
    rates = measure_device_rates()
    log(f"matmul {rates['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {rates['copy_bandwidth'] / 1e12:.2f} TB/s")
    results = {"environment": env, "rates": rates, "model": MODEL}
    out_dir = Path(os.environ.get("OUT", "data/benchmarks"))

    def save():
        name = f"engine_targets_{env['device_name'].replace(' ', '_')}.json"
        for d in {out_dir, Path("data/benchmarks")}:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(json.dumps(results, indent=2, default=str))

    def run_part(name, fn, *a):
        log(f"--- {name}")
        try:
            results[name] = fn(*a)
        except Exception as exc:  # record and go on: one failing part must not lose the others
            import traceback
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "met": False}
        log(f"{name}: {json.dumps(results[name], default=str)[:400]}")
        save()

    llm = None
    if set(parts) & {"decode1", "host", "limit", "parity"}:
        t = time.perf_counter()
        llm = LLM.random(MODEL, DEFAULT)
        st = llm.engine.stats()
        results["memory"] = {"load_s": time.perf_counter() - t, "num_gpu_blocks": st.num_gpu_blocks,
                             "kv_tokens": st.kv_capacity_tokens, "profile": st.memory.__dict__}
        log(f"loaded in {time.perf_counter() - t:.1f} s; KV {st.num_gpu_blocks} blocks = {st.kv_capacity_tokens} "
            f"tokens; {st.memory}")
        a = None
        for name, fn, a in (("decode1", decode_batch1, (llm, rates)), ("host", host_time_256, (llm,)),
                            ("limit", limit_1000, (llm, rates))):
            if name in parts:
                run_part(name, fn, *a)
    if "prefill" in parts:
        # Prefix caching off: the three repetitions use the same prompts.
        prefill_cfg = DEFAULT.replace(max_num_batched_tokens=16384, enable_prefix_caching=False)
        if llm is None:
            llm = LLM.random(MODEL, prefill_cfg)
        else:
            llm.reconfigure(prefill_cfg)
        run_part("prefill", prefill_8x2048, llm, rates)
        llm.reconfigure(DEFAULT)
    if "parity" in parts:
        run_part("parity", parity, llm)
    if "naive" in parts:
        # Free the 8B engine (and its CUDA graphs) before HF loads its own copy of the model.
        import gc
        llm = a = None  # noqa: F841 (a still held the engine from the loop above)
        gc.collect()
        torch.cuda.empty_cache()
        log(f"GPU memory allocated before the baseline: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        run_part("naive", naive, lambda: LLM.random(MODEL, DEFAULT), rates)
    print("\nTARGET SUMMARY")
    for name in parts:
        r = results.get(name, {})
        print(f"  {name:8s} {'MET ' if r.get('met') else 'MISSED'} "
              f"{ {k: v for k, v in r.items() if k not in ('divergences', 'workload')} }")


if __name__ == "__main__":
    main()
