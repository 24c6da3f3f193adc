#!/bin/bash
# Quantized decode at two commits on one GPU: bench_quant's engine part (3 interleaved passes against its own bf16 in
# each process; PART=kernels: its kernels part, 5 rounds against cuBLAS bf16) run ROUNDS times for each side,
# alternated: new, old, then old, new, then new, old...
# The old side runs from `git archive OLD engine benchmarks` in OUT/old (a tree already there is used as it is: a copy
# without .git, e.g. the device machine's, gets one made beforehand; one this script made must be OLD's). Each
# side's tuned choices persist in OUT/tuning (ENGINE_TUNING_CACHE, keyed by the kernels' source), so a side tunes in
# its first process only.
#   bash benchmarks/quant_engine_ab.sh OLD_REV ROUNDS OUT [MODES] [PART]     e.g. cfa0046 3 /tmp/ab int4
#   bash benchmarks/quant_engine_ab.sh 75dc26c 3 /tmp/ab int8,fp8 kernels    (BENCH_QUANT_ROWS passes through)
# FIRST=2 starts at round 2 over an OUT that holds round 1's files (an A/B split over two device calls).
set -euo pipefail
old=$1 rounds=$2 out=$3 modes=${4:-int4} part=${5:-engine}
first=${FIRST:-1}
if ! [[ $first =~ ^[0-9]+$ ]] || [ "$first" -lt 1 ] || [ "$first" -gt "$rounds" ]; then
  echo "FIRST must be a round from 1 to ROUNDS ($rounds), not '$first'" >&2; exit 2
fi
case $part in
  engine) select=BENCH_QUANT_MODES ;;
  kernels) select=BENCH_QUANT_KINDS ;;
  *) echo "PART must be engine or kernels, not '$part'" >&2; exit 2 ;;
esac
mkdir -p "$out/old" "$out/tuning"
if [ ! -d "$out/old/engine" ]; then
  git archive "$old" engine benchmarks | tar -x -C "$out/old" && echo "$old" > "$out/old/REVISION"
elif [ -f "$out/old/REVISION" ] && [ "$(cat "$out/old/REVISION")" != "$old" ]; then
  echo "$out/old holds $(cat "$out/old/REVISION"), not $old: use another OUT or remove $out/old" >&2; exit 2
fi
new=$(git rev-parse --short HEAD 2>/dev/null || echo HEAD)
run() {  # name, source root, commit
  echo "# commit $3: $select=$modes BENCH_QUANT_PARTS=$part python3 benchmarks/bench_quant.py" > "$out/$1.log"
  env PYTHONPATH="$2" ENGINE_TUNING_CACHE="$out/tuning" "$select=$modes" BENCH_QUANT_PARTS="$part" \
    python3 "$2/benchmarks/bench_quant.py" --out "$out/$1.json" >> "$out/$1.log" 2>&1
  grep -E 'decode step|decode-step' "$out/$1.log" | tail -2
}
for r in $(seq "$first" "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then
    run "new$r" . "$new"; run "old$r" "$out/old" "$old"
  else
    run "old$r" "$out/old" "$old"; run "new$r" . "$new"
  fi
done
python3 - "$out" "$rounds" "$part" <<'PY'
import json, statistics, sys
out, rounds, part = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def curve(path):  # {mode: {rows: step speed-up over bf16}}
    data = json.load(open(path))
    if part == "engine":
        return data["summary"]["decode_step_speedup_curve"]
    step, by_mode = data["kernels"]["decode_step_gemms"], {}
    for key, value in step.items():
        if key.endswith("_speedup"):
            mode, rows = key[:-len("_speedup")].rsplit("_m", 1)
            by_mode.setdefault(mode, {})[rows] = value
    return by_mode


for side in ("old", "new"):
    curves = [curve(f"{out}/{side}{r}.json") for r in range(1, rounds + 1)]
    for mode in curves[0]:
        cells = {b: sorted(c[mode][b] for c in curves) for b in curves[0][mode]}
        print(side, mode, "decode step" if part == "engine" else "decode-step GEMMs", "over bf16 at",
              " / ".join(cells), "rows:" if part == "kernels" else "requests:",
              " / ".join(f"{statistics.median(v):.2f} ({v[0]:.2f}-{v[-1]:.2f})" for v in cells.values()))
PY
