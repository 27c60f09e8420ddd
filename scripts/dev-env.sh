#!/usr/bin/env bash
# Make .venv/ in the repo with Harvest and everything its node and tests need.
# Idempotent: a second run only checks. HARVEST_TORCH overrides the torch requirement
# (default: the 2.13.0 release, whose CPU build is what CI tests on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import harvestd, client, lender, ray, torch, grpc, pytest, hypothesis, transformers, accelerate, matplotlib, ruff, mypy" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${HARVEST_TORCH:-torch==2.13.0}" numpy
  .venv/bin/python -m pip install -q -e '.[test,lint]'
fi
