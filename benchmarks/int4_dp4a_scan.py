"""Scan the int4 dp4a GEMV's tiles, pipeline depths and split-K at 1 row on llama-3.1-8b's projections (CUDA).

For each layer every (block_n, warps) of TILES x STAGES x SPLITS is timed as the tuner times a candidate
(engine.quant.tuning: CUDA-graph replays over enough copies of the weights to overflow L2, so that they stream from
DRAM as in a decode step), `rounds` interleaved rounds. It prints each layer's fastest configs, the tuner's own
candidates (dp4a_candidates) marked, and the fastest of those, so that a better tile shows as a ratio against what
the engine can pick today:

    PYTHONPATH=. python3 benchmarks/int4_dp4a_scan.py 3 OUT.json [LAYER...]
"""
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ncu_int4_rows import LAYERS, _setup  # noqa: E402

from engine.quant import tuning  # noqa: E402
from engine.quant.int4 import KERNEL_CHUNK  # noqa: E402
from engine.quant.triton_int4 import _launch  # noqa: E402
from engine.quant.triton_int4_dp4a import dp4a_candidates  # noqa: E402

TILES = ((64, 2), (64, 4), (128, 4), (256, 8))  # (block_n, warps)
STAGES = (2, 3, 4, 6)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 28)


def configs(n: int, k: int, sms: int) -> list[dict]:
    steps = k // (4 * KERNEL_CHUNK)  # (the scan's steps are 4 chunks, one group of 128)
    return [dict(kernel="dp4a", block_n=bn, chunks=4, num_warps=w, num_stages=st, split_k=s, serial=s > 1)
            for (bn, w), st, s in itertools.product(TILES, STAGES, SPLITS) if s <= steps // 2 or s == 1]


def key(c: dict) -> str:
    return f"bn{c['block_n']}_w{c['num_warps']}_s{c['num_stages']}_k{c['split_k']}"


def check_layers(names: list[str]) -> list[str]:
    """The layers named on the command line (all of LAYERS when none), or exit naming the allowed ones."""
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        sys.exit(f"layer {unknown[0]!r}: choose from {', '.join(LAYERS)}")
    return names or list(LAYERS)


def scan_layer(name: str, rows: int, cands: list[dict], tuner: list[dict], rounds: int, key=key) -> dict:
    """Every config of cands (the tuner's own added) on layer `name` at `rows` rows, `rounds` interleaved
    rounds timed as the tuner times; prints the fastest against the tuner's best and returns the layer's entry."""
    tuner_keys = [key(c) for c in tuner]
    cands = list({key(c): c for c in cands + tuner}.values())  # each config once
    _, layer, x = _setup(rows, name)
    copies = tuning.weight_copies(layer.packed.numel() * 4)
    packs = [layer.packed] + [layer.packed.clone() for _ in range(copies - 1)]
    times = {key(c): [] for c in cands}
    for _ in range(rounds):
        for c in cands:
            launches = lambda c=c: [_launch(x, p, layer.scales, layer.zeros, layer.group_size, **c)  # noqa: E731
                                    for p in packs]
            try:
                times[key(c)].append(1e3 * tuning._graph_time(launches, len(packs)))
            except Exception as e:  # noqa: BLE001 - a config this GPU cannot build: recorded as such
                print(f"  {key(c)}: {type(e).__name__}: {str(e)[:120]}")
                times[key(c)].append(float("inf"))
    med = {kk: sorted(t)[len(t) // 2] for kk, t in times.items()}
    best_tuner = min(tuner_keys, key=med.get)
    gbytes = sum(t.numel() * t.element_size() for t in (layer.packed, layer.scales, layer.zeros)) / 1e9
    print(f"{name} at {rows} rows: tuner's best {best_tuner} {med[best_tuner]:.2f} us "
          f"({gbytes / med[best_tuner] * 1e3:.2f} TB/s)")
    for kk in sorted(med, key=med.get)[:8]:
        t = sorted(times[kk])
        print(f"  {kk:40s} {med[kk]:7.2f} us ({t[0]:.2f}-{t[-1]:.2f})  {med[best_tuner] / med[kk]:.3f}x"
              f"{'  (tuner)' if kk in tuner_keys else ''}")
    return {"us": times, "tuner": tuner_keys, "best_tuner": best_tuner}


def main() -> None:
    rounds, out_path = int(sys.argv[1]), sys.argv[2]
    layers = check_layers(sys.argv[3:])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"command": " ".join(["python3"] + sys.argv), "device": torch.cuda.get_device_name(0), "layers": {}}
    for name in layers:
        n, k = LAYERS[name]
        result["layers"][name] = scan_layer(name, 1, configs(n, k, sms), dp4a_candidates(1, n, k, 128, sms), rounds)
        Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
