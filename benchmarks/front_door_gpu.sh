#!/usr/bin/env bash
# The front door on the GPU machine: tests/user_compile_script.py (a user's script, no `import fx_passes`)
# in bf16 on CUDA, the cases below, twice on one Inductor cache dir (cold, then warm). Prints a CASE line per case and a RESULTS line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
# max-autotune modes are left out here: their GPU autotuning of every GEMM of the model runs for minutes
# (the CPU tests cover them); FRONT_DOOR_CASES overrides the list.
CASES=${FRONT_DOOR_CASES:-'[{"name":"default"},{"name":"reduce-overhead","kwargs":{"mode":"reduce-overhead"}},
{"name":"options","kwargs":{"options":{"triton.cudagraphs":true,"epilogue_fusion":false}}},
{"name":"dynamic-fullgraph","kwargs":{"dynamic":true,"fullgraph":true}},{"name":"user-post-pass","user_pass":true}]'}
for run in cold warm; do
  echo "== $run"
  timeout 240 python tests/user_compile_script.py "$CASES" --cuda > "$TORCHINDUCTOR_CACHE_DIR/$run.log" 2>&1 \
    && grep -E "^RESULTS|^CASE " "$TORCHINDUCTOR_CACHE_DIR/$run.log" || tail -40 "$TORCHINDUCTOR_CACHE_DIR/$run.log"
done
