#!/usr/bin/env bash
# Set everything up, then lint, type-check and run the whole test suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The MLflow tracking server the tracking test starts (tests/mlflow_server.py) gets an environment of its own: the
# full mlflow package pins an older pyarrow than the project's, and the project itself needs only the client.
MLFLOW_SERVER="mlflow==3.17.2"
if [[ ! -f .venv-mlflow/.installed || $(cat .venv-mlflow/.installed) != "$MLFLOW_SERVER" ]]; then
  echo "setting up .venv-mlflow (the tests' MLflow server)..."
  [[ -x .venv-mlflow/bin/python ]] || "${PYTHON:-python3.11}" -m venv .venv-mlflow
  .venv-mlflow/bin/python -m pip install -q "$MLFLOW_SERVER"
  echo "$MLFLOW_SERVER" > .venv-mlflow/.installed
fi
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy orchestrator workloads benchmarks scripts
echo "== pytest"; .venv/bin/python -m pytest -q -ra "$@"
