"""A/B on the GPU: the int8 word GEMV (engine.quant.triton_int8_words) with the codes as float32 denormals
(config denormal=True, one AND a code) against the 2^23-offset floats of its inline-PTX byte permute
(asm=True, a permute and a subtract a code), every tile of WORDS_TILES with the tuner's split-K, and bf16
cuBLAS, at 1 row on llama-3.1-8b's layer shapes. Each round times every config of both variants (a CUDA
graph of the launches over enough weight copies to overflow L2, as tuning.pick does) and keeps each
variant's best; rounds interleave (the order alternates), medians and spread are reported, and the
decode step's GEMMs (32 layers + LM head) summed.

    PYTHONPATH=. python3 benchmarks/int8_gemv_ab.py [ROUNDS] [OUT.json]
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from engine.quant.int8 import int8_linear_reference, quantize_int8  # noqa: E402
from engine.quant.triton_int8 import _launch, num_sms, words_candidates  # noqa: E402
from engine.quant.tuning import _graph_time, weight_copies  # noqa: E402

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
VARIANTS = ("asm", "denormal")


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    out_path = sys.argv[2] if len(sys.argv) > 2 else "int8_gemv_ab.json"
    dev = torch.device("cuda")
    sms = num_sms(dev)
    torch.manual_seed(0)
    res = {"command": "python3 benchmarks/int8_gemv_ab.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rounds": rounds, "shapes": {}}
    data = {}
    for name, (n, k) in SHAPES.items():
        q, s = quantize_int8(torch.randn(n, k, device=dev) * 0.02)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = int8_linear_reference(x.float(), q, s).float()
        cands = words_candidates(1, n, k, sms, asm=True)
        cfgs = {v: [c for c in cands if bool(c.get("denormal")) == (v == "denormal")] for v in VARIANTS}
        errs = {v: max(((_launch(x, q, s, **c).float() - ref).norm() / ref.norm()).item() for c in cfgs[v])
                for v in VARIANTS}
        sets = [(x, q if i == 0 else q.clone(), s) for i in range(weight_copies(q.numel()))]
        wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        bsets = [wb if i == 0 else wb.clone() for i in range(weight_copies(wb.numel() * 2))]
        data[name] = dict(n=n, k=k, cfgs=cfgs, sets=sets, bsets=bsets, x=x, errs=errs,
                          t={v: [] for v in VARIANTS + ("bf16",)}, best={v: [] for v in VARIANTS})
        print(name, "max rel err", {v: f"{e:.2e}" for v, e in errs.items()}, flush=True)
    for r in range(rounds):
        for d in data.values():
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:  # interleaved, the order alternating
                times = [(1e3 * _graph_time(lambda: [_launch(*a, **c) for a in d["sets"]], len(d["sets"])), c)
                         for c in d["cfgs"][v]]
                us, c = min(times, key=lambda t: t[0])
                d["t"][v].append(us)
                d["best"][v].append(c)
            d["t"]["bf16"].append(1e3 * _graph_time(lambda: [d["x"] @ w.t() for w in d["bsets"]], len(d["bsets"])))
        print("round", r, {name: {v: round(t[-1], 1) for v, t in d["t"].items()} for name, d in data.items()},
              flush=True)
    step = {v: 0.0 for v in VARIANTS + ("bf16",)}
    for name, d in data.items():
        row = {"N": d["n"], "K": d["k"], "max_rel_err": d["errs"]}
        for v in VARIANTS + ("bf16",):
            row[f"{v}_us"] = statistics.median(d["t"][v])
            row[f"{v}_us_spread"] = [min(d["t"][v]), max(d["t"][v])]
            step[v] += row[f"{v}_us"] * (1 if name == "lm_head" else 32)
        for v in VARIANTS:
            row[f"{v}_best_configs"] = d["best"][v]
            row[f"{v}_GBps"] = d["n"] * d["k"] / row[f"{v}_us"] / 1e3
        row["denormal_over_asm_speedup"] = row["asm_us"] / row["denormal_us"]
        res["shapes"][name] = row
        print(f"{name:14s} bf16 {row['bf16_us']:7.1f} asm {row['asm_us']:7.1f} denormal {row['denormal_us']:7.1f} us"
              f"  denormal/asm {row['denormal_over_asm_speedup']:.2f}x  denormal {row['denormal_GBps']:.0f} GB/s",
              flush=True)
    res["decode_step_gemms_us"] = step
    res["decode_step_gemms_vs_bf16"] = {v: step["bf16"] / step[v] for v in VARIANTS}
    print("32 layers + LM head, us:", {v: round(t) for v, t in step.items()}, res["decode_step_gemms_vs_bf16"])
    Path(out_path).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
