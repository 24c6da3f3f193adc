"""A/B on the GPU: the engine's batch-1 decode with programmatic dependent launch on and off (ENGINE_PDL=1 / 0,
engine/kernels/pdl.py), per weight mode, llama-3.1-8b with random bf16 weights.

One LLM, re-quantized in place per mode (reconfigure, as bench_quant does); per mode, rounds alternate
the order of the two arms, each arm recapturing the CUDA graphs (reconfigure) and decoding 128 in / 256
out (throughput_targets.decode_batch1: TPOT, and its ratio to the weight-read time), then timing a replay of
the batch-1 graph. Medians and spread per arm; each mode's speed-up over bf16 in the same arm.

    PYTHONPATH=. python3 benchmarks/pdl_engine_ab.py ROUNDS OUT.json [MODES, default none,int8,int4]
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("ENGINE_TUNING_CACHE", "0")

import torch  # noqa: E402

from bench_quant import graph_replay_ms  # noqa: E402
from engine import LLM, EngineConfig  # noqa: E402
from throughput_targets import decode_batch1  # noqa: E402
from workbench.bench import environment, median_spread  # noqa: E402
from workbench.profiling import measure_rates  # noqa: E402

ARMS = {"pdl": "1", "off": "0"}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    out_path = sys.argv[2] if len(sys.argv) > 2 else "pdl_engine_ab.json"
    modes = [None if m == "none" else m for m in (sys.argv[3] if len(sys.argv) > 3 else "none,int8,int4").split(",")]
    t0 = time.perf_counter()
    rates = measure_rates("cuda")
    # few graph sizes (the tuning of each quantized shape runs once per row bucket): batch 1 is what is measured
    base = EngineConfig(max_model_len=4096, max_num_seqs=16, enable_prefix_caching=False, gpu_memory_utilization=0.85)
    llm = LLM.random("llama-3.1-8b", base, dtype=torch.bfloat16, seed=0)
    result = {"command": "PYTHONPATH=. python3 benchmarks/pdl_engine_ab.py " + " ".join(sys.argv[1:]),
              "environment": environment(torch.device("cuda")), "rates": rates, "modes": {}}
    for mode in modes:
        key = mode or "bf16"
        llm.reconfigure(base.replace(quantization=mode))
        acc = {a: {"tpot_s": [], "graph_ms": [], "ratio": []} for a in ARMS}
        for r in range(rounds):
            for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
                os.environ["ENGINE_PDL"] = ARMS[arm]
                llm.reconfigure(llm.config)  # recaptures the CUDA graphs with (or without) PDL
                d = next(iter(decode_batch1(llm, rates, 1, [None]).values()))
                acc[arm]["tpot_s"].append(d["tpot_s"]["median"])
                acc[arm]["ratio"].append(d["ratio"])
                acc[arm]["graph_ms"].append(graph_replay_ms(llm))
                print(f"[{time.perf_counter() - t0:6.1f} s] {key} round {r} {arm}: TPOT "
                      f"{d['tpot_s']['median'] * 1e3:.3f} ms ({d['ratio']:.3f}x the weight read), graph replay "
                      f"{acc[arm]['graph_ms'][-1]:.3f} ms", flush=True)
        row = {a: {k: median_spread(v) for k, v in m.items()} for a, m in acc.items()}
        row["pdl_speedup_tpot"] = row["off"]["tpot_s"]["median"] / row["pdl"]["tpot_s"]["median"]
        row["pdl_speedup_graph"] = row["off"]["graph_ms"]["median"] / row["pdl"]["graph_ms"]["median"]
        result["modes"][key] = row
        print(f"{key}: TPOT off {row['off']['tpot_s']['median'] * 1e3:.3f} / pdl "
              f"{row['pdl']['tpot_s']['median'] * 1e3:.3f} ms: {row['pdl_speedup_tpot']:.3f}x; graph "
              f"{row['pdl_speedup_graph']:.3f}x", flush=True)
    os.environ.pop("ENGINE_PDL")
    bf16 = result["modes"].get("bf16")
    if bf16:
        for key, row in result["modes"].items():
            row["speedup_vs_bf16"] = {a: bf16[a]["tpot_s"]["median"] / row[a]["tpot_s"]["median"] for a in ARMS}
            print(f"{key} vs bf16 at batch 1 (TPOT): {row['speedup_vs_bf16']}", flush=True)
    json.dump(result, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
