#!/usr/bin/env bash
# Install with test extras, then run the whole test suite (two worker processes, one torch thread each;
# modules with costly module fixtures stay on one worker: see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest -q -n "${KVFLOW_TEST_WORKERS:-2}" "$@"
