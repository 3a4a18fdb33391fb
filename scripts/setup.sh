#!/usr/bin/env bash
# Create .venv and install the pinned dependencies. Idempotent: re-runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setting up .venv (first run takes a few minutes)..."
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, exactly the pinned release: on a CPU machine its CPU wheel is on local disk, and a bare or ranged
# request would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# torchattacks is only the benchmarks' baseline; its torchvision dependency would replace the CPU torch with a
# CUDA build, and it imports and runs without it.
.venv/bin/python -m pip install -q --no-deps "torchattacks==3.5.1"
echo "$want" > "$stamp"
