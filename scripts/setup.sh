#!/usr/bin/env bash
# Create .venv and install lorakit with everything it needs (idempotent, offline-hub safe).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip_install() {
    # This workplace's pip config lists local indexes that warn on every run; hide only those.
    .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
# The CPU build of torch: installed first and pinned, so nothing pulls a multi-GB CUDA wheel.
pip_install torch==2.13.0
pip_install -e ".[${LORAKIT_EXTRAS:-serve,onnx}]"
.venv/bin/python -c "import lorakit, torch, transformers" # fail fast if the install is broken
