#!/usr/bin/env bash
# The test command: set up .venv, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
LORAKIT_EXTRAS=dev,serve,onnx,tensorboard,mlflow,optuna bash scripts/setup.sh
bash scripts/browser.sh # headless Chromium for tests/test_serve_page.py
bash scripts/postgres.sh # PostgreSQL server binaries for tests/test_search.py
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest tests --durations=25 "$@" # the slowest tests, to keep CI short
# Once more, the tests of every job that --precision auto decides, as the other kind of machine
# would run them (LORAKIT_FAST_BF16 flips the bf16 decision: AMX <-> AVX2-only), and offline as
# offline users run (HF_HUB_OFFLINE=1): neither may change a verdict.
other=$(.venv/bin/python -c "from lorakit.runtime import cpu_has_fast_bf16 as f; print(int(not f()))")
HF_HUB_OFFLINE=1 LORAKIT_FAST_BF16=$other .venv/bin/python -m pytest "$@" \
    tests/test_precision.py tests/test_predict.py tests/test_export.py tests/test_serve.py
