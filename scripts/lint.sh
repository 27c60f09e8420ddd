#!/usr/bin/env bash
# Lint, format and types, as CI checks them (before the tests):
#   scripts/dev-env.sh && scripts/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
