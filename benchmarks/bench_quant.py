"""Quantization side by side on one GPU: weight bytes, decode speed, KV capacity and quality (issues 4, 20).

Three parts, in this order (BENCH_QUANT_PARTS picks some), each saved to --out as soon as it ends:
1. Kernels: each linear shape of Llama-3.1-8B (qkv, o, gate_up, down, LM head) at 1, 16, 64 and 256
   rows in bf16 (cuBLAS), int8, int4 (Triton; awq and gptq layers run this same kernel on the same
   layout) and fp8 (fused per-token activation quantization + the GEMM engine.quant.tuning picked,
   torch._scaled_mm or Triton): device time from CUDA-graph replays over weight copies that overflow
   L2, speed-up over bf16, weight GB/s, the config tuning chose and every candidate's time; then the
   GEMM time of one decode step (32 layers + LM head) per mode and rows, and its speed-up.
2. fp8 KV: the Triton decode attention kernel at batch 64, context 4096 over bf16 vs fp8 caches.
3. The engine: the llama-3.1-8b preset with seeded random weights in bf16 (no trained 8B checkpoint
   can be fetched here), one LLM whose reconfigure() re-quantizes from the host copy of the weights.
   For each weight mode (bf16, int8, int4, awq, gptq, gptq_act, fp8) and for bf16 weights with the fp8 KV cache:
   - weight bytes (EngineStats.weight_bytes) and their split into embedding, LM head, decoder linears
     and norms
   - a decode speed curve: TPOT (mean over requests, RequestMetrics) at batch 1, 16, 64 and 256
     (prompt 64 random tokens, 16 new tokens, greedy), through the engine as configured (CUDA graphs
     for decode), REPS passes interleaved over the batch sizes after one warm-up pass; the median and
     the spread (min, max) per point, and the speed-up over bf16 per point (median / median); beside it the
     steady decode step (median wall time of the steps decoding the whole batch; TPOT at 256 also holds the
     mixed steps that prefill the batch's later prompts) and its speed-up curve
   - prefill speed: prompt tokens/s of 16 prompts x 1024 random tokens, 1 new token each (two 8192-token
     chunks), interleaved with the curve's passes (median, spread), and its speed-up over bf16
   - the device time of one replay of the engine's batch-1 decode graph (CUDA events)
   - quality against bf16 on the same random weights, logits only: mean KL(bf16 || mode) over 4,096
     positions, top-1 agreement, greedy agreement over 256 generated tokens
   - KV blocks with kv_cache_dtype="fp8" vs "auto" at the same gpu_memory_utilization
   awq and gptq: random weights have no activations worth calibrating on, and their speed does not
   depend on the codes, so their layers are int4's codes sent through the Hub layouts (int4_to_awq ->
   awq_to_int4, int4_to_gptq -> gptq_to_int4, zero points >= 1 for GPTQ v1) and loaded as a
   checkpoint's (LLM.prequantized), with the engine's int8 LM head (engine.quant.LM_HEAD_MODE) and int8
   embedding table (a Hub checkpoint run as it is keeps both in 16 bits: about 0.36x the bf16 bytes).
   gptq_act: the same through GPTQ with desc_act=True (a seeded random act-order permutation a layer, in g_idx),
   which the engine folds into where its norm and SwiGLU store x (o_proj, fed by attention, gathers it).
   No mode starts after ENGINE_DEADLINE_S (400 s, env BENCH_QUANT_DEADLINE_S) of the run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_quant.py --out data/benchmarks/quant.json

Writes --out (default data/benchmarks/quant.json) and, when $OUT is set, $OUT/quant.json. Environment:
BENCH_QUANT_PARTS (kernels,attention,engine), BENCH_QUANT_ROWS (kernel rows, 1,16,64,256),
BENCH_QUANT_SHAPES (kernel shapes), BENCH_QUANT_KINDS (kernel kinds beside bf16: int8,int4,fp8),
BENCH_QUANT_MODES (engine modes beside bf16, e.g. int4,int8; kvfp8
for the fp8-KV run), BENCH_QUANT_DEADLINE_S. The kernels part alone (the kernel-level speed-up per
shape and rows, and per decode step) is

    BENCH_QUANT_PARTS=kernels PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_quant.py \
        --out data/benchmarks/quant_kernels.json

Each tuning key times every candidate (engine.quant.tuning), and each distinct kernel config is a
Triton compile on a cold cache: the tuning time per key is in the JSON (tuning_s). Kernel times are the
median of BENCH_QUANT_KERNEL_REPS (5) rounds interleaved over the kinds, with their spread (min, max);
the log names the config tuning chose per key, its three fastest candidates and the fastest of each
kernel family (gemv, dot, tc, mma, words...), and how many candidates failed or disagreed.
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

# Every key tuned afresh (its candidates' times go into the results), not read from the tuning cache.
os.environ.setdefault("ENGINE_TUNING_CACHE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.kernels import AttentionMetadata  # noqa: E402
from engine.quant.fp8 import Fp8Linear, fp8_linear_reference, fp8_supported  # noqa: E402
from engine.quant.int4 import Int4Linear, int4_linear_reference  # noqa: E402
from engine.quant.int8 import Int8Linear, int8_linear_reference  # noqa: E402

MODEL = os.environ.get("BENCH_QUANT_MODEL", "llama-3.1-8b")  # another preset for a dry run
MODES = [None, "int4", "int8", "fp8", "awq", "gptq", "gptq_act"]  # most informative first, should the deadline hit
# BENCH_QUANT_MODES (e.g. "int4,int8") runs fewer engine modes (bf16, the reference, always runs; awq and
# gptq need int4; "kvfp8" adds the bf16 + fp8-KV run, which runs by default).
_MODES_ENV = os.environ.get("BENCH_QUANT_MODES")
if _MODES_ENV:
    _wanted = {m.strip() for m in _MODES_ENV.split(",")}
    MODES = [m for m in MODES if m is None or m in _wanted]
RUN_KV_FP8 = not _MODES_ENV or "kvfp8" in _MODES_ENV
INT4_MODES = ("int4", "awq", "gptq")
HUB_MODES = ("awq", "gptq", "gptq_act")  # int4's codes through a Hub layout (gptq_act: desc_act=True)
BATCHES = (1, 16, 64, 256)
REPS = 3
PROMPT_LEN, NEW_TOKENS = 64, 16
PREFILL_PROMPTS, PREFILL_LEN = 16, 1024  # the prefill point: 16384 prompt tokens, two chunks of the 8192 budget
TARGETS = {"int8_weight_ratio_max": 0.55, "int4_weight_ratio_max": 0.30, "int8_b1_speedup_min": 1.8,
           "int4_b1_speedup_min": 2.8, "int4_b16_speedup_min": 2.0, "no_weight_mode_slower_than_bf16": True,
           "fp8_b64_speedup_min": 1.3, "kv_fp8_attention_speedup_min": 1.0, "kv_fp8_block_ratio_min": 1.9}
T0 = time.perf_counter()
# The engine part starts no new mode after this many seconds of the run (its modes take ~30-40 s
# each), so that one run stays within the lead's 8-minute slot; skipped modes say so in the JSON.
ENGINE_DEADLINE_S = float(os.environ.get("BENCH_QUANT_DEADLINE_S", "400"))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ----- kernels ----------------------------------------------------------------------------------
SHAPES = {"qkv_proj": (4096, 4096 + 2 * 1024), "o_proj": (4096, 4096), "gate_up_proj": (4096, 2 * 14336),
          "down_proj": (14336, 4096), "lm_head": (4096, 128256)}  # (K, N) of Llama-3.1-8B
PER_STEP = {"qkv_proj": 32, "o_proj": 32, "gate_up_proj": 32, "down_proj": 32, "lm_head": 1}
KERNEL_REPS = int(os.environ.get("BENCH_QUANT_KERNEL_REPS", "5"))  # interleaved timing rounds per rows (>= 3)
KERNEL_KINDS = os.environ.get("BENCH_QUANT_KINDS", "int8,int4,fp8").split(",")  # beside bf16, in the kernels part
KERNEL_ROWS = tuple(int(r) for r in os.environ.get("BENCH_QUANT_ROWS", "1,16,64,256").split(","))
# BENCH_QUANT_SHAPES (e.g. "qkv_proj,down_proj") times fewer shapes (the decode-step sum needs all five)
SHAPES = {k: v for k, v in SHAPES.items()
          if k in os.environ.get("BENCH_QUANT_SHAPES", ",".join(SHAPES)).split(",")}


def kernel_name(cfg: dict) -> str:
    """A short name of a tuned launch config, for the log: kernel, tile, split-K, dequantization."""
    if cfg.get("kernel") == "scaled_mm":
        return "scaled_mm"
    kind = (cfg.get("kernel") or ("gemv" if cfg.get("gemv") else "dot")) + ("" if cfg.get("swap", True) else "-gemm")
    tile = "x".join(str(cfg[k]) for k in ("block_m", "block_n", "block_k", "chunks") if cfg.get(k))
    extra = "".join(f" {k}={cfg[k]}" for k in ("layout", "dequant", "asm", "x_natural", "x_perm", "fold", "prefetch") if k in cfg)
    return (f"{kind} {tile} s{cfg.get('split_k', 1)}{'*' if cfg.get('serial') else ''} w{cfg.get('num_warps')}"
            f" st{cfg.get('num_stages')}{extra}")


def _spread(row: dict, kind: str, m: int) -> str:
    """'min-max us' of a kind's timing rounds, for the log."""
    sp = row.get(f"{kind}_m{m}_us_spread")
    return f"{sp[0]:.1f}-{sp[1]:.1f}us" if sp else "n/a"


def kernel_bench() -> dict:
    """Every linear shape of a decode step at KERNEL_ROWS rows: device time per call (CUDA-graph replays
    over enough weight copies to overflow L2, as engine.quant.tuning times candidates) for bf16 (cuBLAS),
    int8, int4 (Triton; awq and gptq layers run this same kernel on the same layout) and fp8 (fused
    per-token activation quantization + the GEMM tuning picked, _scaled_mm or Triton), each with the
    config tuning chose and every candidate's time; then the GEMM time of a whole decode step (32
    layers + LM head) per mode and rows, and its speed-up over bf16."""
    from engine.quant import tuning
    out = {}
    torch.manual_seed(0)
    for name, (k, n) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, 0.0, 0.02)
        i8, i4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, name)
        f8 = Fp8Linear.from_linear(lin) if fp8_supported(lin.weight.device) and "fp8" in KERNEL_KINDS else None
        copies = tuning.weight_copies(k * n)
        # Distinct weight copies per kind, so small layers stream from DRAM as in a decode step.
        mods = {"bf16": [lin] + [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                                 for _ in range(copies - 1)],
                "int8": [i8] + [Int8Linear(i8.weight_int8.clone(), i8.scales, None) for _ in range(copies - 1)],
                "int4": [i4] + [Int4Linear(i4.qweight, i4.scales, i4.zeros, None) for _ in range(copies - 1)]}
        mods = {kd: v for kd, v in mods.items() if kd == "bf16" or kd in KERNEL_KINDS}
        if f8 is not None:
            mods["fp8"] = [f8] + [Fp8Linear(f8.weight_fp8.clone(), f8.weight_scale.view(-1), None)
                                  for _ in range(copies - 1)]
        row = {"K": k, "N": n}
        for m in KERNEL_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                ref = F.linear(x, lin.weight)
                if "int8" in mods:
                    row[f"int8_m{m}_err_vs_dequant"] = rel_err(i8(x), int8_linear_reference(x, i8.weight_int8,
                                                                                            i8.scales))
                if "int4" in mods:
                    row[f"int4_m{m}_err_vs_dequant"] = rel_err(i4(x), int4_linear_reference(x, i4.qweight, i4.scales,
                                                                                            i4.zeros))
                if f8 is not None:
                    try:
                        row[f"fp8_m{m}_err_vs_oracle"] = rel_err(f8(x), fp8_linear_reference(
                            x, f8.weight_fp8, f8.weight_scale.view(-1)))
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        row[f"fp8_m{m}_error"] = repr(exc)[:300]
                # KERNEL_REPS rounds interleaved over the kinds (each a best-of-3 graph replay window),
                # after tuning (the error checks above made the first calls): median and spread per kind.
                samples = {kind: [] for kind in mods}
                for _ in range(KERNEL_REPS):
                    for kind, ms_ in mods.items():
                        if f"{kind}_m{m}_error" in row:
                            continue
                        try:
                            fn = lambda ms_=ms_: [mod(x) for mod in ms_]  # noqa: E731
                            samples[kind].append(tuning._graph_time(fn, copies) * 1e3)
                        except Exception as exc:  # noqa: BLE001 - record and go on
                            row[f"{kind}_m{m}_error"] = repr(exc)[:300]
                for kind, ts in samples.items():
                    ts = sorted(ts)
                    row[f"{kind}_m{m}_us"] = ts[len(ts) // 2] if ts else float("nan")
                    row[f"{kind}_m{m}_us_spread"] = [ts[0], ts[-1]] if ts else None
                    row[f"{kind}_m{m}_us_samples"] = ts
                    if kind != "bf16":
                        row[f"{kind}_m{m}_speedup"] = row[f"bf16_m{m}_us"] / row[f"{kind}_m{m}_us"]
        for kind, nbytes in (("bf16", k * n * 2), ("int8", k * n), ("int4", k * n // 2), ("fp8", k * n)):
            if f"{kind}_m1_us" in row:
                row[f"{kind}_m1_weight_GBps"] = nbytes / row[f"{kind}_m1_us"] / 1e3
        row["tuning"] = {str(key): {"chosen": tuning.chosen.get(key), "tuning_s": tuning.seconds.get(key),
                                    "candidates_us": [(c, t * 1e3) for c, t in tuning.timings.get(key, [])]}
                         for key in tuning.chosen if key[2:4] in ((n, k),)}
        row["chosen"] = {f"{key[0]}_m{key[1]}": kernel_name(cfg) for key, cfg in tuning.chosen.items()
                         if key[2:4] == (n, k)}
        out[name] = row
        log(f"kernels {name} chose: " + ", ".join(f"{key} {v}" for key, v in row["chosen"].items()))
        for key in tuning.chosen:  # the fastest candidates of each key, and the fastest of each kernel family
            if key[2:4] != (n, k) or key not in tuning.timings:
                continue
            ranked = sorted(tuning.timings[key], key=lambda r: r[1])
            best_of = {}
            for cfg, t in ranked:
                best_of.setdefault(kernel_name(cfg).split(" ")[0], (cfg, t))
            log(f"  {key[0]}_m{key[1]}: top " + "; ".join(f"{kernel_name(c)} {t * 1e3:.1f}us" for c, t in ranked[:3])
                + " | per kernel: " + "; ".join(f"{fam} {t * 1e3:.1f}us" for fam, (c, t) in best_of.items())
                + f" | {sum(t == float('inf') for _, t in ranked)} of {len(ranked)} failed or disagreed")
        log(f"kernels {name}: " + " | ".join(
            f"m{m} bf16 {row[f'bf16_m{m}_us']:.1f}us ({_spread(row, 'bf16', m)}) " + " ".join(
                f"{kd} x{row.get(f'{kd}_m{m}_speedup', float('nan')):.2f} ({_spread(row, kd, m)})"
                for kd in ("int8", "int4", "fp8") if f"{kd}_m{m}_us" in row)
            for m in KERNEL_ROWS))
        del lin, i8, i4, f8, mods
        torch.cuda.empty_cache()
    step = {}
    for m in KERNEL_ROWS:
        for kind in ("bf16", "int8", "int4", "fp8"):
            times = [out[nm].get(f"{kind}_m{m}_us") for nm in SHAPES]
            if all(t is not None and t == t for t in times):
                step[f"{kind}_m{m}_us"] = sum(t * PER_STEP[nm] for t, nm in zip(times, SHAPES))
        for kind in ("int8", "int4", "fp8"):
            if f"{kind}_m{m}_us" in step:
                step[f"{kind}_m{m}_speedup"] = step[f"bf16_m{m}_us"] / step[f"{kind}_m{m}_us"]
    out["decode_step_gemms"] = step
    sp = lambda kind, m: step.get(f"{kind}_m{m}_speedup", 0.0)  # noqa: E731
    # The targets read at the GEMM level (the engine's TPOT adds attention, norms and launches to both sides).
    out["met_at_gemm_level"] = {
        "int4_b1_speedup": sp("int4", 1) >= TARGETS["int4_b1_speedup_min"],
        "int4_b16_speedup": sp("int4", 16) >= TARGETS["int4_b16_speedup_min"],
        "int8_b1_speedup": sp("int8", 1) >= TARGETS["int8_b1_speedup_min"],
        "fp8_b64_speedup": sp("fp8", 64) >= TARGETS["fp8_b64_speedup_min"],
        "no_weight_mode_slower_than_bf16": all(sp(kd, m) >= 1.0 for kd in ("int8", "int4", "fp8") for m in KERNEL_ROWS
                                               if kd in KERNEL_KINDS),
    }
    log("decode-step GEMMs (32 layers + LM head), speed-up over bf16: " + ", ".join(
        f"{k_}={v:.2f}" for k_, v in step.items() if k_.endswith("speedup")))
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
    trims = _reserved_trims(llm)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    steps = llm.engine.stats().steps
    decode_steps = [s for s in steps if s.num_prefill_tokens == 0]
    # The steady decode step: steps decoding the whole batch, the first left out (it can absorb a wait for the
    # prefill before it). TPOT also holds the mixed steps that prefill the later prompts of a batch.
    full = sorted(s.duration for s in decode_steps[1:] if s.num_decode_tokens == batch)
    return {"tpot_ms": 1e3 * sum(o.metrics.tpot for o in outs) / len(outs),
            "decode_step_ms": 1e3 * full[len(full) // 2] if full else float("nan"),
            "wall_s": wall, "output_tok_per_s": batch * new_tokens / wall,
            "decode_steps_graphed": sum(bool(getattr(s, "cuda_graph", False)) for s in decode_steps),
            "decode_steps": len(decode_steps),
            # steps that emptied the allocator's cache (engine.memory.reserved_trim_bytes): the next ones re-allocate
            "reserved_trims": _reserved_trims(llm) - trims}


def _reserved_trims(llm: LLM) -> int:
    memory = llm.engine.stats().memory
    return memory.num_reserved_trims if memory is not None else 0


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


def prefill_tok_s(llm: LLM, seed: int) -> float:
    """Prompt tokens per second of one generate() of PREFILL_PROMPTS x PREFILL_LEN random tokens, 1 new token each."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, llm.spec.vocab_size, (PREFILL_PROMPTS, PREFILL_LEN), generator=g).tolist()
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return PREFILL_PROMPTS * PREFILL_LEN / (time.perf_counter() - t)


def speed_curve(llm: LLM) -> tuple[dict, dict]:
    """TPOT per batch size and prefill tokens/s: a warm-up pass, then REPS passes interleaved over BATCHES and
    the prefill point (median, spread)."""
    for b in BATCHES:
        tpot(llm, b, PROMPT_LEN, 4, 100 + b)
    prefill_tok_s(llm, 99)
    runs = {b: [] for b in BATCHES}
    prefill = []
    for rep in range(REPS):
        for b in BATCHES:
            runs[b].append(tpot(llm, b, PROMPT_LEN, NEW_TOKENS, 1000 * rep + b))
        prefill.append(prefill_tok_s(llm, 1000 * rep + 999))
    out = {}
    for b, rs in runs.items():
        t = sorted(r["tpot_ms"] for r in rs)
        d = sorted(r["decode_step_ms"] for r in rs)
        out[str(b)] = {"tpot_ms": t[len(t) // 2], "tpot_ms_min": t[0], "tpot_ms_max": t[-1],
                       "tpot_ms_runs": [r["tpot_ms"] for r in rs],
                       "decode_step_ms": d[len(d) // 2], "decode_step_ms_min": d[0], "decode_step_ms_max": d[-1],
                       "decode_steps_graphed": rs[-1]["decode_steps_graphed"], "decode_steps": rs[-1]["decode_steps"],
                       "reserved_trims_runs": [r["reserved_trims"] for r in rs]}
    p = sorted(prefill)
    return out, {"tok_s": p[len(p) // 2], "tok_s_min": p[0], "tok_s_max": p[-1], "tok_s_runs": prefill,
                 "prompts": PREFILL_PROMPTS, "prompt_len": PREFILL_LEN}


def hub_prequantized(llm: LLM, method: str, head: torch.nn.Module | None):
    """The LLM's current int4 decoder layers sent through `method`'s Hub layout and back (a checkpoint's
    load path), on the host, and `head` (the int8 LM head) as the LM head: the format the engine's own
    awq/gptq produce (engine.quant.LM_HEAD_MODE). engine.quant.checkpoint.Prequantized for LLM.prequantized."""
    from engine.quant.checkpoint import Prequantized, awq_to_int4, gptq_to_int4, int4_to_awq, int4_to_gptq
    pre = Prequantized(method.removesuffix("_act"), float_embedding=False)  # the engine's awq/gptq: int8 table too
    if head is not None:
        pre.modules["lm_head"] = head
    for name, mod in llm.model.named_modules():
        if not isinstance(mod, Int4Linear) or name == "lm_head":
            continue
        # On the GPU (the packing is plain torch): on the host it took minutes for 8B.
        # gptq_act: a seeded random act-order (desc_act=True), input feature perm[j] at stored column j
        perm = torch.randperm(mod.in_features, generator=torch.Generator().manual_seed(len(pre.modules)),
                              device="cpu").to(mod.qweight.device) if method == "gptq_act" else None
        cpu = Int4Linear(mod.qweight, mod.scales, mod.zeros.clamp(min=1), None, mod.group_size, perm)
        if method == "awq":
            layer = awq_to_int4(**int4_to_awq(cpu))
        else:
            t = int4_to_gptq(cpu)
            layer = gptq_to_int4(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], mod.group_size)
        pre.modules[name] = layer
    return pre


def weight_breakdown(model: torch.nn.Module) -> dict:
    """Bytes of the model's weights by part: embedding, LM head, decoder linears (codes + scales +
    zeros), norms and the rest (tied tensors once), to see what keeps the ratio above its target."""
    parts, seen = {}, set()
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                              if not n.endswith(("cos", "sin"))]
    for name, t in named:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        part = ("embedding" if name.startswith("embed_tokens") else "lm_head" if name.startswith("lm_head")
                else "norms" if "norm" in name else "decoder_linears" if name.startswith("layers.") else "other")
        parts[part] = parts.get(part, 0) + t.numel() * t.element_size()
    return parts


def run_mode(llm: LLM, base: EngineConfig, mode, kv: str, ref_lp, ref_greedy, quality_prompts, greedy_prompts):
    cfg = base.replace(quantization=mode, kv_cache_dtype=kv)
    t = time.perf_counter()
    llm.reconfigure(cfg)
    res = {"reconfigure_s": time.perf_counter() - t}
    st = llm.engine.stats()
    res["weight_bytes_by_part"] = weight_breakdown(llm.model)
    res.update(weight_bytes=st.weight_bytes, kv_bytes_per_token=st.kv_bytes_per_token,
               num_gpu_blocks=st.num_gpu_blocks, attention_backend=st.attention_backend,
               cuda_graphs=st.cuda_graphs)
    log(f"mode {mode or 'bf16'} kv {kv}: reconfigured in {res['reconfigure_s']:.1f}s, weights "
        f"{st.weight_bytes / 2**30:.2f} GiB, {st.num_gpu_blocks} blocks, graphs {st.cuda_graphs}")
    res["curve"], res["prefill"] = speed_curve(llm)
    res["b1_graph_replay_ms"] = graph_replay_ms(llm)
    log("  tpot ms " + ", ".join(f"b{b} {r['tpot_ms']:.2f} [{r['tpot_ms_min']:.2f}, {r['tpot_ms_max']:.2f}]"
                                 for b, r in res["curve"].items()) + f" | graph b1 {res['b1_graph_replay_ms']}"
        + " | decode step ms " + ", ".join(f"b{b} {r['decode_step_ms']:.2f} [{r['decode_step_ms_min']:.2f}, "
                                           f"{r['decode_step_ms_max']:.2f}]" for b, r in res["curve"].items())
        + f" | prefill {res['prefill']['tok_s']:.0f} tok/s [{res['prefill']['tok_s_min']:.0f}, "
          f"{res['prefill']['tok_s_max']:.0f}]")
    if mode in HUB_MODES:  # int4's codes: int4's quality
        return res, None, None
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
    base = EngineConfig(max_model_len=4096, max_num_seqs=max(BATCHES), max_num_batched_tokens=8192,
                        enable_prefix_caching=False, gpu_memory_utilization=0.85, attention_backend=backend)
    t = time.perf_counter()
    llm = LLM.random(MODEL, base, dtype=torch.bfloat16, seed=0)
    log(f"LLM.random({MODEL}) with backend {backend}: {time.perf_counter() - t:.1f}s")
    g = torch.Generator().manual_seed(123)
    quality_prompts = torch.randint(0, llm.spec.vocab_size, (8, 512), generator=g)
    greedy_prompts = torch.randint(0, llm.spec.vocab_size, (4, 32), generator=g).tolist()
    results, ref_lp, ref_greedy, pre, head8 = {}, None, None, {}, None
    for mode in MODES:
        key = mode or "bf16"
        if time.perf_counter() - T0 > ENGINE_DEADLINE_S:
            results[key] = {"error": f"skipped: past the {ENGINE_DEADLINE_S:.0f} s deadline of the run"}
            log(f"mode {key}: skipped (deadline)")
            continue
        try:
            if mode in HUB_MODES:
                if mode not in pre:
                    raise RuntimeError("int4 did not run, so there are no codes to send through the Hub layouts")
                llm.prequantized = pre[mode]
            res, lp, gen = run_mode(llm, base, mode, "auto", ref_lp, ref_greedy, quality_prompts, greedy_prompts)
            if mode == "int4":  # the engine's awq/gptq head is int8 (of the int4 head's weights: same bytes, speed)
                head = llm.model.lm_head
                if isinstance(head, Int4Linear):
                    float_head = torch.nn.Linear(head.in_features, head.out_features, bias=False, device="cuda",
                                                 dtype=torch.bfloat16)
                    float_head.weight.data = head.dequantized_weight(torch.bfloat16)
                    head8 = Int8Linear.from_linear(float_head)
                    del float_head
                pre = {m: hub_prequantized(llm, m, head8) for m in HUB_MODES if m in MODES}
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others
            traceback.print_exc()
            results[key] = {"error": repr(exc)[:500]}
            continue
        if mode is None:
            ref_lp, ref_greedy = lp, gen
        results[key] = res
        gc.collect()
        torch.cuda.empty_cache()
    llm.prequantized = None
    try:
        if time.perf_counter() - T0 > ENGINE_DEADLINE_S:
            raise RuntimeError(f"skipped: past the {ENGINE_DEADLINE_S:.0f} s deadline of the run")
        if not RUN_KV_FP8:
            raise RuntimeError("skipped: not in BENCH_QUANT_MODES")
        res, _, _ = run_mode(llm, base, None, "fp8", ref_lp, ref_greedy, quality_prompts, greedy_prompts)
        results["bf16_kvfp8"] = res
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        results["bf16_kvfp8"] = {"error": repr(exc)[:500]}
    return results


def summarize(eng: dict, attention: dict | None = None) -> dict:
    bf = eng.get("bf16", {})
    s = {"speedup_curve": {}}

    def tp(mode, b, key="tpot_ms"):
        return eng.get(mode, {}).get("curve", {}).get(str(b), {}).get(key)

    for mode in ("int8", "int4", *HUB_MODES, "fp8", "bf16_kvfp8"):
        if "weight_bytes" in eng.get(mode, {}) and "weight_bytes" in bf:
            s[f"{mode}_weight_ratio"] = eng[mode]["weight_bytes"] / bf["weight_bytes"]
        curve = {str(b): tp("bf16", b) / tp(mode, b) for b in BATCHES if tp(mode, b) and tp("bf16", b)}
        if curve:
            s["speedup_curve"][mode] = curve
        step = {str(b): tp("bf16", b, "decode_step_ms") / tp(mode, b, "decode_step_ms") for b in BATCHES
                if tp(mode, b, "decode_step_ms") and tp("bf16", b, "decode_step_ms")}
        if step:
            s.setdefault("decode_step_speedup_curve", {})[mode] = step
        pre, pre_bf = (eng.get(m_, {}).get("prefill", {}).get("tok_s") for m_ in (mode, "bf16"))
        if pre and pre_bf:
            s.setdefault("prefill_speedup", {})[mode] = pre / pre_bf
        gr, gb = eng.get(mode, {}).get("b1_graph_replay_ms"), bf.get("b1_graph_replay_ms")
        if gr and gb:
            s[f"{mode}_b1_graph_replay_speedup"] = gb / gr  # one window of replays per mode: not a median
            s[f"{mode}_b1_graph_replay_runs"] = 1
    if eng.get("bf16_kvfp8", {}).get("num_gpu_blocks") and bf.get("num_gpu_blocks"):
        s["kv_fp8_block_ratio"] = eng["bf16_kvfp8"]["num_gpu_blocks"] / bf["num_gpu_blocks"]
    if attention and "fp8_speedup" in attention:
        s["kv_fp8_attention_speedup"] = attention["fp8_speedup"]
    t, c = TARGETS, s["speedup_curve"]
    weight_modes = [m for m in ("int8", "int4", *HUB_MODES, "fp8") if m in c]
    s["met"] = {
        "int8_weight_ratio": s.get("int8_weight_ratio", 9) <= t["int8_weight_ratio_max"],
        "int4_weight_ratio": all(s.get(f"{m}_weight_ratio", 9) <= t["int4_weight_ratio_max"] for m in INT4_MODES),
        "int8_b1_speedup": c.get("int8", {}).get("1", 0) >= t["int8_b1_speedup_min"],
        "int4_awq_gptq_b1_speedup": all(c.get(m, {}).get("1", 0) >= t["int4_b1_speedup_min"] for m in INT4_MODES),
        "int4_awq_gptq_b16_speedup": all(c.get(m, {}).get("16", 0) >= t["int4_b16_speedup_min"] for m in INT4_MODES),
        "no_weight_mode_slower_than_bf16": bool(weight_modes) and all(
            v >= 1.0 for m in weight_modes for v in c[m].values()),
        "fp8_b64_speedup": c.get("fp8", {}).get("64", 0) >= t["fp8_b64_speedup_min"],
        "kv_fp8_attention_speedup": s.get("kv_fp8_attention_speedup", 0) >= t["kv_fp8_attention_speedup_min"],
        "kv_fp8_block_ratio": s.get("kv_fp8_block_ratio", 0) >= t["kv_fp8_block_ratio_min"],
    }
    return s


def table(eng: dict) -> str:
    bf = eng.get("bf16", {})
    lines = [f"{'mode':<12}{'weights GiB':>12}{'x bf16':>8}{'KV blocks':>10}{'graph b1 ms':>12}"
             + "".join(f"{'b' + str(b) + ' ms (x)':>17}" for b in BATCHES) + f"{'prefill x':>10}{'mean KL':>10}"
             + f"{'top1':>7}"]
    for key, r in eng.items():
        if "error" in r:
            lines.append(f"{key:<12} error: {r['error'][:100]}")
            continue
        ratio = r["weight_bytes"] / bf["weight_bytes"] if "weight_bytes" in bf else float("nan")
        gr = r.get("b1_graph_replay_ms")
        cells = ""
        for b in BATCHES:
            mine, ref = r["curve"][str(b)]["tpot_ms"], bf.get("curve", {}).get(str(b), {}).get("tpot_ms")
            cells += f"{mine:>9.2f} ({ref / mine if ref else float('nan'):.2f})"
        pre, pre_bf = r.get("prefill", {}).get("tok_s"), bf.get("prefill", {}).get("tok_s")
        lines.append(f"{key:<12}{r['weight_bytes'] / 2**30:>12.2f}{ratio:>8.3f}{r['num_gpu_blocks']:>10}"
                     f"{(gr if gr else float('nan')):>12.2f}{cells}"
                     f"{(pre / pre_bf if pre and pre_bf else float('nan')):>10.2f}"
                     f"{r.get('mean_kl', float('nan')):>10.2e}{r.get('top1_agreement', float('nan')):>7.3f}")
    return "\n".join(lines)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "quant.json"),
                    help="where to write the JSON results")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_QUANT_"))
    result = {"command": " ".join(p for p in (env, "PYTHONUNBUFFERED=1 PYTHONPATH=. python3", *sys.argv) if p), "model": MODEL, "dtype": "bfloat16", "weights": "random (seed 0)",
              "device": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "batches": BATCHES, "reps": REPS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
              "targets": TARGETS, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    only = os.environ.get("BENCH_QUANT_PARTS", "kernels,attention,engine").split(",")
    result["parts"] = only
    # Kernels first: the per-shape speed-ups are the most direct answer and take about a minute.
    if "kernels" in only:
        try:
            result["kernels"] = kernel_bench()
        except Exception as exc:  # noqa: BLE001 - the other parts must still run
            traceback.print_exc()
            result["kernels"] = {"error": repr(exc)[:500]}
        record_tuning(result)
        save(result, args.out)
        gc.collect()
        torch.cuda.empty_cache()
    if "attention" in only:
        try:
            result["attention_b64_ctx4096"] = attention_bench()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            result["attention_b64_ctx4096"] = {"error": repr(exc)[:500]}
        save(result, args.out)
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
        record_tuning(result)
        result["summary"] = summarize(result["engine"], result.get("attention_b64_ctx4096"))
        print(table(result["engine"]))
        print(json.dumps(result["summary"], indent=1))
    result["seconds"] = time.perf_counter() - T0
    save(result, args.out)
    log("done")


def record_tuning(result: dict) -> None:
    """The configs engine.quant.tuning chose so far (every shape key) and the seconds its tuning took."""
    from engine.quant import tuning
    result["configs_chosen"] = {str(k): v for k, v in tuning.chosen.items()}
    result["tuning_seconds_total"] = sum(tuning.seconds.values())


def save(result: dict, out: str) -> None:
    """Write what is there so far (a run cut short still leaves its first parts)."""
    text = json.dumps(result, indent=1, default=str)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(out).name).write_text(text)


if __name__ == "__main__":
    main()
