#!/usr/bin/env bash
# One prepared command for the device machine: scripts/gpu_check.py with its results in $OUT.
# Runs on the machine's preinstalled Python (no project venv, nothing installed, no network).
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
export OUT="${OUT:-$PWD/gpu_check_out}"
# The script keeps itself under 450 s (each section a child with its own limit); this is the backstop.
exec timeout 480 "$PYTHON" -P scripts/gpu_check.py "$@"
