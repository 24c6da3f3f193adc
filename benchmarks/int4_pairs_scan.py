"""Scan the int4 "pairs" MMA kernel's tiles, pipeline depths and split-K at 16 rows on llama-3.1-8b's projections.

The 16-row decode step's GEMMs run triton_int4_mma's pairs tiles (the weight unpacked in the MMA operand's
registers): unfolded with x permuted and the next step's scale and zero prefetched, or folded. Like
int4_dp4a_scan.py at 1 row, every config of a grid (block_n x warps x stages x split-K, both variants) is timed as
the tuner times a candidate, `rounds` interleaved rounds, against the fastest of the tuner's own candidates for
that shape (every kernel it offers at those rows):

    PYTHONPATH=. python3 benchmarks/int4_pairs_scan.py 3 OUT.json [LAYER...] [--rows 16]
"""
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int4_dp4a_scan import check_layers, scan_layer  # noqa: E402
from ncu_int4_rows import LAYERS  # noqa: E402

from engine.quant.triton_int4 import candidates  # noqa: E402

TILES = ((64, 4), (128, 4), (128, 8), (256, 8))  # (block_n, warps)
STAGES = (2, 3, 4)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
VARIANTS = {"async": dict(fold=False, x_perm=True, prefetch=True), "folded": dict(fold=True)}


def configs(rows: int, k: int) -> list[dict]:
    steps = k // 128
    return [dict(gemv=False, kernel="mma", swap=True, block_m=rows, block_n=bn, block_k=128, split_k=s,
                 num_warps=w, num_stages=st, layout="pairs", asm=True, serial=s > 1, **VARIANTS[v])
            for v, (bn, w), st, s in itertools.product(VARIANTS, TILES, STAGES, SPLITS) if s <= steps // 2]


def key(c: dict) -> str:
    if c.get("kernel") != "mma" or c.get("layout") != "pairs":
        return ",".join(f"{k}={v}" for k, v in c.items())
    v = "async" if not c["fold"] else "folded"
    return f"{v}_m{c['block_m']}_bn{c['block_n']}_w{c['num_warps']}_s{c['num_stages']}_k{c['split_k']}"


def main() -> None:
    args = sys.argv[1:]
    rows = 16
    if "--rows" in args:
        i = args.index("--rows")
        rows = int(args[i + 1])
        del args[i:i + 2]
    rounds, out_path, layers = int(args[0]), args[1], check_layers(args[2:])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"command": " ".join(["python3"] + sys.argv), "device": torch.cuda.get_device_name(0), "rows": rows,
              "layers": {}}
    for name in layers:
        n, k = LAYERS[name]
        tuner = candidates(rows, n, k, 128, sms, asm=True)
        result["layers"][name] = scan_layer(name, rows, configs(rows, k), tuner, rounds, key=key)
        Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
