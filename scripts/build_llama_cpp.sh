#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-bench, llama-batched-bench, llama-perplexity, llama-quantize and llama-tokenize (CPU,
# native) from the llama.cpp source that PyPI's llama-cpp-python sdist carries, so a peer can be measured beside
# kvflow on the same machine. About 6-10 minutes on 2 cores (run it under `nice`, not under the measurement
# lock). Usage: scripts/build_llama_cpp.sh [DEST]   (default /tmp/llama.cpp)
# Afterwards: DEST/build/bin/llama-server -m MODEL.gguf -t 2 -np 16 --host 127.0.0.1 --port 8081
# scripts/bench_llama_cpp.sh measures the peer (and checks for the AMX SIGILL this build can hit on some VMs).
set -euo pipefail
DEST=${1:-/tmp/llama.cpp}
TARGETS=(llama-server llama-bench llama-batched-bench llama-perplexity llama-quantize llama-tokenize)
missing=0
for t in "${TARGETS[@]}"; do [ -x "$DEST/build/bin/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
  if [ ! -f "$DEST/CMakeLists.txt" ]; then  # fetch the source once; a rebuild for a new target reuses it
    work=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work" llama-cpp-python
    tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    rm -rf "$DEST"; mkdir -p "$(dirname "$DEST")"
    cp -r "$work"/llama_cpp_python-*/vendor/llama.cpp "$DEST"
  fi
  command -v ninja >/dev/null || python3 -m pip install --quiet ninja
  cmake -S "$DEST" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$DEST/build" -j 2 --target "${TARGETS[@]}"
fi
ls "$DEST/build/bin"
