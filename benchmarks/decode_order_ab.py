"""A/B on the GPU: decode attention over ragged contexts with the requests in the batch's order (random here, as the
scheduler's arrival order is to their lengths) against the same requests ordered longest context first, so that
the programs of the longest requests start first and the short ones fill in behind them (longest processing time
first) instead of a few long programs running alone at the kernel's end. Same kernel, same inputs permuted by rows
(outputs compared after undoing the permutation). Log-normal contexts as the trace's (sigma 1.0 as its prompts,
0.7 as bench_attention.py's trace-like cases). Each round times every (case, order) by CUDA-graph replays; rounds
interleave with the order alternating; medians and spread.

    PYTHONPATH=. python3 benchmarks/decode_order_ab.py ROUNDS OUT.json
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_attention import SCALE  # noqa: E402
from engine.kernels.triton_decode import decode_attention  # noqa: E402
from engine.quant.tuning import _graph_time  # noqa: E402
from kv_layout_ab import case, start  # noqa: E402

CASES = ((1000, 190, 1.0), (1000, 400, 1.0), (300, 560, 1.0), (1000, 190, 0.7), (256, 72, 0.2))


def main():
    rounds, out_path, gen, copy_bps, res = start("decode_order_ab.py")
    cases = []
    for shape in CASES:
        c = case(*shape, gen)
        k, v = c["caches"]["nhd"]
        del c["caches"]
        max_len = int(c["lens"].max())
        longest_first = torch.argsort(c["lens"], descending=True, stable=True).cuda()
        orders = {"batch": None, "longest_first": longest_first}
        runs = {}
        for name, perm in orders.items():
            q, tables, lens = (c["q"], c["block_tables"], c["seq_lens"]) if perm is None else \
                (c["q"][perm].contiguous(), c["block_tables"][perm].contiguous(), c["seq_lens"][perm].contiguous())
            out = torch.empty_like(q)
            runs[name] = (q, tables, lens, out, perm)
            decode_attention(q, k, v, tables, lens, out, SCALE, max_len)
        ref = runs["batch"][3]
        got = torch.empty_like(ref)
        got[longest_first] = runs["longest_first"][3]
        diff = (got.float() - ref.float()).abs().max().item()
        cases.append(dict(shape=shape, k=k, v=v, runs=runs, max_len=max_len, kv_bytes=c["kv_bytes"], diff=diff,
                          times={}))
        print(f"case {shape}: longest-first against batch order max |diff| {diff:.3g}", flush=True)
    for r in range(rounds):
        for c in cases:
            names = list(c["runs"]) if r % 2 == 0 else list(c["runs"])[::-1]
            for name in names:
                q, tables, lens, out, _ = c["runs"][name]
                ms = _graph_time(lambda: decode_attention(q, c["k"], c["v"], tables, lens, out, SCALE, c["max_len"]), 1)
                c["times"].setdefault(name, []).append(ms * 1e3)
    for c in cases:
        row = dict(shape=c["shape"], kv_bytes=c["kv_bytes"], max_abs_diff=c["diff"])
        for name, us in c["times"].items():
            med = statistics.median(us)
            row[name] = dict(us=med, spread=[min(us), max(us)],
                             ratio_to_copy_bw=c["kv_bytes"] / (med * 1e-6) / copy_bps)
        row["longest_first_speedup"] = row["batch"]["us"] / row["longest_first"]["us"]
        res["cases"].append(row)
        print(f"case {c['shape']}: batch order {row['batch']['us']:.1f} us ({row['batch']['ratio_to_copy_bw']:.3f}), "
              f"longest first {row['longest_first']['us']:.1f} us ({row['longest_first']['ratio_to_copy_bw']:.3f}) "
              f"=> {row['longest_first_speedup']:.3f}x", flush=True)
    json.dump(res, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
