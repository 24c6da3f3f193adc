"""Microbenchmark of the Triton attention kernels against the device's physical limits and torch SDPA.

Decode (issue 3's target): batch 64, context 4096, 32 query heads, 8 KV heads, head_dim 128, KV block
16, bf16, shuffled block tables. The kernel must read every K/V byte of every request once, so its
floor is KV bytes / copy bandwidth; the figure of merit is (KV bytes / kernel time) / copy bandwidth,
target >= 0.75. The copy bandwidth is measured here, by a large device-to-device copy counting bytes
read plus bytes written. torch's scaled_dot_product_attention runs over the same K/V gathered into
contiguous [B, heads, context, head_dim] tensors (the gather is not timed), with enable_gqa and with
K/V expanded to all query heads.

Prefill: 8 prompts of 2048 tokens (no cached prefix), same heads, causal; its rate is attention FLOPs
(4 * head_dim per unmasked query-key pair per head) over time, beside a measured bf16 matmul rate and
SDPA's causal flash attention over contiguous tensors.

Each kernel configuration is checked against SDPA before it is timed. Times are
triton.testing.do_bench medians (ms). Results go to data/benchmarks/attention_kernels.json and, when
set, $OUT/attention_kernels.json.

    PYTHONPATH=. python3 benchmarks/bench_attention.py

BENCH_ATTENTION_PARTS (default "decode,few,trace,prefill") runs some of the parts; the trace-like part times
TRACE_LIKE_CASES (many requests, ragged contexts, short ones included); "batches" (not in the default) times
BATCH_CASES over bf16 and fp8 caches (bench_decode_batches). Only a run of every part rewrites
data/benchmarks/attention_kernels.json.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kernels.triton_decode import decode_attention, decode_num_splits, _num_sms  # noqa: E402
from engine.kernels.triton_prefill import prefill_attention  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM ** -0.5


def bench(fn) -> float:
    """Median time of fn in milliseconds."""
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_bandwidth() -> dict:
    """Device-to-device copy of 2 GiB: bytes read + bytes written per second."""
    n = 1 << 30  # bf16 elements: 2 GiB
    src = torch.randn(n, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"bytes": moved, "ms": ms, "bytes_per_s": moved / (ms * 1e-3)}


def matmul_rate() -> dict:
    """bf16 8192^3 matmul on random data: FLOP/s."""
    n = 8192
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    ms = bench(lambda: a @ b)
    return {"n": n, "ms": ms, "flop_per_s": 2 * n ** 3 / (ms * 1e-3)}


def time_config(run, out, ref, cfg: dict, configs: list, timer=None) -> tuple[float, float] | None:
    """(ms, rel err) of one kernel config that gives the right result, timed by timer (default: bench); else the
    failure is appended to configs (a wrong result, or a config that does not compile, e.g. out of shared memory)
    and None returned."""
    try:
        out.fill_(float("nan"))
        run()
        torch.cuda.synchronize()
        err = rel_err(out, ref)
        if not err < 1e-2:
            configs.append({**cfg, "error": f"wrong result: rel err {err}"})
            return None
        return (timer or bench)(run), err
    except Exception as exc:  # noqa: BLE001 - recorded, and the other configs still run
        configs.append({**cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return None


def best_config(result: dict) -> None:
    """result["best"]: the fastest config that ran correctly (None if none did)."""
    ok = [c for c in result["configs"] if "ms" in c]
    result["best"] = min(ok, key=lambda c: c["ms"]) if ok else None


def paged_cache(num_seqs: int, context: int, gen: torch.Generator):
    """Caches of exactly num_seqs * context tokens on shuffled physical blocks, and the block tables."""
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    block_tables = perm.view(num_seqs, blocks_per_seq).to(torch.int32)
    return k_cache, v_cache, block_tables


def gather_contiguous(cache, block_tables, context):
    """[B, num_kv_heads, context, head_dim] contiguous copy of each request's K or V."""
    b = block_tables.shape[0]
    return cache[block_tables.long()].view(b, context, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()


def bench_decode(copy_bps: float, gen: torch.Generator) -> dict:
    num_seqs, context = 64, 4096
    k_cache, v_cache, block_tables = paged_cache(num_seqs, context, gen)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    kv_bytes = 2 * num_seqs * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()

    group = NUM_HEADS // NUM_KV_HEADS
    k = gather_contiguous(k_cache, block_tables, context)
    v = gather_contiguous(v_cache, block_tables, context)
    k_exp, v_exp = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q4 = q.unsqueeze(2)  # [B, H, 1, D]
    ref = F.scaled_dot_product_attention(q4, k_exp, v_exp, scale=SCALE).squeeze(2)

    result = {"shape": dict(num_seqs=num_seqs, context=context, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
                            head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=str(DTYPE)),
              "kv_bytes": kv_bytes, "configs": []}
    sms = _num_sms(torch.cuda.current_device())
    auto_splits = decode_num_splits(num_seqs, NUM_KV_HEADS, context, sms)
    # The default (what TritonBackend runs) first, then a small sweep around it.
    configs = [dict()]
    configs += [dict(num_splits=s) for s in (1, 2, 4, 8) if s != auto_splits]
    configs += [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in ((32, 4, 2), (64, 4, 3), (128, 4, 2),
                                                                                (128, 8, 3))]
    out = torch.empty_like(q)
    for cfg in configs:
        def run():
            decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, SCALE, max_seq_len=context, **cfg)
        timed = time_config(run, out, ref, cfg, result["configs"])
        if timed is None:
            continue
        ms, err = timed
        bps = kv_bytes / (ms * 1e-3)
        row = {**cfg, "ms": ms, "kv_bytes_per_s": bps, "ratio_to_copy_bw": bps / copy_bps, "rel_err": err}
        result["configs"].append(row)
        print(f"decode {cfg or 'default (splits=%d)' % auto_splits}: {ms:.4f} ms, {bps / 1e12:.2f} TB/s, "
              f"{bps / copy_bps:.3f} of copy bw, rel err {err:.1e}", flush=True)
    result["default"] = {**result["configs"][0], "num_splits": auto_splits}
    best_config(result)

    sdpa = {}
    try:
        sdpa["enable_gqa_ms"] = bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, enable_gqa=True))
    except Exception as exc:  # enable_gqa needs torch >= 2.5 and a backend that takes it
        sdpa["enable_gqa_ms"] = None
        sdpa["enable_gqa_error"] = f"{type(exc).__name__}: {exc}"[:300]
    sdpa["expanded_ms"] = bench(lambda: F.scaled_dot_product_attention(q4, k_exp, v_exp, scale=SCALE))
    sdpa["best_ms"] = min(t for t in (sdpa["enable_gqa_ms"], sdpa["expanded_ms"]) if t)
    sdpa["kv_bytes_per_s_at_best"] = kv_bytes / (sdpa["best_ms"] * 1e-3)
    result["sdpa"] = sdpa
    result["speedup_vs_sdpa"] = sdpa["best_ms"] / result["default"]["ms"] if "ms" in result["default"] else None
    del k, v, k_exp, v_exp, k_cache, v_cache
    torch.cuda.empty_cache()
    return result


def bench_decode_few_requests(copy_bps: float, gen: torch.Generator) -> dict:
    """4 requests of 4096 tokens: only 32 (request, KV head) pairs, so without splitting the
    sequence most SMs would idle. Timed as CUDA-graph replays, which also checks that the decode
    launch captures."""
    num_seqs, context = 4, 4096
    k_cache, v_cache, block_tables = paged_cache(num_seqs, context, gen)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    kv_bytes = 2 * num_seqs * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    out = torch.empty_like(q)
    auto_splits = decode_num_splits(num_seqs, NUM_KV_HEADS, context, _num_sms(torch.cuda.current_device()))
    result = {"shape": dict(num_seqs=num_seqs, context=context), "kv_bytes": kv_bytes, "configs": []}
    for splits in (auto_splits, 1):
        def run():
            decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, SCALE, max_seq_len=context,
                             num_splits=splits)
        run()
        ms = do_bench_cudagraph(run, rep=200, return_mode="median")
        bps = kv_bytes / (ms * 1e-3)
        result["configs"].append({"num_splits": splits, "ms": ms, "kv_bytes_per_s": bps,
                                  "ratio_to_copy_bw": bps / copy_bps})
        print(f"decode 4 x 4096, {splits} splits (graph replay): {ms * 1e3:.1f} us, {bps / copy_bps:.3f} of copy bw",
              flush=True)
    return result


BATCH_CASES = ((32, 80), (64, 80), (128, 80), (32, 4096), (64, 4096), (128, 4096))  # (requests, context)
BATCH_CONFIGS = (dict(), dict(num_splits=2), dict(block_n=32, num_warps=4, num_stages=2),
                 dict(block_n=32, num_warps=2, num_stages=2), dict(block_n=32, num_warps=4, num_stages=3),
                 dict(block_n=16, num_warps=2, num_stages=2), dict(block_n=64, num_warps=4, num_stages=3),
                 dict(block_n=128, num_warps=4, num_stages=2))


def bench_decode_batches(copy_bps: float, gen: torch.Generator) -> list[dict]:
    """Decode at 32 / 64 / 128 requests of equal context (80 tokens, as bench_quant's engine curve; 4096), over bf16
    and fp8 (e4m3) caches: the default and BATCH_CONFIGS, timed as CUDA-graph replays (as the engine runs decode) of
    one launch per copy of the case's K/V, with enough copies (up to 8) that they overflow L2. 32 x 8 = 256 and
    64 x 8 = 512 (request, KV head) programs are one and two of the 2-per-SM waves the split count aims at."""
    results = []
    for num_seqs, context in BATCH_CASES:
        per_copy = 2 * num_seqs * context * NUM_KV_HEADS * HEAD_DIM * 2
        copies = max(1, min(8, (256 << 20) // per_copy))
        k_cache, v_cache, tables = paged_cache(num_seqs * copies, context, gen)
        tables = tables.view(copies, num_seqs, -1)
        seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
        out = torch.empty_like(q)
        group = NUM_HEADS // NUM_KV_HEADS
        for kv_dtype in (DTYPE, torch.float8_e4m3fn):
            kc, vc = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
            k = gather_contiguous(kc.to(DTYPE), tables[-1], context).repeat_interleave(group, dim=1)
            v = gather_contiguous(vc.to(DTYPE), tables[-1], context).repeat_interleave(group, dim=1)
            ref = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=SCALE).squeeze(2)  # the last copy's
            del k, v
            kv_bytes = per_copy // 2 * kc.element_size()
            case = {"num_seqs": num_seqs, "context": context, "kv_dtype": str(kv_dtype).replace("torch.", ""),
                    "kv_bytes": kv_bytes, "copies": copies, "configs": []}
            for cfg in BATCH_CONFIGS:
                def run():
                    for c in range(copies):
                        decode_attention(q, kc, vc, tables[c], seq_lens, out, SCALE, max_seq_len=context, **cfg)
                timed = time_config(run, out, ref, cfg, case["configs"],
                                    timer=lambda f: do_bench_cudagraph(f, rep=100, return_mode="median"))
                if timed is None:
                    continue
                ms, err = timed[0] / copies, timed[1]
                case["configs"].append({**cfg, "us": ms * 1e3, "ratio_to_copy_bw": kv_bytes / (ms * 1e-3) / copy_bps,
                                        "rel_err": err})
            ok = [c for c in case["configs"] if "us" in c]
            case["best"] = min(ok, key=lambda c: c["us"]) if ok else None
            d = case["configs"][0]
            print(f"decode {num_seqs} x {context} {case['kv_dtype']}: default {d.get('us', float('nan')):.1f} us "
                  f"({d.get('ratio_to_copy_bw', float('nan')):.3f} of copy bw); "
                  + ", ".join(f"{ {k: v for k, v in c.items() if k in ('num_splits', 'block_n', 'num_warps', 'num_stages')} }"
                              f" {c['us']:.1f}" for c in ok[1:]), flush=True)
            results.append(case)
            del kc, vc
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return results


TRACE_LIKE_CASES = (  # (requests, median context, log-normal sigma)
    (1000, 400, 0.7),  # the trace's busy steps later on
    (300, 560, 0.7),  # its steps 400-415 (profile_windows_llama-3.1-8b_h200.json: 296 running)
    (1000, 190, 0.7),  # its busy steps early on (steps 32-47 of throughput_targets' deep mode: prompts + ~40 tokens)
    (256, 72, 0.2),  # decode_profile.py --batch 256 --prompt-len 64 (attention at 0.41 of its roofline there)
)


def bench_decode_trace_like(copy_bps: float, gen: torch.Generator, num_seqs: int = 1000, median: int = 400,
                            sigma: float = 0.7) -> dict:
    """Decode steps of many requests with ragged contexts (a log-normal of the given median, 16..2048 tokens),
    as in the busy steps of the 1000-request ShareGPT-like trace, where the engine's decode kernel ran at 0.67 of
    its roofline (throughput_targets_h200_cold.json, deep mode). The default config, then a sweep of tile, warps
    and stages; each checked against a per-request SDPA reference first. Bytes: the K/V of every context token
    once."""
    lens = torch.exp(torch.randn(num_seqs, generator=torch.Generator().manual_seed(1)) * sigma + math.log(median))
    lens = lens.clamp(16, 2048).to(torch.int64)
    blocks = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks, width = int(blocks.sum()), int(blocks.max())
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = torch.zeros(num_seqs, width, dtype=torch.int32, device="cuda")
    starts = torch.cumsum(blocks, 0) - blocks
    for i in range(num_seqs):
        block_tables[i, :blocks[i]] = perm[starts[i]:starts[i] + blocks[i]]
    seq_lens = lens.to(torch.int32).cuda()
    q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    group = NUM_HEADS // NUM_KV_HEADS
    ref = torch.empty_like(q)
    for i in range(num_seqs):
        n = int(lens[i])
        ids = block_tables[i, :blocks[i]].long()
        k = k_cache[ids].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).repeat_interleave(group, 0)
        v = v_cache[ids].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).repeat_interleave(group, 0)
        ref[i] = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, scale=SCALE).squeeze(1)
    kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    result = {"shape": dict(num_seqs=num_seqs, context_median=int(lens.median()), context_mean=float(lens.float().mean()),
                            context_max=int(lens.max())), "kv_bytes": kv_bytes, "configs": []}
    # The default again at the end: the first timing of a case can read slow (clocks after the reference loop).
    # And the default tile with the programs ordered request fastest (heads_first=False, the default until
    # attention_heads_first_h200.json).
    configs = [dict()] + [dict(block_n=bn, num_warps=w, num_stages=st) for bn in (16, 32, 64, 128) for w in (1, 2, 4)
                          for st in (1, 2, 3)] + [dict(heads_first=False), dict()]
    out = torch.empty_like(q)
    for cfg in configs:
        def run():
            decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out, SCALE, max_seq_len=int(lens.max()), **cfg)
        timed = time_config(run, out, ref, cfg, result["configs"])
        if timed is None:
            continue
        ms, err = timed
        bps = kv_bytes / (ms * 1e-3)
        result["configs"].append({**cfg, "ms": ms, "ratio_to_copy_bw": bps / copy_bps, "rel_err": err})
    tuned = {"block_n", "num_warps", "num_stages", "heads_first"}
    defaults = [c for c in result["configs"] if "ms" in c and not (tuned & c.keys())]
    result["default"] = min(defaults, key=lambda c: c["ms"]) if defaults else result["configs"][0]
    best_config(result)
    d, b = result["default"], result["best"]
    print(f"decode trace-like ({num_seqs} requests, median context {result['shape']['context_median']}): default "
          f"{d.get('ms', float('nan')) * 1e3:.1f} us = {d.get('ratio_to_copy_bw', float('nan')):.3f} of copy bw; best "
          f"{ {k: v for k, v in (b or {}).items() if k in ('block_n', 'num_warps', 'num_stages', 'heads_first')} } "
          f"{(b or {}).get('ms', float('nan')) * 1e3:.1f} us = {(b or {}).get('ratio_to_copy_bw', float('nan')):.3f}",
          flush=True)
    return result


def bench_prefill(matmul_fps: float, gen: torch.Generator) -> dict:
    num_seqs, prompt = 8, 2048
    k_cache, v_cache, block_tables = paged_cache(num_seqs, prompt, gen)
    seq_lens = torch.full((num_seqs,), prompt, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(0, (num_seqs + 1) * prompt, prompt, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs * prompt, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    flops = 4 * HEAD_DIM * NUM_HEADS * num_seqs * prompt * (prompt + 1) // 2

    k = gather_contiguous(k_cache, block_tables, prompt)
    v = gather_contiguous(v_cache, block_tables, prompt)
    group = NUM_HEADS // NUM_KV_HEADS
    k_exp, v_exp = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q4 = q.view(num_seqs, prompt, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    ref = F.scaled_dot_product_attention(q4, k_exp, v_exp, scale=SCALE, is_causal=True)
    ref = ref.transpose(1, 2).reshape(num_seqs * prompt, NUM_HEADS, HEAD_DIM)

    result = {"shape": dict(num_seqs=num_seqs, prompt=prompt, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
                            head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=str(DTYPE)),
              "flops": flops, "configs": []}
    configs = [dict(), dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
               dict(block_m=128, block_n=32, num_warps=4, num_stages=4),
               dict(block_m=128, block_n=32, num_warps=8, num_stages=3),
               dict(block_m=64, block_n=32, num_warps=4, num_stages=3),
               dict(block_m=128, block_n=128, num_warps=8, num_stages=3)]
    out = torch.empty_like(q)
    for cfg in configs:
        def run():
            prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, SCALE,
                              max_query_len=prompt, **cfg)
        timed = time_config(run, out, ref, cfg, result["configs"])
        if timed is None:
            continue
        ms, err = timed
        fps = flops / (ms * 1e-3)
        result["configs"].append({**cfg, "ms": ms, "flop_per_s": fps, "ratio_to_matmul": fps / matmul_fps,
                                  "rel_err": err})
        print(f"prefill {cfg or 'default'}: {ms:.4f} ms, {fps / 1e12:.1f} TFLOP/s, {fps / matmul_fps:.3f} of matmul, "
              f"rel err {err:.1e}", flush=True)
    result["default"] = result["configs"][0]
    best_config(result)
    sdpa = {"expanded_ms": bench(lambda: F.scaled_dot_product_attention(q4, k_exp, v_exp, scale=SCALE,
                                                                        is_causal=True))}
    try:
        sdpa["enable_gqa_ms"] = bench(lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, is_causal=True,
                                                                             enable_gqa=True))
    except Exception as exc:
        sdpa["enable_gqa_ms"] = None
        sdpa["enable_gqa_error"] = f"{type(exc).__name__}: {exc}"[:300]
    sdpa["ms"] = min(t for t in (sdpa["expanded_ms"], sdpa["enable_gqa_ms"]) if t)
    sdpa["flop_per_s"] = flops / (sdpa["ms"] * 1e-3)
    result["sdpa"] = sdpa
    return result


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy['bytes_per_s'] / 1e12:.3f} TB/s (read + write)", flush=True)
    mm = matmul_rate()
    print(f"bf16 matmul: {mm['flop_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    parts = os.environ.get("BENCH_ATTENTION_PARTS", "decode,few,trace,prefill").split(",")
    batches = bench_decode_batches(copy["bytes_per_s"], gen) if "batches" in parts else None
    decode = bench_decode(copy["bytes_per_s"], gen) if "decode" in parts else None
    decode_few = bench_decode_few_requests(copy["bytes_per_s"], gen) if "few" in parts else None
    decode_trace = [bench_decode_trace_like(copy["bytes_per_s"], gen, *case) for case in TRACE_LIKE_CASES] \
        if "trace" in parts else None
    prefill = bench_prefill(mm["flop_per_s"], gen) if "prefill" in parts else None
    results = {
        "benchmark": "attention_kernels",
        "command": "".join(f"{k}={os.environ[k]} " for k in ("BENCH_ATTENTION_PARTS",) if k in os.environ)
                   + "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "num_sms": _num_sms(torch.cuda.current_device()),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "copy_bandwidth": copy, "matmul": mm, "decode": decode, "decode_few_requests": decode_few,
        "decode_trace_like": decode_trace, "prefill": prefill, "decode_batches": batches,
    }
    text = json.dumps(results, indent=2)
    paths = [Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "attention_kernels.json"] \
        if all((decode, decode_few, decode_trace, prefill)) else []  # a partial run leaves the full results alone
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "attention_kernels.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    print("\n=== summary ===")
    print(f"device {results['device']}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth        {copy['bytes_per_s'] / 1e12:.3f} TB/s; bf16 matmul {mm['flop_per_s'] / 1e12:.0f} TFLOP/s")
    if decode:
        summarize_decode(decode)
    if decode_few:
        f = decode_few["configs"]
        print(f"decode 4 x 4096       {f[0]['num_splits']} splits {f[0]['ms'] * 1e3:.1f} us "
              f"({f[0]['ratio_to_copy_bw']:.3f} of copy bw) vs 1 split {f[1]['ms'] * 1e3:.1f} us")
    for case in decode_trace or []:
        d, b, shape = case["default"], case["best"] or {}, case["shape"]
        print(f"decode {shape['num_seqs']} x median {shape['context_median']}: default "
              f"{d.get('ratio_to_copy_bw', float('nan')):.3f} of copy bw, best {b.get('ratio_to_copy_bw', float('nan')):.3f} "
              f"{ {k: v for k, v in b.items() if k in ('block_n', 'num_warps', 'num_stages', 'heads_first')} }")
    if prefill:
        summarize_prefill(prefill)


def summarize_decode(decode: dict) -> None:
    d, b, s = decode["default"], decode["best"], decode["sdpa"]
    if "ms" in d:
        print(f"decode (default, {d['num_splits']} splits)  {d['ms'] * 1e3:.1f} us, "
              f"{d['kv_bytes_per_s'] / 1e12:.3f} TB/s of KV = {d['ratio_to_copy_bw']:.3f} of copy bw (target >= 0.75)")
    else:
        print(f"decode default FAILED: {d.get('error')}")
    if b:
        print(f"decode best config    {({k: v for k, v in b.items() if k in ('num_splits', 'block_n', 'num_warps', 'num_stages')})} "
              f"{b['ms'] * 1e3:.1f} us = {b['ratio_to_copy_bw']:.3f} of copy bw")
    print(f"decode SDPA           enable_gqa {(s['enable_gqa_ms'] or float('nan')) * 1e3:.1f} us, "
          f"expanded {s['expanded_ms'] * 1e3:.1f} us; "
          f"triton speedup vs best SDPA {decode['speedup_vs_sdpa'] or float('nan'):.2f}x")


def summarize_prefill(prefill: dict) -> None:
    p = prefill["default"]
    if "ms" in p:
        print(f"prefill (default)     {p['ms'] * 1e3:.1f} us, {p['flop_per_s'] / 1e12:.1f} TFLOP/s = "
              f"{p['ratio_to_matmul']:.3f} of matmul; SDPA causal {prefill['sdpa']['ms'] * 1e3:.1f} us "
              f"({prefill['sdpa']['flop_per_s'] / 1e12:.1f} TFLOP/s)")
    else:
        print(f"prefill default FAILED: {p.get('error')}")
    if prefill["best"]:
        pb = prefill["best"]
        print(f"prefill best config   {({k: v for k, v in pb.items() if k in ('block_m', 'block_n', 'num_warps', 'num_stages')})} "
              f"{pb['ms'] * 1e3:.1f} us, {pb['flop_per_s'] / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
