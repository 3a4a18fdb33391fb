#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command: the CUDA tests (tests/test_cuda.py, skipped elsewhere), then
# the GPU benchmarks (benchmarks/gpu_machine.py). Results and logs go to OUT; the benchmarks run even if a test
# fails, and the exit status is non-zero if anything failed.
# Usage: bash scripts/gpu_checks.sh OUT   (PYTHON: the interpreter, .venv/bin/python by default)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_checks.sh OUT}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || status=1
"$py" -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest.log" || status=1
"$py" -m benchmarks.gpu_machine "$out" 2>&1 | tee "$out/benchmarks.log" || status=1
exit $status
