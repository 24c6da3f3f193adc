"""A/B on the GPU: programmatic dependent launch (PDL) and the L2 weight prefetch of the decode GEMVs
(engine/kernels/pdl.py) on a decode step's chain of kernels at batch 1, llama-3.1-8b shapes.

One layer per mode (bf16: the fused GEMVs of engine/kernels/triton_gemv.py; int8: triton_int8_words' GEMV;
int4: triton_int4's GEMV):
    bf16:        gemv(norm) qkv, 2 stand-ins, gemv o, gemv(norm) gate_up, gemv(silu) down
    int8 / int4: add_rms_norm, qkv, 2 stand-ins, o, add_rms_norm, gate_up, silu_and_mul, down
32 layers (each with its own weights) and the LM head make one CUDA graph per variant: "off" (plain
launches), "pdl" (the GEMVs launched with PDL: each waits at its start and lets the next kernel launch
after its main loop) and "pdl+release" (the engine's default: also the norm / SwiGLU kernels between the
GEMVs, and the stand-ins, let the next one launch at their start). The stand-ins are one-row add_rms_norm
launches where the engine runs rotary + KV write and attention: kernel boundaries, not that work. Earlier
variants: releasing at the GEMV's start, and an L2 prefetch of each program's weight rows before its wait
(pdl_ab_h200.json at 7f3db58, pdl_ab_h200_run2.json at baa4299; git checkout baa4299 for that script). Each
GEMV shape gets the tile tuning.pick measures fastest among its GEMV tiles (without PDL). Rounds replay
every variant's graph (the order rotating each round); medians and spread of the milliseconds per replay
are reported, and every variant's outputs must equal the "off" graph's bit for bit.

    PYTHONPATH=. python3 benchmarks/pdl_ab.py ROUNDS OUT.json [MODES, default bf16,int8,int4]
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from engine.kernels.triton_fused import add_rms_norm_triton, silu_and_mul_triton  # noqa: E402
from engine.kernels.triton_gemv import GEMV_TILES, gemv  # noqa: E402
from engine.quant import triton_int4, triton_int8, tuning  # noqa: E402
from engine.quant.int4 import pack_int4_kernel, quantize_int4  # noqa: E402

LAYERS = 32
HIDDEN, INTER, QKV, VOCAB = 4096, 14336, 6144, 128256
# (GEMVs launched with PDL, norm / SwiGLU kernels releasing early)
VARIANTS = {"off": (False, False), "pdl": (True, False), "pdl+release": (True, True)}
REPLAYS = 20


def make_weight(mode, n, k, dev):
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    if mode == "bf16":
        return (w,)
    if mode == "int8":
        scale = w.float().abs().amax(1) / 127
        return (torch.clamp((w.float() / scale[:, None]).round(), -127, 127).to(torch.int8), scale)
    q, s, z = quantize_int4(w.float(), 128)
    return (pack_int4_kernel(q), s.to(torch.bfloat16), z)


def linear(mode, x, weight, cfg, variant, prologue="none", residual=None, norm_w=None):
    """One GEMV launch of `mode` with tile cfg and the variant's PDL flags; bf16 with its fused prologue."""
    flags = dict(pdl=VARIANTS[variant][0])
    if mode == "bf16":
        return gemv(x, weight[0], None, prologue, residual, norm_w, 1e-5, block_n=cfg["block_n"],
                    block_k=cfg["block_k"], num_warps=cfg["num_warps"], **flags)
    if mode == "int8":
        return triton_int8._launch(x, *weight, **cfg, **flags)
    return triton_int4._launch(x, *weight, 128, **cfg, **flags)


def candidates(mode, n, k, sms):
    if mode == "bf16":
        return [dict(block_n=bn, block_k=bk, num_warps=w) for bn, bk, w in GEMV_TILES]
    if mode == "int8":
        return triton_int8.words_candidates(1, n, k, sms)
    cands = [triton_int4.gemv_config(1, n, k, sms, block_n=bn, chunks=ch, num_warps=w, num_stages=st)
             for bn, ch, w, st in triton_int4.GEMV_TILES]
    return triton_int8.split_variants(cands)


def tune(mode, n, k, weight, x, sms, prologue="none", residual=None, norm_w=None):
    copies = lambda: [(x, tuple(t if i == 0 or t.numel() < 1e6 else t.clone() for t in weight))  # noqa: E731
                      for i in range(tuning.weight_copies(weight[0].numel() * weight[0].element_size()))]
    run = lambda c, x, w: linear(mode, x, w, c, "off", prologue, residual, norm_w)  # noqa: E731
    return tuning.pick(("pdl_ab", mode, prologue, n, k), candidates(mode, n, k, sms), run, copies, x.device)


def build(mode, dev, sms):
    """Weights, inputs and tuned tiles of the chain; returns step(variant) -> list of output tensors."""
    torch.manual_seed(0)
    shapes = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    layers = [{name: make_weight(mode, n, k, dev) for name, (n, k) in shapes.items()} for _ in range(LAYERS)]
    head = make_weight(mode, VOCAB, HIDDEN, dev)
    x = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    h = torch.randn(1, 2 * INTER, device=dev, dtype=torch.bfloat16)
    norm_w = torch.rand(HIDDEN, device=dev, dtype=torch.bfloat16) + 0.5
    pro = {"qkv": "norm", "o": "none", "gate_up": "norm", "down": "silu"} if mode == "bf16" else {}
    cfgs = {}
    for name, (n, k) in shapes.items():
        p = pro.get(name, "none")
        cfgs[name] = tune(mode, n, k, layers[0][name], h if p == "silu" else x, sms, p,
                          res if p == "norm" else None, norm_w if p == "norm" else None)
    cfgs["lm_head"] = tune(mode, VOCAB, HIDDEN, head, x, sms)

    def step(variant):
        rel = VARIANTS[variant][1]
        norm = lambda a, r: add_rms_norm_triton(a, r, norm_w, 1e-5, release_early=rel)  # noqa: E731
        outs = []
        for w in layers:
            if mode == "bf16":
                q, r1 = linear(mode, x, w["qkv"], cfgs["qkv"], variant, "norm", res, norm_w)
            else:
                a, r1 = norm(x, res)
                q = linear(mode, a, w["qkv"], cfgs["qkv"], variant)
            s1, _ = norm(q[:, :HIDDEN], None)  # stand-in: rotary + KV write
            s2, _ = norm(s1, None)  # stand-in: attention
            o = linear(mode, s2, w["o"], cfgs["o"], variant)
            if mode == "bf16":
                g, r2 = linear(mode, o, w["gate_up"], cfgs["gate_up"], variant, "norm", r1, norm_w)
                d = linear(mode, h, w["down"], cfgs["down"], variant, "silu")
            else:
                b, r2 = norm(o, r1)
                g = linear(mode, b, w["gate_up"], cfgs["gate_up"], variant)
                d = linear(mode, silu_and_mul_triton(h, release_early=rel), w["down"], cfgs["down"], variant)
            outs += [q, o, g, d]
        outs.append(linear(mode, x, head, cfgs["lm_head"], variant))
        return outs

    return step, cfgs


def capture(step, variant):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(variant)  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = step(variant)
    torch.cuda.current_stream().wait_stream(stream)
    return graph, outs


def replay_ms(graph):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPLAYS


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    out_path = sys.argv[2] if len(sys.argv) > 2 else "pdl_ab.json"
    modes = (sys.argv[3] if len(sys.argv) > 3 else "bf16,int8,int4").split(",")
    dev = torch.device("cuda")
    sms = triton_int8.num_sms(dev)
    result = {"command": "PYTHONPATH=. python3 benchmarks/pdl_ab.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rounds": rounds, "replays_per_round": REPLAYS, "modes": {}}
    for mode in modes:
        t0 = time.time()
        step, cfgs = build(mode, dev, sms)
        graphs, outs = {}, {}
        errors = {}
        for v in VARIANTS:
            try:
                graphs[v], outs[v] = capture(step, v)
            except Exception as exc:  # noqa: BLE001 - a variant that fails to build or capture is reported
                errors[v] = repr(exc)[:500]
                print(mode, v, "failed:", errors[v], flush=True)
        for g in graphs.values():
            g.replay()
        torch.cuda.synchronize()
        equal = {v: all(torch.equal(a, b) for a, b in zip(outs[v], outs["off"])) for v in graphs if "off" in outs}
        times = {v: [] for v in graphs}
        order = list(graphs)
        for r in range(rounds):
            for v in order[r % len(order):] + order[:r % len(order)]:
                times[v].append(replay_ms(graphs[v]))
            print(mode, "round", r, {v: round(t[-1], 4) for v, t in times.items()}, flush=True)
        row = {"tiles": cfgs, "errors": errors, "equal_to_off": equal, "setup_s": time.time() - t0}
        for v, t in times.items():
            row[v] = {"ms_median": statistics.median(t), "ms_min": min(t), "ms_max": max(t), "runs": t}
        if "off" in times:
            for v in times:
                row[v]["speedup_vs_off"] = row["off"]["ms_median"] / row[v]["ms_median"]
        result["modes"][mode] = row
        print(mode, {v: (round(row[v]["ms_median"], 4), round(row[v].get("speedup_vs_off", 0), 3)) for v in times},
              "equal:", equal, flush=True)
        del graphs, outs, step
        torch.cuda.empty_cache()
    json.dump(result, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
