"""A/B on the GPU: the int4 decode GEMV in packed half2 math (engine.quant.triton_int4_h2, h2=True) against
the float32 GEMV (same tiles and split-K, h2=False) and bf16 cuBLAS, at 1 and 2 rows on llama-3.1-8b's layer
shapes, bf16 x. Each round times every GEMV candidate of `candidates()` in both kernels (a CUDA graph of the
launches over enough weight copies to overflow L2, as tuning.pick does) and keeps each kernel's best;
rounds interleave (the order alternates); medians and spread (min, max) are reported, with the error of
each kernel against the float32 dequantize-then-matmul reference.

    PYTHONPATH=. python3 benchmarks/int4_h2_ab.py ROUNDS OUT.json
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from engine.quant.int4 import int4_linear_reference, pack_int4_kernel, quantize_int4  # noqa: E402
from engine.quant.triton_int4 import _launch, candidates  # noqa: E402
from engine.quant.triton_int8 import num_sms  # noqa: E402
from engine.quant.tuning import _graph_time, weight_copies  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
KINDS = ("fp32", "h2")


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    out_path = sys.argv[2] if len(sys.argv) > 2 else "int4_h2_ab.json"
    dev = torch.device("cuda")
    sms = num_sms(dev)
    torch.manual_seed(0)
    res = {"command": "python3 benchmarks/int4_h2_ab.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rounds": rounds, "shapes": {}}
    data = {}
    for name, (n, k) in SHAPES.items():
        q, s, z = quantize_int4(torch.randn(n, k, device=dev) * 0.02, 128)
        packed, s = pack_int4_kernel(q), s.to(torch.bfloat16)
        sets = [packed if i == 0 else packed.clone() for i in range(weight_copies(packed.numel() * 4))]
        wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        bsets = [wb if i == 0 else wb.clone() for i in range(weight_copies(wb.numel() * 2))]
        for m in (1, 2):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = int4_linear_reference(x.float(), q, s.float(), z).float()
            gemv = [c for c in candidates(m, n, k, 128, sms, asm=True) if c.get("gemv")]
            cfgs = {"fp32": [c for c in gemv if not c.get("h2")], "h2": [c for c in gemv if c.get("h2")]}
            errs = {kind: max(((_launch(x, packed, s, z, 128, **c).float() - ref).norm() / ref.norm()).item()
                              for c in cfgs[kind]) for kind in KINDS}
            data[(name, m)] = dict(n=n, k=k, x=x, s=s, z=z, sets=sets, bsets=bsets, cfgs=cfgs, errs=errs,
                                   t={"fp32": [], "h2": [], "bf16": []}, best={"fp32": [], "h2": []})
            print(name, m, "candidates", {kk: len(v) for kk, v in cfgs.items()}, "max rel err",
                  {kk: f"{v:.1e}" for kk, v in errs.items()}, flush=True)
        del q
    for r in range(rounds):
        for d in data.values():
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                times = [(1e3 * _graph_time(lambda: [_launch(d["x"], p, d["s"], d["z"], 128, **c) for p in d["sets"]],
                                            len(d["sets"])), c) for c in d["cfgs"][kind]]
                us, c = min(times, key=lambda t: t[0])
                d["t"][kind].append(us)
                d["best"][kind].append(c)
            d["t"]["bf16"].append(1e3 * _graph_time(lambda: [d["x"] @ w.t() for w in d["bsets"]], len(d["bsets"])))
        print("round", r, {f"{n}/{m}": {k: round(v[-1], 1) for k, v in d["t"].items()} for (n, m), d in data.items()},
              flush=True)
    totals = {}
    for (name, m), d in data.items():
        row = {"rows": m, "N": d["n"], "K": d["k"], "max_rel_err": d["errs"]}
        wbytes = d["n"] * d["k"] / 2 + d["n"] * d["k"] / 128 * 3  # codes + bf16 scale + uint8 zero a group
        for kind in ("fp32", "h2", "bf16"):
            row[f"{kind}_us"] = statistics.median(d["t"][kind])
            row[f"{kind}_us_spread"] = [min(d["t"][kind]), max(d["t"][kind])]
            tot = totals.setdefault(m, dict.fromkeys(("fp32", "h2", "bf16"), 0.0))
            tot[kind] += row[f"{kind}_us"] * (32 if name != "lm_head" else 1)
        for kind in KINDS:
            row[f"{kind}_best_configs"] = d["best"][kind]
            row[f"{kind}_GBps"] = wbytes / row[f"{kind}_us"] / 1e3
            row[f"{kind}_vs_bf16"] = row["bf16_us"] / row[f"{kind}_us"]
        row["h2_over_fp32_speedup"] = row["fp32_us"] / row["h2_us"]
        res["shapes"][f"{name}/{m}"] = row
        print(f"{name:14s} m={m} bf16 {row['bf16_us']:7.1f} fp32 {row['fp32_us']:7.1f} h2 {row['h2_us']:7.1f} us  "
              f"h2/fp32 {row['h2_over_fp32_speedup']:.2f}x  h2 {row['h2_GBps']:.0f} GB/s  "
              f"vs bf16 {row['h2_vs_bf16']:.2f}x (fp32 {row['fp32_vs_bf16']:.2f}x)", flush=True)
    res["decode_step_gemms_us"] = totals
    res["decode_step_gemms_vs_bf16"] = {m: {k: t["bf16"] / t[k] for k in KINDS} for m, t in totals.items()}
    print("32 layers + LM head, us:", totals, res["decode_step_gemms_vs_bf16"])
    json.dump(res, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
