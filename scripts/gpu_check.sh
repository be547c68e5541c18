#!/usr/bin/env bash
# One prepared command for a CUDA machine: GPU kernel tests, then the bandwidth table into docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 300 "$PYTHON" scripts/gpu_check.py "$@"
