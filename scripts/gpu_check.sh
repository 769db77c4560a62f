#!/usr/bin/env bash
# The CUDA path's evidence in one run (issue 9), for a GPU machine with torch preinstalled and no
# network. Installs nothing: kvflow runs from this tree through PYTHONPATH.
#
#   scripts/gpu_check.sh OUT_DIR              # on a GPU: ~6 minutes, JSON per stage in OUT_DIR
#   scripts/gpu_check.sh OUT_DIR --device cpu # smoke mode: tiny shapes, checks the script on a CPU
#
# Stages (each its own process under `timeout`; a failure is logged and the next stage still runs):
#   env        versions, GPU name                              -> env.json
#   tests      Triton kernel tests compiled for the GPU,
#              dummy-load tests                                -> tests.xml, tests.log
#   equality   greedy tokens = transformers (float32), prompt
#              logprobs within transformers' own bf16 error    -> equality.json
#   bandwidth  copy bandwidth and bf16 matmul peak             -> bandwidth.json
#   decode1    batch-1 decode, dummy Llama-3.1-8B, bf16        -> decode1.json
#   batch      64 x (512 in, 256 out), same model              -> batch.json
#   prefill    8k-token prompt TTFT                            -> prefill.json
#   profile    decode steps at batch 1, 64, 256 under the profiler:
#              host vs device time, top kernels, matmul rate  -> profile.json
#   hf         transformers' generate on the same shapes       -> hf.json
#   summarize  roofline fractions and ratios                   -> summary.json
# stages.jsonl lists every stage's exit code and seconds (124 = timed out).
set -u
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--device cpu]}
shift
DEVICE=cuda
SMOKE=()
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device needs a value}; shift 2; fi
if [ "$DEVICE" = "cpu" ]; then SMOKE=(--smoke); fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false
export KVFLOW_CACHE="$OUT/.cache" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/.triton}"
if [ "$DEVICE" != "cpu" ]; then unset TRITON_INTERPRET; fi
cd "$ROOT"
: > "$OUT/stages.jsonl"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '{"stage": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/stages.jsonl"
  if [ "$rc" -ne 0 ]; then echo "   FAILED rc=$rc, last lines of $OUT/$name.log:"; tail -n 15 "$OUT/$name.log" | sed 's/^/   /'; fi
}
bench() {  # bench NAME SECONDS [extra args]
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" "$PY" scripts/gpu_bench.py "$name" --out "$OUT/$name.json" --device "$DEVICE" ${SMOKE[@]+"${SMOKE[@]}"} "$@"
}

T0=$(date +%s)
bench env 30
stage tests 120 "$PY" -m pytest tests/test_triton_kernels.py tests/test_dummy_load.py -q -p no:cacheprovider \
  --junitxml="$OUT/tests.xml"
bench equality 60
bench bandwidth 25
bench decode1 50
bench batch 60
bench prefill 40
bench profile 90
bench hf 75
stage summarize 10 "$PY" scripts/gpu_bench.py summarize --out "$OUT/summary.json"
echo "== done in $(( $(date +%s) - T0 )) s; stages:"
cat "$OUT/stages.jsonl"
[ -f "$OUT/summary.json" ] && cat "$OUT/summary.json"
exit 0
