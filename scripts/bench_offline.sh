#!/usr/bin/env bash
# The offline figures in BENCHMARKS.md: kvflow and transformers on the same requests, same run.
# Usage: scripts/bench_offline.sh [OUT_DIR]   (about 25 minutes on 2 quiet cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}
mkdir -p "$OUT"
KV=".venv/bin/kvflow"; [ -x "$KV" ] || KV=kvflow
run() { name=$1; shift; echo "== $name: kvflow bench throughput $*"; $KV bench throughput --disable-tqdm --json "$OUT/$name.json" "$@" | tail -4; }
for dtype in float32 bfloat16; do
  run "random64-kvflow-$dtype" --dataset random --num-prompts 64 --input-len 128 --output-len 128 --dtype $dtype
  run "random64-hf-$dtype" --backend hf --dataset random --num-prompts 64 --input-len 128 --output-len 128 --dtype $dtype
  run "single-kvflow-$dtype" --dataset random --num-prompts 1 --input-len 32 --output-len 128 --dtype $dtype
  run "single-hf-$dtype" --backend hf --dataset random --num-prompts 1 --input-len 32 --output-len 128 --dtype $dtype
  run "ttft512-kvflow-$dtype" --dataset random --num-prompts 1 --input-len 512 --output-len 2 --dtype $dtype
  run "ttft512-hf-$dtype" --backend hf --dataset random --num-prompts 1 --input-len 512 --output-len 2 --dtype $dtype
done
# transformers needs ~10 min per 64 ShareGPT prompts here (each batch runs to its longest reply):
# the same-run comparison uses 64 prompts; kvflow alone also runs the standard 200.
run sharegpt64-kvflow --dataset sharegpt --num-prompts 64
run sharegpt64-hf --backend hf --dataset sharegpt --num-prompts 64
run sharegpt200-kvflow --dataset sharegpt --num-prompts 200
