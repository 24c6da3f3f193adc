"""A/B on the GPU: the int4 decode GEMV with the codes as float32 denormals (engine.quant.triton_int4) against
the one of commit 86dadb2 (2^23-offset floats), same tiles and split-K, and bf16 cuBLAS, at 1 row on
llama-3.1-8b's layer shapes. Each round times every config of both kernels (a CUDA graph of the launches
over enough weight copies to overflow L2, as tuning.pick does) and keeps each kernel's best; rounds
interleave (the order alternates), medians and spread are reported. --extra also times more tiles and
pipeline depths of the new kernel and records each one's median.

    PYTHONPATH=. python3 benchmarks/int4_gemv_ab.py ROUNDS OUT.json [--extra] [--prefetch]

--prefetch: the A/B is instead the current kernel against itself with PREFETCH (each step's scale and zero
loaded a step ahead), both on the same tiles (those whose steps lie inside one group; with --extra, both
sides time the extra ones too).

The baseline kernel is read from git (`git show 86dadb2:engine/quant/triton_int4.py`; INT4_GEMV_BASELINE_COMMIT
names another commit, e.g. 6e2718c, the last before the step-major layout), or from the file named by
INT4_GEMV_BASELINE (a checkout without history: write that file on a machine with it, `--write-baseline FILE`).
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from engine.quant import triton_int4 as new  # noqa: E402
from engine.quant.int4 import int4_linear_reference, pack_int4_kernel, quantize_int4  # noqa: E402
from engine.quant.int4_layout import layout_args  # noqa: E402
from engine.quant.triton_int8 import gemv_result, gemv_split_k, num_sms, split_outputs  # noqa: E402
from engine.quant.tuning import _graph_time, weight_copies  # noqa: E402

BASELINE_COMMIT = os.environ.get("INT4_GEMV_BASELINE_COMMIT", "86dadb2")


def baseline_source() -> str:
    """The GEMV kernel (and its jit helpers) of BASELINE_COMMIT's triton_int4.py, as module source."""
    path = os.environ.get("INT4_GEMV_BASELINE")
    if path:
        return Path(path).read_text()
    src = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:engine/quant/triton_int4.py"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    return ("import triton\nimport triton.language as tl\nfrom engine.kernels.pdl import release, wait_for_inputs\n"
            "from engine.quant.triton_int8 import _serial_split_reduce\n\n\n"
            + src[src.index("@triton.jit\ndef _halves"):src.index("@triton.jit\ndef _int4_dot_kernel")])


def baseline_module():
    file = Path(tempfile.mkdtemp(), "int4_gemv_baseline.py")  # triton.jit needs the source in a file
    file.write_text(baseline_source())
    spec = importlib.util.spec_from_file_location("int4_gemv_baseline", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
TILES = sorted({(64, 4, 4), (128, 4, 4), (64, 8, 4), (256, 4, 8), (32, 4, 2), (256, 4, 4), (512, 2, 4), (512, 4, 8)})
# --extra: long contiguous runs of a row per step (128-512 B), and pipeline depths (new kernel only, but with
# --prefetch, where both sides time those of one group a step)
EXTRA = [(32, 32, 4, 3), (64, 16, 4, 3), (128, 8, 4, 3), (32, 16, 2, 3), (256, 8, 8, 3), (128, 4, 4, 2), (128, 4, 4, 4),
         (128, 4, 4, 5), (32, 4, 2, 5), (64, 4, 2, 3), (64, 4, 2, 4), (64, 4, 2, 5), (256, 4, 8, 4)]


def launch(kernel, flags, x, packed, scales, zeros, group, cfg):
    m, k = x.shape
    n = packed.shape[0]
    step = 32 * cfg["chunks"]
    split_k = cfg["split_k"]
    kps = triton.cdiv(triton.cdiv(k, split_k), step) * step
    grid, out, sst, locks, res = split_outputs(x.device, m, n, 1, cfg["block_n"], split_k, cfg["serial"], x.dtype)
    if packed.dim() == 3:  # the current kernels' step-major layout (int4.pack_int4_kernel)
        strides, flags = layout_args(packed)[:2], dict(flags, RUN=packed.shape[2])
    else:  # the baseline's row-major [N, K // 8] words
        strides = (packed.stride(0),)
    kernel[grid](x, packed, scales, zeros, out, res, out if locks is None else locks, n, k, kps, split_k,
                 x.stride(0), *strides, scales.stride(0), sst, out.stride(-2), GROUP=group,
                 BLOCK_N=cfg["block_n"], CHUNKS=cfg["chunks"], ONE_GROUP=group % step == 0, EVEN_K=k % step == 0,
                 SERIAL=locks is not None, STAGES=cfg.get("stages", 3), num_warps=cfg["num_warps"], **flags)
    return res if locks is not None else gemv_result(out, x.dtype)


def configs(n, k, sms, tiles):
    out = []
    for bn, ch, w, st in tiles:
        base = gemv_split_k(1, triton.cdiv(n, bn), triton.cdiv(k, 32 * ch), sms)
        for split in sorted({base, max(1, base // 2), min(16, base * 2)}):
            out.append(dict(block_n=bn, chunks=ch, num_warps=w, split_k=split, serial=split > 1, stages=st))
    return out


def main():
    if "--write-baseline" in sys.argv:
        Path(sys.argv[sys.argv.index("--write-baseline") + 1]).write_text(baseline_source())
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    if "--prefetch" in sys.argv:
        kernels = {"old": (new._int4_gemv_kernel, {}), "new": (new._int4_gemv_kernel, {"PREFETCH": True})}
    else:
        kernels = {"old": (baseline_module()._int4_gemv_kernel, {}), "new": (new._int4_gemv_kernel, {})}
    dev = torch.device("cuda")
    sms = num_sms(dev)
    torch.manual_seed(0)
    res = {"command": "python3 benchmarks/int4_gemv_ab.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "rounds": rounds, "shapes": {}}
    data = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * 0.02
        q, s, z = quantize_int4(w, 128)
        del w
        packed = pack_int4_kernel(q)
        s = s.to(torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = int4_linear_reference(x.float(), q, s.float(), z).float()
        copies = weight_copies(packed.numel() * 4)
        sets = [(x, packed if i == 0 else packed.clone(), s, z) for i in range(copies)]
        kind_sets = {"new": sets, "old": sets}
        if "--prefetch" not in sys.argv:  # the baseline kernel reads the row-major layout of its commit
            kind_sets["old"] = [(x, p.reshape(n, -1).contiguous(), s, z) for _, p, _, _ in sets]
        wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        bsets = [wb if i == 0 else wb.clone() for i in range(weight_copies(wb.numel() * 2))]
        base = [t + (3,) for t in TILES]
        cfgs = {"old": configs(n, k, sms, base), "new": configs(n, k, sms, base + (EXTRA if "--extra" in sys.argv else []))}
        if "--prefetch" in sys.argv:  # PREFETCH needs steps inside one group: both sides time the same such tiles
            cfgs = {kind: [c for c in cfgs["new"] if 128 % (32 * c["chunks"]) == 0] for kind in cfgs}
        errs = {}
        for kind, kern in kernels.items():
            for c in cfgs[kind]:
                out = launch(*kern, *kind_sets[kind][0], 128, c).float()
                errs[(kind, str(c))] = ((out - ref).norm() / ref.norm()).item()
        data[name] = dict(n=n, k=k, sets=kind_sets, bsets=bsets, cfgs=cfgs, x=x, errs=errs,
                          t={"old": [], "new": [], "bf16": []}, best={"old": [], "new": []}, all={})
        print(name, "max rel err old %.2e new %.2e" % (max(v for (kk, _), v in errs.items() if kk == "old"),
                                                        max(v for (kk, _), v in errs.items() if kk == "new")), flush=True)
    for r in range(rounds):
        for name, d in data.items():
            for kind in ("old", "new") if r % 2 == 0 else ("new", "old"):  # interleaved, the order alternating
                kern = kernels[kind]
                times = []
                for c in d["cfgs"][kind]:
                    us = 1e3 * _graph_time(lambda: [launch(*kern, *a, 128, c) for a in d["sets"][kind]],
                                           len(d["sets"][kind]))
                    times.append((us, c))
                    d["all"].setdefault((kind, c["block_n"], c["chunks"], c["num_warps"], c["stages"], c["split_k"]),
                                        []).append(us)
                us, c = min(times, key=lambda t: t[0])
                d["t"][kind].append(us)
                d["best"][kind].append(c)
            d["t"]["bf16"].append(1e3 * _graph_time(lambda: [d["x"] @ wb.t() for wb in d["bsets"]], len(d["bsets"])))
        print("round", r, {n: {k: round(v[-1], 1) for k, v in d["t"].items()} for n, d in data.items()}, flush=True)
    tot = {"old": 0.0, "new": 0.0, "bf16": 0.0}
    for name, d in data.items():
        row = {"N": d["n"], "K": d["k"], "max_rel_err": {kk: max(v for (a, _), v in d["errs"].items() if a == kk)
                                                         for kk in ("old", "new")}}
        for kind in ("old", "new", "bf16"):
            row[f"{kind}_us"] = statistics.median(d["t"][kind])
            row[f"{kind}_us_spread"] = [min(d["t"][kind]), max(d["t"][kind])]
            tot[kind] += row[f"{kind}_us"] * (32 if name != "lm_head" else 1)
        for kind in ("old", "new"):
            row[f"{kind}_best_configs"] = d["best"][kind]
            row[f"{kind}_GBps"] = (d["n"] * d["k"] / 2 + d["n"] * d["k"] / 128 * 3) / row[f"{kind}_us"] / 1e3
        row["new_over_old_speedup"] = row["old_us"] / row["new_us"]
        row["new_vs_bf16"] = row["bf16_us"] / row["new_us"]
        row["old_vs_bf16"] = row["bf16_us"] / row["old_us"]
        res["shapes"][name] = row
        print(f"{name:14s} bf16 {row['bf16_us']:7.1f} old {row['old_us']:7.1f} new {row['new_us']:7.1f} us  "
              f"new/old {row['new_over_old_speedup']:.2f}x  new {row['new_GBps']:.0f} GB/s  vs bf16 {row['new_vs_bf16']:.2f}x",
              flush=True)
    res["decode_step_gemms_us"] = tot
    res["decode_step_gemms_vs_bf16"] = {k: tot["bf16"] / v for k, v in tot.items() if k != "bf16"}
    print("32 layers + LM head, us:", {k: round(v) for k, v in tot.items()}, res["decode_step_gemms_vs_bf16"])
    out = sys.argv[2] if len(sys.argv) > 2 else "int4_gemv_ab.json"
    if "--extra" in sys.argv:  # every config's time per shape and kernel (median over rounds)
        for name, d in data.items():
            for kind in ("old", "new"):
                res["shapes"][name][f"{kind}_all_us"] = {str(c[1:]): statistics.median(v) for c, v in d["all"].items()
                                                         if c[0] == kind}
    json.dump(res, open(out, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
