#!/usr/bin/env bash
# The offline figures in BENCHMARKS.md: kvflow and transformers on the same requests, same run.
# Usage: scripts/bench_offline.sh [OUT_DIR]   (about 25 minutes on 2 quiet cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}
mkdir -p "$OUT"
KV=".venv/bin/kvflow"; [ -x "$KV" ] || KV=kvflow  # or whatever kvflow is on PATH
run() { name=$1; shift; echo "== $name: kvflow bench throughput $*"; $KV bench throughput --disable-tqdm --json "$OUT/$name.json" "$@" | tail -4; }
for dtype in float32 bfloat16; do
  run "random64-kvflow-$dtype" --dataset random --num-prompts 64 --input-len 128 --output-len 128 --dtype $dtype
  run "random64-hf-$dtype" --backend hf --dataset random --num-prompts 64 --input-len 128 --output-len 128 --dtype $dtype
  run "single-kvflow-$dtype" --dataset random --num-prompts 1 --input-len 32 --output-len 128 --dtype $dtype
  run "single-hf-$dtype" --backend hf --dataset random --num-prompts 1 --input-len 32 --output-len 128 --dtype $dtype
done
run ttft512-kvflow --dataset random --num-prompts 1 --input-len 512 --output-len 2
run ttft512-hf --backend hf --dataset random --num-prompts 1 --input-len 512 --output-len 2
run sharegpt200-kvflow --dataset sharegpt --num-prompts 200
# transformers on ShareGPT: each batch of 64 runs to its longest reply (~1000 tokens), 10+ minutes a batch here.
[ "${WITH_HF_SHAREGPT:-0}" = 1 ] && run sharegpt200-hf --backend hf --dataset sharegpt --num-prompts 200
true
