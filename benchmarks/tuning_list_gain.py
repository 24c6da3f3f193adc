"""What a longer candidate list gained, within one run: for each tuning key of bench_quant's kernels part, the best
candidate the new list's run timed against the best of those candidates the old list also holds (timed in the same
tuning, so no run-to-run noise enters the ratio), beside the best the old list's own run found.

    python3 benchmarks/tuning_list_gain.py NEW.json OLD.json

NEW.json and OLD.json are `bench_quant.py` outputs of the kernels part at two commits (their `candidates_us`).
data/benchmarks/quant_kernels_int8_fp8_waves_{new,old}_h100.json: the whole-wave splits of af240c9 against 75dc26c.
"""
from __future__ import annotations

import json
import math
import sys


def _timed(candidates: list) -> list[tuple[float, str]]:
    return [(t, json.dumps(c, sort_keys=True)) for c, t in candidates if math.isfinite(t)]


def main(new_path: str, old_path: str) -> None:
    new, old = (json.load(open(p))["kernels"] for p in (new_path, old_path))
    for shape, layer in new.items():
        old_keys = old.get(shape, {}).get("tuning", {})
        for key, entry in layer.get("tuning", {}).items():  # the step's totals have none
            old_timed = _timed(old_keys[key]["candidates_us"]) if key in old_keys else []
            timed = _timed(entry["candidates_us"])
            old_list = {c for _, c in old_timed}
            in_both = [t for t, c in timed if c in old_list]
            if not (timed and in_both):  # a key only one side tuned, or whose candidates all failed
                continue
            best, best_cfg = min(timed)
            kind, rows = key.strip("()").split(", ")[:2]
            print(f"{shape:12s} {kind.strip(chr(39)):8s} {rows:>4s} rows: {len(timed)} candidates timed "
                  f"({len(old_list)} before), best {best:7.1f} us, best of the old list {min(in_both):7.1f} us in "
                  f"the same tuning (x{min(in_both) / best:.3f}), the old run's best {min(old_timed)[0]:7.1f} us; "
                  f"{best_cfg}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
