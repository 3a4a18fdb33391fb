#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the whole test suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy orchestrator workloads benchmarks scripts
echo "== pytest"; .venv/bin/python -m pytest -q -ra "$@"
