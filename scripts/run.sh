#!/usr/bin/env bash
# Quick start: install, then generate from the bundled SmolLM2-135M model. Extra args go to `kvflow generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh >&2
if [ $# -eq 0 ]; then
  set -- "The three most useful things to know about paged attention are" "def fibonacci(n):"
fi
exec .venv/bin/kvflow generate --max-tokens 64 --temperature 0 "$@"
