#!/usr/bin/env bash
# The test command: set up .venv, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
LORAKIT_EXTRAS=dev,serve,onnx bash scripts/setup.sh
bash scripts/browser.sh # headless Chromium for tests/test_serve_page.py
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest tests "$@"
