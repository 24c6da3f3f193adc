#!/bin/bash
# The quantized engine at two commits on one GPU, alternated: bench_quant's engine part (3 interleaved passes against
# its own bf16 in each process) run ROUNDS times for each side, alternated: new, old, then old, new, then new, old...
# The old side runs from `git archive OLD engine benchmarks` in OUT/old; each side's tuned choices persist in
# OUT/tuning (ENGINE_TUNING_CACHE, keyed by the kernels' source), so a side tunes in its first process only.
#   bash benchmarks/quant_engine_ab.sh OLD_REV ROUNDS OUT [MODES]     e.g. cfa0046 3 /tmp/ab int4
set -euo pipefail
old=$1 rounds=$2 out=$3 modes=${4:-int4}
mkdir -p "$out/old" "$out/tuning"
git archive "$old" engine benchmarks | tar -x -C "$out/old"
new=$(git rev-parse --short HEAD)
run() {  # name, source root, commit
  echo "# commit $3: BENCH_QUANT_MODES=$modes BENCH_QUANT_PARTS=engine python3 benchmarks/bench_quant.py" \
    > "$out/$1.log"
  PYTHONPATH=$2 ENGINE_TUNING_CACHE="$out/tuning" BENCH_QUANT_MODES=$modes BENCH_QUANT_PARTS=engine \
    python3 "$2/benchmarks/bench_quant.py" --out "$out/$1.json" >> "$out/$1.log" 2>&1
  grep -E 'decode step' "$out/$1.log" | tail -2
}
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then
    run "new$r" . "$new"; run "old$r" "$out/old" "$old"
  else
    run "old$r" "$out/old" "$old"; run "new$r" . "$new"
  fi
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for side in ("old", "new"):
    curves = [json.load(open(f"{out}/{side}{r}.json"))["summary"]["decode_step_speedup_curve"]
              for r in range(1, rounds + 1)]
    for mode in curves[0]:
        cells = {b: sorted(c[mode][b] for c in curves) for b in curves[0][mode]}
        print(side, mode, "decode step over bf16:",
              " / ".join(f"{statistics.median(v):.2f} ({v[0]:.2f}-{v[-1]:.2f})" for v in cells.values()))
PY
