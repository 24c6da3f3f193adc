"""Probe on the GPU: is the int4 decode GEMV bound by its memory access pattern or by its arithmetic?

The GEMV (engine.quant.triton_int4) reads, per step, 16 words (64 B) of each of BLOCK_N rows that lie K/2 bytes
apart (a step stays inside one group of 128 features). This times, at 1 row on llama-3.1-8b's large layers:
  load_rows   the same tiles with no arithmetic (the words XOR-ed together): the pattern's bandwidth alone;
  load_tiled  the same bytes with each step's [BLOCK_N, 16] tile contiguous in memory (a layout prepared at load
              time: [N / BLOCK_N, K / 128, BLOCK_N, 16] words);
  gemv_rows   the engine's GEMV (PREFETCH, the tuner's usual 128 x 4 tile) on the engine's layout: row-strided
              when this was first run (int4_layout_probe_h200.json, commit 026972f), step-major since (each step's
              rows contiguous, int4.pack_int4_kernel);
  gemv_tiled  the GEMV without split-K reading the tiled layout (checked against the dequantize-then-matmul
              reference).
Each round times every variant (a CUDA graph over enough weight copies to overflow L2, as tuning.pick does);
rounds interleave with the order alternating; medians and spread are reported.

    PYTHONPATH=. python3 benchmarks/int4_layout_probe.py ROUNDS OUT.json
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from engine.quant.int4 import int4_linear_reference, pack_int4_kernel, quantize_int4  # noqa: E402
from engine.quant.triton_int4 import DENORMAL_E, _denormal_term, _launch, _next_group_params  # noqa: E402
from engine.quant.tuning import _graph_time, weight_copies  # noqa: E402

SHAPES = {"gate_up_proj": (28672, 4096), "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
STEP_WORDS = 16  # one group of 128 features


@triton.jit
def _load_probe(w_ptr, out_ptr, n_steps, stride_wn, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                TILED: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    steps = n_steps // tl.num_programs(1)
    rows = tl.arange(0, BLOCK_N)
    words = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
    for s in tl.range(pid_k * steps, (pid_k + 1) * steps, num_stages=STAGES):
        if TILED:
            base = w_ptr + (pid_n.to(tl.int64) * n_steps + s) * (BLOCK_N * WORDS)
            ptrs = base + rows[:, None] * WORDS + words[None, :]
        else:
            ptrs = w_ptr + (pid_n * BLOCK_N + rows).to(tl.int64)[:, None] * stride_wn + s * WORDS + words[None, :]
        acc ^= tl.load(ptrs)
    tl.store(out_ptr + pid_k.to(tl.int64) * tl.num_programs(0) * BLOCK_N + pid_n * BLOCK_N + rows, tl.sum(acc, 1))


@triton.jit
def _gemv_tiled(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, n_steps, stride_sn,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """The engine's GEMV at CHUNKS=4 (one group a step), PREFETCH, no split-K, reading the tiled layout."""
    WORDS: tl.constexpr = 16
    E: tl.constexpr = DENORMAL_E
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, WORDS)
    col_k = 32 * (offs_w // 4) + offs_w % 4
    tile = w_ptr + pid_n.to(tl.int64) * n_steps * (BLOCK_N * WORDS) + tl.arange(0, BLOCK_N)[:, None] * WORDS \
        + offs_w[None, :]
    s_rows = offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, 0, K, GROUP)
    for s in tl.range(0, n_steps, num_stages=STAGES):
        k0 = s * 128
        kc = k0 + col_k
        w = tl.load(tile + s * (BLOCK_N * WORDS))
        scale, zero = s_next.to(tl.float32)[:, None], z_next.to(tl.float32)[:, None]
        s_next, z_next = _next_group_params(s_ptr, z_ptr, s_rows, mask_n, k0 + 128, K, GROUP)
        w8 = w >> 8
        part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        x_sum = tl.zeros([WORDS], dtype=tl.float32)
        for i in tl.static_range(8):
            xk = tl.max_contiguous(tl.multiple_of(kc + 4 * i, 4), 4)
            x = tl.load(x_ptr + xk).to(tl.float32)
            x_sum += x
            part += _denormal_term(w, w8, x, i, E)
        acc += (part - zero * (x_sum * (2.0 ** (E - 149)))[None, :]) * scale
    out = tl.sum(acc, 1) * (2.0 ** (149 - E))
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


def tiled(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """[N, K/8] words -> [N / block_n, K / 128, block_n, 16]: each program's step tile contiguous."""
    n, kw = packed.shape
    return packed.view(n // block_n, block_n, kw // STEP_WORDS, STEP_WORDS).transpose(1, 2).contiguous()


def make_variants(n, k, x, s, z, rows, engine, tiles):
    """name -> (fn, calls): each fn launches one variant over every weight copy."""
    n_steps = k // 128
    out = torch.empty(n * 4, device=x.device, dtype=torch.int32)
    y = torch.empty(1, n, device=x.device, dtype=torch.bfloat16)
    variants = {}
    for bn, split in ((128, 1), (64, 1), (128, 2)):
        for kind in ("rows", "tiled"):
            ws = rows if kind == "rows" else tiles[bn]

            def run(ws=ws, bn=bn, split=split, t=kind == "tiled"):
                for p in ws:
                    _load_probe[(n // bn, split)](p, out, n_steps, k // 8, BLOCK_N=bn, WORDS=STEP_WORDS,
                                                  TILED=t, STAGES=3, num_warps=4 if bn == 128 else 2)
            variants[f"load_{kind}_{bn}x{split}"] = (run, len(ws))
    for split in (1, 2, 4):
        cfg = dict(gemv=True, block_n=128, chunks=4, split_k=split, num_warps=4, serial=split > 1, prefetch=True)
        variants[f"gemv_rows_128x{split}"] = (lambda cfg=cfg: [_launch(x, p, s, z, 128, **cfg) for p in engine],
                                              len(engine))
    for bn in (64, 128):
        def gemv_t(bn=bn):
            for p in tiles[bn]:
                _gemv_tiled[(n // bn,)](x, p, s, z, y, n, k, n_steps, s.stride(0), GROUP=128, BLOCK_N=bn,
                                        STAGES=3, num_warps=4 if bn == 128 else 2)
            return y
        variants[f"gemv_tiled_{bn}"] = (gemv_t, len(tiles[bn]))
    return variants


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = {"command": "PYTHONPATH=. python3 benchmarks/int4_layout_probe.py " + " ".join(sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rounds": rounds, "shapes": {}}
    cases = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev) * 0.02
        q, s, z = quantize_int4(w, 128)
        del w
        packed = pack_int4_kernel(q)
        words = packed.reshape(n, -1).contiguous()  # row-major [N, K // 8]: the load probes' "rows" layout
        s = s.to(torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = int4_linear_reference(x.float(), q, s.float(), z).float()
        copies = weight_copies(packed.numel() * 4)
        rows = [words] + [words.clone() for _ in range(copies - 1)]
        engine = [packed] + [packed.clone() for _ in range(copies - 1)]
        tiles = {bn: [tiled(p, bn) for p in rows] for bn in (64, 128)}
        variants = make_variants(n, k, x, s, z, rows, engine, tiles)
        errs = {}
        for key, (fn, _) in variants.items():
            if key.startswith("gemv"):
                got = fn()[-1] if key.startswith("gemv_rows") else fn()
                errs[key] = ((got.float() - ref).norm() / ref.norm()).item()
        print(name, "rel err", {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)
        cases[name] = dict(n=n, k=k, variants=variants, errs=errs, t={key: [] for key in variants})
    for r in range(rounds):
        for name, c in cases.items():
            keys = list(c["variants"])
            for key in keys if r % 2 == 0 else keys[::-1]:
                fn, calls = c["variants"][key]
                c["t"][key].append(1e3 * _graph_time(fn, calls))
        print("round", r, {n: {k: round(v[-1], 1) for k, v in c["t"].items()} for n, c in cases.items()}, flush=True)
    for name, c in cases.items():
        nbytes = c["n"] * c["k"] / 2
        row = {"N": c["n"], "K": c["k"], "rel_err": c["errs"], "us": {}, "us_spread": {}, "TBps": {}}
        for key, ts in c["t"].items():
            row["us"][key] = statistics.median(ts)
            row["us_spread"][key] = [min(ts), max(ts)]
            row["TBps"][key] = nbytes / row["us"][key] / 1e6
        res["shapes"][name] = row
        print(name, "  ".join(f"{k} {row['us'][k]:.1f}us {row['TBps'][k]:.2f}TB/s" for k in row["us"]), flush=True)
    json.dump(res, open(sys.argv[2] if len(sys.argv) > 2 else "int4_layout_probe.json", "w"), indent=1)


if __name__ == "__main__":
    main()
