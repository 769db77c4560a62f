#!/usr/bin/env bash
# Goodput sweep: kvflow serve and llama.cpp's llama-server (same GGUF file, same client, same requests).
# Usage: scripts/bench_serve_sweep.sh [OUT_DIR] [LLAMA_SERVER_BIN]   (build llama-server with
# scripts/build_llama_cpp.sh; without it only kvflow is measured)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}; LLAMA=${2:-/tmp/llama.cpp/build/bin/llama-server}
RATES=${RATES:-0.5,1,2,inf}; N=${N:-32}; THREADS=${THREADS:-2}
mkdir -p "$OUT"
KV=".venv/bin/kvflow"; [ -x "$KV" ] || KV=kvflow
GGUF=$(.venv/bin/python -c 'from kvflow.model.loader import resolve_model; print(resolve_model("smollm2-135m"))' 2>/dev/null \
       || python -c 'from kvflow.model.loader import resolve_model; print(resolve_model("smollm2-135m"))')
wait_up() { for _ in $(seq 120); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
sweep() {  # name base_url
  $KV bench serve --base-url "$2" --model smollm2-135m --tokenizer smollm2-135m --dataset random \
    --random-input-len 128 --random-output-len 64 --ignore-eos --num-prompts "$N" --sweep-rates "$RATES" \
    --goodput ttft:2000 tpot:100 --disable-tqdm --json "$OUT/serve-$1.json" | tail -12
}
OMP_NUM_THREADS=$THREADS $KV serve --model smollm2-135m --port 8011 >"$OUT/kvflow-serve.log" 2>&1 &
pid=$!; wait_up http://127.0.0.1:8011; echo "== kvflow serve"; sweep kvflow http://127.0.0.1:8011; kill -TERM $pid; wait $pid || true
if [ -x "$LLAMA" ]; then
  "$LLAMA" -m "$GGUF" -t "$THREADS" -np 16 -c 8192 --host 127.0.0.1 --port 8012 >"$OUT/llama-server.log" 2>&1 &
  pid=$!; wait_up http://127.0.0.1:8012; echo "== llama-server -np 16"; sweep llama-server http://127.0.0.1:8012; kill -TERM $pid; wait $pid || true
fi
