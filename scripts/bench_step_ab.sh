#!/usr/bin/env bash
# Our DMDR step before and after a change, measured in one run: alternate `dmdr-fast bench step`
# between two installs (two Python interpreters / virtualenvs) ROUNDS times, so that drifting
# machine load hits both alike, and print the median of each side's per-cycle time and their ratio.
#   bash scripts/bench_step_ab.sh OLD_PYTHON NEW_PYTHON [ROUNDS] [bench step args...]
# e.g. bash scripts/bench_step_ab.sh /venvs/old/bin/python .venv/bin/python 5 --cycles 5 --warmup 2
set -euo pipefail
old="$1"; new="$2"; rounds="${3:-5}"; shift $(( $# >= 3 ? 3 : $# ))
tmp="$(mktemp -d)"
for i in $(seq 1 "$rounds"); do
  for side in old new; do
    py="$old"; [ "$side" = new ] && py="$new"
    "$py" -m dmdr_fast.cli bench step --json "$tmp/$side-$i.json" "$@" > /dev/null
  done
done
python3 - "$tmp" "$rounds" <<'PY'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for side in ("old", "new"):
    runs = [json.load(open(f"{tmp}/{side}-{i}.json")) for i in range(1, rounds + 1)]
    med[side] = {k: statistics.median(r["median_ms"][k] for r in runs) for k in ("ours_cycle", "ours_gen", "paper_cycle")}
    print(f"{side}: ours cycle {med[side]['ours_cycle']:.1f} ms, gen-iter {med[side]['ours_gen']:.1f} ms, "
          f"paper cycle {med[side]['paper_cycle']:.1f} ms  (median of {rounds} runs)")
print(f"new/old per cycle: x{med['new']['ours_cycle'] / med['old']['ours_cycle']:.3f} (below 1 = faster); "
      f"gen-iter x{med['new']['ours_gen'] / med['old']['ours_gen']:.3f}")
PY
