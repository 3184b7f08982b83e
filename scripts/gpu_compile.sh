#!/usr/bin/env bash
# Compile every Triton specialisation the launchers produce for sm_80, sm_90 and
# sm_100 with Triton's own compiler and ptxas (no GPU needed); print registers,
# spills, shared memory and compile seconds; fail on a compiler error or on a
# spill outside float64.
#
#   bash scripts/gpu_compile.sh                      # everything (make gpu-compile)
#   bash scripts/gpu_compile.sh --targets 90 --jobs 2 --json out.json
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
TRITON_INTERPRET=0 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} exec "$py" -m tests.ops._triton_compile --all "$@"
