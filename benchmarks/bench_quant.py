"""Quantization side by side on one GPU: weight bytes, decode speed, KV capacity and quality (issue 4).

Model: the llama-3.1-8b preset with seeded random weights in bf16 (no trained 8B checkpoint can be
fetched here), one LLM whose reconfigure() re-quantizes from the host copy of the bf16 weights.
For each weight mode (bf16, int8, int4, fp8):
- weight bytes (EngineStats.weight_bytes: parameters + buffers, the int8/uint8/fp8 codes and scales)
- decode time per output token at batch 1 (one request, prompt 128, 64 new tokens) and at batch 64
  (64 requests, prompt 128, 32 new tokens): the mean TPOT of RequestMetrics, through the engine as
  configured (CUDA graphs for decode when the engine captures them), and the device time of one
  replay of the engine's batch-1 decode graph (CUDA events), which leaves out host overhead
- quality against bf16 on the same random weights, logits only: mean KL(bf16 || mode) of the next-token
  distributions over 4,096 positions (8 prompts of 512 random tokens, one prefill each), top-1
  agreement at those positions, and greedy agreement over 256 generated tokens (4 prompts x 64)
KV cache: blocks with kv_cache_dtype="fp8" vs "auto" at the same gpu_memory_utilization, and the Triton
decode attention kernel at batch 64, context 4096 over bf16 vs fp8 caches (do_bench medians).
Kernels: each decoder linear shape (and the LM head) at 1 and 64 rows in bf16 (cuBLAS), int8, int4
(Triton, with the launch config engine.quant.tuning measured fastest), fp8 (_scaled_mm) and, where
torch has it, torch._weight_int8pack_mm: device time from CUDA-graph replays, weight GB/s.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_quant.py

Writes data/benchmarks/quant.json and, when $OUT is set, $OUT/quant.json.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.kernels import AttentionMetadata  # noqa: E402
from engine.quant.fp8 import Fp8Linear, fp8_supported  # noqa: E402
from engine.quant.int4 import Int4Linear, int4_linear_reference  # noqa: E402
from engine.quant.int8 import Int8Linear, int8_linear_reference  # noqa: E402

MODEL = os.environ.get("BENCH_QUANT_MODEL", "llama-3.1-8b")  # another preset for a dry run
MODES = [None, "int8", "int4", "fp8"]
TARGETS = {"int8_weight_ratio_max": 0.55, "int4_weight_ratio_max": 0.30, "int8_decode_speedup_min": 1.6,
           "int4_decode_speedup_min": 2.5, "fp8_b64_faster": True, "kv_fp8_block_ratio_min": 1.9}
COMMAND = "PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_quant.py"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ----- kernels ----------------------------------------------------------------------------------
def kernel_bench() -> dict:
    """Every linear shape of one decode step, at 1 and 64 rows: device time per call (CUDA-graph
    replays over enough weight copies to overflow L2, as engine.quant.tuning times candidates) and
    weight GB/s, for bf16 (cuBLAS), int8 and int4 (Triton, the tuned config) and fp8 (_scaled_mm).
    The timings of every int8/int4 GEMV candidate are kept under "candidates"."""
    from engine.quant import tuning
    h, inter, q, kv, vocab = 4096, 14336, 4096, 1024, 128256
    shapes = {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter),
              "down_proj": (inter, h), "lm_head": (h, vocab)}
    out = {}
    torch.manual_seed(0)
    for name, (k, n) in shapes.items():
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, 0.0, 0.02)
        i8, i4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, name)
        f8 = Fp8Linear.from_linear(lin) if fp8_supported(lin.weight.device) else None
        copies = tuning.weight_copies(k * n)
        # Distinct weight copies per kind, so small layers stream from DRAM as in a decode step.
        mods = {"bf16": [lin] + [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                                 for _ in range(copies - 1)],
                "int8": [i8] + [Int8Linear(i8.weight_int8.clone(), i8.scales, None) for _ in range(copies - 1)],
                "int4": [i4] + [Int4Linear(i4.qweight.clone(), i4.scales, i4.zeros, None) for _ in range(copies - 1)]}
        if f8 is not None:
            mods["fp8"] = [f8] + [Fp8Linear(f8.weight_fp8.clone(), f8.weight_scale, None) for _ in range(copies - 1)]
        row = {}
        for m in (1, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                ref = F.linear(x, lin.weight)
                row[f"int8_m{m}_err_vs_dequant"] = rel_err(i8(x), int8_linear_reference(x, i8.weight_int8, i8.scales))
                row[f"int4_m{m}_err_vs_dequant"] = rel_err(i4(x), int4_linear_reference(x, i4.qweight, i4.scales,
                                                                                        i4.zeros))
                row[f"int8_m{m}_err_vs_bf16"] = rel_err(i8(x), ref)
                row[f"int4_m{m}_err_vs_bf16"] = rel_err(i4(x), ref)
                variants = {kind: (lambda ms_=ms_: [mod(x) for mod in ms_]) for kind, ms_ in mods.items()
                            if kind != "fp8"}
                if f8 is not None:
                    try:
                        row[f"fp8_m{m}_err_vs_bf16"] = rel_err(f8(x), ref)
                        variants["fp8"] = lambda: [mod(x) for mod in mods["fp8"]]
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        row[f"fp8_m{m}_error"] = repr(exc)[:300]
                if m == 1 and hasattr(torch, "_weight_int8pack_mm"):
                    try:
                        s16 = i8.scales.to(torch.bfloat16)
                        row["int8pack_mm_m1_err"] = rel_err(torch._weight_int8pack_mm(x, i8.weight_int8, s16), ref)
                        variants["int8pack_mm"] = lambda: [torch._weight_int8pack_mm(x, mod.weight_int8, s16)
                                                           for mod in mods["int8"]]
                    except Exception as exc:  # noqa: BLE001
                        row["int8pack_mm_error"] = repr(exc)[:200]
                for key, fn in variants.items():
                    try:
                        row[f"{key}_m{m}_us"] = tuning._graph_time(fn, copies) * 1e3
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        row[f"{key}_m{m}_error"] = repr(exc)[:300]
                        row[f"{key}_m{m}_us"] = float("nan")
        for kind, nbytes in (("bf16", k * n * 2), ("int8", k * n), ("int4", k * n // 2)):
            row[f"{kind}_m1_GBps"] = nbytes / row[f"{kind}_m1_us"] / 1e3
        row["candidates"] = {f"{kind}_m1": [(c, t * 1e3) for c, t in tuning.timings.get((kind, 1, n, k, torch.bfloat16), [])]
                             for kind in ("int8", "int4")}
        row["chosen"] = {kind: tuning.chosen.get((kind, 1, n, k, torch.bfloat16)) for kind in ("int8", "int4")}
        out[name] = row
        log(f"kernels {name} (us, device): m1 bf16 {row['bf16_m1_us']:.1f} int8 {row['int8_m1_us']:.1f} "
            f"int4 {row['int4_m1_us']:.1f} fp8 {row.get('fp8_m1_us', float('nan')):.1f} "
            f"int8pack {row.get('int8pack_mm_m1_us', float('nan')):.1f} | m64 bf16 {row['bf16_m64_us']:.1f} "
            f"int8 {row['int8_m64_us']:.1f} int4 {row['int4_m64_us']:.1f} fp8 {row.get('fp8_m64_us', float('nan')):.1f}"
            f" | chosen {row['chosen']}")
        del lin, i8, i4, f8, mods
        torch.cuda.empty_cache()
    return out


def attention_bench() -> dict:
    """Triton decode attention, batch 64, context 4096, bf16 vs fp8 (e4m3, scale 1) caches."""
    from engine.kernels.reference import paged_attention_reference
    from engine.kernels.triton_decode import decode_attention
    b, ctx, heads, kv_heads, d, bs = 64, 4096, 32, 8, 128, 16
    nblk = b * ctx // bs
    g = torch.Generator(device="cuda").manual_seed(0)
    k16 = torch.randn(nblk, bs, kv_heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v16 = torch.randn(nblk, bs, kv_heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k8, v8 = k16.to(torch.float8_e4m3fn), v16.to(torch.float8_e4m3fn)
    tables = torch.randperm(nblk, device="cuda", generator=g).view(b, ctx // bs).int()
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    res = {}
    for name, (kc, vc) in {"bf16": (k16, v16), "fp8": (k8, v8)}.items():
        out = torch.empty_like(q)
        fn = lambda: decode_attention(q, kc, vc, tables, lens, out, d ** -0.5, max_seq_len=ctx)  # noqa: E731
        fn()
        # Reference on the first 2 requests (the cache as the kernel sees it, in float32).
        meta = AttentionMetadata(slot_mapping=torch.zeros(2, dtype=torch.long), query_start_loc=torch.arange(3).int(),
                                 seq_lens=lens[:2].cpu(), block_tables=tables[:2].cpu(), num_decodes=2,
                                 max_query_len=1, max_seq_len=ctx)
        ref = paged_attention_reference(q[:2].float().cpu(), kc.float().cpu(), vc.float().cpu(), meta, d ** -0.5)
        res[f"{name}_err"] = rel_err(out[:2].cpu(), ref)
        t = ms(fn)
        res[f"{name}_ms"] = t
        res[f"{name}_kv_GBps"] = 2 * b * ctx * kv_heads * d * kc.element_size() / t / 1e6
    res["fp8_speedup"] = res["bf16_ms"] / res["fp8_ms"]
    log(f"attention b64 ctx4096: bf16 {res['bf16_ms']:.3f} ms, fp8 {res['fp8_ms']:.3f} ms "
        f"(x{res['fp8_speedup']:.2f}), err {res['bf16_err']:.1e}/{res['fp8_err']:.1e}")
    del k16, v16, k8, v8
    torch.cuda.empty_cache()
    return res


# ----- the engine -------------------------------------------------------------------------------
def prefill_quality(llm: LLM, prompts: torch.Tensor, ref: list[torch.Tensor] | None):
    """Run each prompt as one prefill in the paged cache. Returns (log-softmax of every prompt on the
    host in float16, for use as the reference; mean KL(ref || this); top-1 agreement with ref)."""
    runner, bs = llm.engine.runner, llm.config.block_size
    kept, kls, top1 = [], [], []
    for i, ids in enumerate(prompts):
        t = ids.numel()
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t, device="cuda"),
            query_start_loc=torch.tensor([0, t], dtype=torch.int32, device="cuda"),
            seq_lens=torch.tensor([t], dtype=torch.int32, device="cuda"),
            block_tables=torch.arange(-(-t // bs), dtype=torch.int32, device="cuda")[None], num_decodes=0,
            max_query_len=t, max_seq_len=t, query_start_loc_cpu=[0, t], seq_lens_cpu=[t])
        with torch.inference_mode():
            hidden = runner.model(ids.cuda(), torch.arange(t, device="cuda"), runner.kv_caches, meta, runner.backend)
            lp = runner.model.compute_logits(hidden).log_softmax(-1)
            if ref is None:
                kept.append(lp.half().cpu())
            else:
                r = ref[i].cuda().float()
                kls.append(F.kl_div(lp, r, log_target=True, reduction="none").sum(-1))
                top1.append(r.argmax(-1) == lp.argmax(-1))
            del lp
    if ref is None:
        return kept, None, None
    return None, torch.cat(kls).mean().item(), torch.cat(top1).float().mean().item()


def tpot(llm: LLM, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, llm.spec.vocab_size, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.engine.reset_stats()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    steps = llm.engine.stats().steps
    decode_steps = [s for s in steps if s.num_prefill_tokens == 0]
    return {"tpot_ms": 1e3 * sum(o.metrics.tpot for o in outs) / len(outs),
            "wall_s": wall, "output_tok_per_s": batch * new_tokens / wall,
            "decode_steps_graphed": sum(bool(getattr(s, "cuda_graph", False)) for s in decode_steps),
            "decode_steps": len(decode_steps)}


def graph_replay_ms(llm: LLM) -> float | None:
    """Device time of one replay of the engine's batch-1 decode CUDA graph (None if it has none)."""
    graphs = getattr(llm.engine.runner, "graphs", None)
    if not graphs or 1 not in graphs:
        return None
    graph = graphs[1][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def run_mode(llm: LLM, base: EngineConfig, mode, kv: str, ref_lp, ref_greedy, quality_prompts, greedy_prompts):
    cfg = base.replace(quantization=mode, kv_cache_dtype=kv)
    t = time.perf_counter()
    llm.reconfigure(cfg)
    res = {"reconfigure_s": time.perf_counter() - t}
    st = llm.engine.stats()
    res.update(weight_bytes=st.weight_bytes, kv_bytes_per_token=st.kv_bytes_per_token,
               num_gpu_blocks=st.num_gpu_blocks, attention_backend=st.attention_backend,
               cuda_graphs=st.cuda_graphs)
    log(f"mode {mode or 'bf16'} kv {kv}: reconfigured in {res['reconfigure_s']:.1f}s, weights "
        f"{st.weight_bytes / 2**30:.2f} GiB, {st.num_gpu_blocks} blocks, graphs {st.cuda_graphs}")
    # Warm-ups with the timed shapes: Triton compiles (and specializes on sizes) at first use.
    tpot(llm, 1, 128, 8, 0)
    res["b1"] = tpot(llm, 1, 128, 64, 1)
    res["b1_graph_replay_ms"] = graph_replay_ms(llm)
    tpot(llm, 64, 128, 32, 3)
    res["b64"] = tpot(llm, 64, 128, 32, 2)
    log(f"  tpot b1 {res['b1']['tpot_ms']:.2f} ms (graph replay {res['b1_graph_replay_ms']}), "
        f"b64 {res['b64']['tpot_ms']:.2f} ms")
    lp, kl, top1 = prefill_quality(llm, quality_prompts, ref_lp)
    if ref_lp is not None:
        res["mean_kl"], res["top1_agreement"] = kl, top1
    gen = [o.token_ids for o in llm.generate(greedy_prompts, SamplingParams(max_tokens=64, temperature=0.0,
                                                                            ignore_eos=True))]
    if ref_greedy is not None:
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(gen, ref_greedy)]
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(gen, ref_greedy)]
        res["greedy_agreement"] = sum(same) / sum(len(x) for x in gen)
        res["greedy_first_divergence_mean"] = sum(first) / len(first)
        log(f"  quality: KL {res['mean_kl']:.2e}, top1 {res['top1_agreement']:.4f}, greedy "
            f"{res['greedy_agreement']:.3f} (first divergence {res['greedy_first_divergence_mean']:.1f})")
    return res, lp, gen


def engine_bench(backend: str) -> dict:
    base = EngineConfig(max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=4096,
                        enable_prefix_caching=False, gpu_memory_utilization=0.85, attention_backend=backend)
    t = time.perf_counter()
    llm = LLM.random(MODEL, base, dtype=torch.bfloat16, seed=0)
    log(f"LLM.random({MODEL}) with backend {backend}: {time.perf_counter() - t:.1f}s")
    g = torch.Generator().manual_seed(123)
    quality_prompts = torch.randint(0, llm.spec.vocab_size, (8, 512), generator=g)
    greedy_prompts = torch.randint(0, llm.spec.vocab_size, (4, 32), generator=g).tolist()
    results, ref_lp, ref_greedy = {}, None, None
    for mode in MODES:
        key = mode or "bf16"
        try:
            res, lp, gen = run_mode(llm, base, mode, "auto", ref_lp, ref_greedy, quality_prompts, greedy_prompts)
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others
            traceback.print_exc()
            results[key] = {"error": repr(exc)[:500]}
            continue
        if mode is None:
            ref_lp, ref_greedy = lp, gen
        results[key] = res
        gc.collect()
        torch.cuda.empty_cache()
    try:
        res, _, _ = run_mode(llm, base, None, "fp8", ref_lp, ref_greedy, quality_prompts, greedy_prompts)
        results["bf16_kvfp8"] = res
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        results["bf16_kvfp8"] = {"error": repr(exc)[:500]}
    return results


def summarize(eng: dict) -> dict:
    bf = eng.get("bf16", {})
    s = {}

    def get(mode, *path):
        d = eng.get(mode, {})
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    for mode in ("int8", "int4", "fp8"):
        if "weight_bytes" in eng.get(mode, {}) and "weight_bytes" in bf:
            s[f"{mode}_weight_ratio"] = eng[mode]["weight_bytes"] / bf["weight_bytes"]
        for b in ("b1", "b64"):
            if get(mode, b, "tpot_ms") and get("bf16", b, "tpot_ms"):
                s[f"{mode}_{b}_speedup"] = get("bf16", b, "tpot_ms") / get(mode, b, "tpot_ms")
        if get(mode, "b1_graph_replay_ms") and get("bf16", "b1_graph_replay_ms"):
            s[f"{mode}_b1_graph_replay_speedup"] = get("bf16", "b1_graph_replay_ms") / get(mode, "b1_graph_replay_ms")
    if get("bf16_kvfp8", "num_gpu_blocks") and bf.get("num_gpu_blocks"):
        s["kv_fp8_block_ratio"] = eng["bf16_kvfp8"]["num_gpu_blocks"] / bf["num_gpu_blocks"]
    t = TARGETS
    s["met"] = {
        "int8_weight_ratio": s.get("int8_weight_ratio", 9) <= t["int8_weight_ratio_max"],
        "int4_weight_ratio": s.get("int4_weight_ratio", 9) <= t["int4_weight_ratio_max"],
        "int8_b1_speedup": s.get("int8_b1_speedup", 0) >= t["int8_decode_speedup_min"],
        "int4_b1_speedup": s.get("int4_b1_speedup", 0) >= t["int4_decode_speedup_min"],
        "fp8_b64_faster": s.get("fp8_b64_speedup", 0) > 1.0,
        "kv_fp8_block_ratio": s.get("kv_fp8_block_ratio", 0) >= t["kv_fp8_block_ratio_min"],
    }
    return s


def table(eng: dict) -> str:
    bf = eng.get("bf16", {})
    lines = [f"{'mode':<12}{'weights GiB':>12}{'x bf16':>8}{'KV blocks':>10}{'TPOT b1 ms':>11}{'graph b1 ms':>12}"
             f"{'TPOT b64 ms':>12}{'mean KL':>10}{'top1':>7}{'greedy':>7}"]
    for key, r in eng.items():
        if "error" in r:
            lines.append(f"{key:<12} error: {r['error'][:100]}")
            continue
        ratio = r["weight_bytes"] / bf["weight_bytes"] if "weight_bytes" in bf else float("nan")
        gr = r.get("b1_graph_replay_ms")
        lines.append(f"{key:<12}{r['weight_bytes'] / 2**30:>12.2f}{ratio:>8.3f}{r['num_gpu_blocks']:>10}"
                     f"{r['b1']['tpot_ms']:>11.2f}{(gr if gr else float('nan')):>12.2f}{r['b64']['tpot_ms']:>12.2f}"
                     f"{r.get('mean_kl', 0.0):>10.2e}{r.get('top1_agreement', 1.0):>7.3f}"
                     f"{r.get('greedy_agreement', 1.0):>7.3f}")
    return "\n".join(lines)


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    result = {"command": COMMAND, "model": MODEL, "dtype": "bfloat16", "weights": "random (seed 0)",
              "device": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "targets": TARGETS, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    only = os.environ.get("BENCH_QUANT_PARTS", "kernels,attention,engine").split(",")
    result["parts"] = only
    if "engine" in only:
        backend = "auto"
        try:
            result["engine"] = engine_bench(backend)
        except Exception as exc:  # noqa: BLE001 - the CUDA backend is being built: fall back, and say so
            traceback.print_exc()
            result["engine_auto_error"] = repr(exc)[:500]
            backend = "torch"
            gc.collect()
            torch.cuda.empty_cache()
            result["engine"] = engine_bench(backend)
        result["engine_backend_requested"] = backend
        from engine.quant import tuning
        result["gemv_configs_chosen"] = {str(k): v for k, v in tuning.chosen.items()}
        result["summary"] = summarize(result["engine"])
        print(table(result["engine"]))
        print(json.dumps(result["summary"], indent=1))
        save(result)
        gc.collect()
        torch.cuda.empty_cache()
    for part, key, fn in (("attention", "attention_b64_ctx4096", attention_bench), ("kernels", "kernels", kernel_bench)):
        if part in only:
            try:
                result[key] = fn()
            except Exception as exc:  # noqa: BLE001 - the other parts must still run
                traceback.print_exc()
                result[key] = {"error": repr(exc)[:500]}
            save(result)
    save(result)
    log("done")


def save(result: dict) -> None:
    """Write what is there so far (a run cut short still leaves its first parts)."""
    text = json.dumps(result, indent=1, default=str)
    out_dir = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "quant.json").write_text(text)


if __name__ == "__main__":
    main()
