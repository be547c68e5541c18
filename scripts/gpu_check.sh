#!/usr/bin/env bash
# One prepared command for a CUDA machine: GPU kernel tests, then the bandwidth table into docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# An uninstalled checkout (the GPU machine has its own Python and no project venv): the `longtail`
# namespace as links to the card's folders, on PYTHONPATH, as the editable install maps them.
if ! "$PYTHON" -P -c "import longtail.kernels.lora" 2>/dev/null; then
  shim="$(mktemp -d)"
  mkdir -p "$shim/longtail"
  for part in node serving attribution contracts kernels scripts; do ln -s "$PWD/$part" "$shim/longtail/$part"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout 300 "$PYTHON" scripts/gpu_check.py "$@"
