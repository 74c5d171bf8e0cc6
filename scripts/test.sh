#!/usr/bin/env bash
# Runs the test suite in a project-local runtime (built on first use). Arguments go to pytest:
#   scripts/test.sh -m gpu          the GPU tests, on a machine with CUDA
#   scripts/test.sh tests/test_x.py one file
# The runtime is ComfyUI 0.3.75 in .venv unless USV_COMFYUI names another release, as a tarball or
# a checkout (see scripts/setup_runtime.sh):
#   USV_COMFYUI=../shared/comfyui/comfyui-0.28.1.tar.gz scripts/test.sh tests/test_x.py
# USV_VENV=DIR runs in an already built runtime DIR (e.g. .venv-0.28.1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${USV_COMFYUI:-}" ]]; then
  VENV="$("$ROOT/scripts/setup_runtime.sh" "$USV_COMFYUI")"
else
  "$ROOT/scripts/setup_runtime.sh" >/dev/null
  VENV="$(cd "${USV_VENV:-$ROOT/.venv}" && pwd)"
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
