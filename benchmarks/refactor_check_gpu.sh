#!/usr/bin/env bash
# Before/after check of a refactor on one card, one call: the op benchmark on the previous commit's
# package (copied into .devcarry/before, an ignored folder carried to the GPU machine) and on the
# working tree, the same rows, interleaved runs A B A B ... (PAIRS) so the spread between the A runs is the noise.
#   git archive <commit> fx_passes benchmarks | tar -x -C .devcarry/before
set -uo pipefail
ROWS=${ROWS:---T 1,64,256,4096 --rank 16 --adapters 1,4 --variants base,ours --rounds 2 --no-inductor}
run() {   # $1: tag, $2: tree
  mkdir -p "$OUT/$1"
  if [ -f "$2/benchmarks/__init__.py" ]; then
    (cd "$2" && PYTHONPATH="$PWD" OUT="$OUT/$1" timeout ${RUN_S:-100} python3 -m benchmarks.bench_qkvz_lora $ROWS) > "$OUT/$1.log" 2>&1
  else
    (cd "$2" && PYTHONPATH="$PWD" OUT="$OUT/$1" timeout ${RUN_S:-100} python3 benchmarks/bench_qkvz_lora.py $ROWS) > "$OUT/$1.log" 2>&1
  fi
  echo "== $1: $(grep -c '^[0-9A-Za-z-]* *[0-9]' "$OUT/$1.log") lines"
}
PYTHONPATH="$PWD" python3 -c "
import torch, fx_passes.ops.tuning as t
print(t.tuning_for(t.device_info(torch.device('cuda'))).source, t.device_info(torch.device('cuda')))"
# optional: random configurations of tests/property_check.py on the host's cores, before the timings
if [ -n "${PROPERTY_SEEDS:-}" ]; then
  set -- $PROPERTY_SEEDS   # first seed, count
  PYTHONPATH="$PWD" timeout ${PROPERTY_S:-170} python3 tests/property_check.py --seed "$1" --many "$2" \
    --jobs $(( $(nproc) - 1 )) --json "$OUT/property_$1.json" > "$OUT/property_$1.log" 2>&1
  echo "== property: $(grep -c '^seed' "$OUT/property_$1.log") configurations"
fi
for i in $(seq 1 "${PAIRS:-2}"); do
  run "before_$i" .devcarry/before
  run "after_$i" .
done
