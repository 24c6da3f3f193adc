"""A/B on the GPU: decode attention over the engine's KV layout, [blocks, block_size, kv_heads, head_dim] (NHD: a
block's tokens hold all KV heads side by side, so one head of one token is 256 contiguous bytes), against the same
values stored [blocks, kv_heads, block_size, head_dim] (HND: one head of a 16-token block is 4 KB contiguous), which
the kernel reads through strides (a transposed view, no copy). Trace-like cases of bench_attention.py (many
requests, log-normal ragged contexts, shuffled blocks). Each round times every (layout, config) by CUDA-graph
replays; rounds interleave with the order alternating; medians and spread of KV bytes / time against the measured
copy bandwidth. Outputs of the two layouts must agree exactly (same values, same kernel).

    PYTHONPATH=. python3 benchmarks/kv_layout_ab.py ROUNDS OUT.json
"""
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

from bench_attention import (BLOCK_SIZE, DTYPE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALE,  # noqa: E402
                             TRACE_LIKE_CASES, copy_bandwidth)
from engine.kernels.triton_decode import decode_attention  # noqa: E402
from engine.quant.tuning import _graph_time  # noqa: E402

CONFIGS = (("nhd", {}), ("hnd", {}), ("hnd", dict(heads_first=False)), ("nhd", dict(block_n=128, num_warps=4)),
           ("hnd", dict(block_n=128, num_warps=4)), ("hnd", dict(block_n=32, num_warps=2)))


def case(num_seqs, median, sigma, gen):
    lens = torch.exp(torch.randn(num_seqs, generator=torch.Generator().manual_seed(1)) * sigma + math.log(median))
    lens = lens.clamp(16, 2048).to(torch.int64)
    blocks = (lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks, width = int(blocks.sum()), int(blocks.max())
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = torch.zeros(num_seqs, width, dtype=torch.int32, device="cuda")
    starts = torch.cumsum(blocks, 0) - blocks
    for i in range(num_seqs):
        block_tables[i, :blocks[i]] = perm[starts[i]:starts[i] + blocks[i]]
    nhd = [torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
           for _ in range(2)]
    hnd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in nhd]  # same values, heads outside the tokens
    q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * 2
    return dict(lens=lens, block_tables=block_tables, caches={"nhd": nhd, "hnd": hnd}, q=q,
                seq_lens=lens.to(torch.int32).cuda(), kv_bytes=kv_bytes, times={})


def start(script: str):
    """(rounds, output path, generator, copy bandwidth, result dict) of an A/B run as `script ROUNDS OUT.json`."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rounds = int(args[0]) if args else 5
    out_path = args[1] if len(args) > 1 else Path(script).stem + ".json"
    copy_bps = copy_bandwidth()["bytes_per_s"]
    res = {"command": f"python3 benchmarks/{script} " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_bytes_per_s": copy_bps, "rounds": rounds, "cases": []}
    return rounds, out_path, torch.Generator(device="cuda").manual_seed(0), copy_bps, res


def main():
    rounds, out_path, gen, copy_bps, res = start("kv_layout_ab.py")
    cases = []
    for num_seqs, median, sigma in TRACE_LIKE_CASES:
        c = case(num_seqs, median, sigma, gen)
        outs = {}
        for layout, cfg in CONFIGS:
            out = torch.empty_like(c["q"])
            k, v = c["caches"][layout]
            decode_attention(c["q"], k, v, c["block_tables"], c["seq_lens"], out, SCALE, int(c["lens"].max()), **cfg)
            outs[(layout, json.dumps(cfg))] = out
        ref = outs[("nhd", "{}")]
        c["max_abs_diff_hnd"] = max((o.float() - ref.float()).abs().max().item() for (lay, cfg), o in outs.items()
                                    if cfg == "{}")
        c["shape"] = (num_seqs, median, sigma)
        cases.append(c)
        print(f"case {c['shape']}: default config, HND against NHD max |diff| {c['max_abs_diff_hnd']:.3g}", flush=True)
    for r in range(rounds):
        for c in cases:
            out = torch.empty_like(c["q"])
            for layout, cfg in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
                k, v = c["caches"][layout]
                ms = _graph_time(lambda: decode_attention(c["q"], k, v, c["block_tables"], c["seq_lens"], out, SCALE,
                                                          int(c["lens"].max()), **cfg), 1)
                c["times"].setdefault((layout, json.dumps(cfg)), []).append(ms * 1e3)
    for c in cases:
        rows = []
        for (layout, cfg), us in c["times"].items():
            med = statistics.median(us)
            rows.append(dict(layout=layout, config=json.loads(cfg), us=med, spread=[min(us), max(us)],
                             ratio_to_copy_bw=c["kv_bytes"] / (med * 1e-6) / copy_bps))
        base = next(r for r in rows if r["layout"] == "nhd" and not r["config"])
        hnd = next(r for r in rows if r["layout"] == "hnd" and not r["config"])
        res["cases"].append(dict(shape=c["shape"], kv_bytes=c["kv_bytes"], max_abs_diff_hnd=c["max_abs_diff_hnd"],
                                 configs=rows, hnd_over_nhd_speedup=base["us"] / hnd["us"]))
        print(f"case {c['shape']}: " + "; ".join(f"{r['layout']} {r['config'] or 'default'} {r['us']:.1f} us "
                                                  f"({r['ratio_to_copy_bw']:.3f})" for r in rows)
              + f"  => HND/NHD default {base['us'] / hnd['us']:.3f}x", flush=True)
    json.dump(res, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
