#!/usr/bin/env bash
# Set everything up, then run the smoke sweep (sweeps/smoke.yaml) on a local Ray instance with local storage.
# Extra arguments go to the sweep, e.g. --storage s3://bucket/prefix or --plan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m orchestrator.sweep sweeps/smoke.yaml "$@"
