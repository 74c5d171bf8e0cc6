#!/usr/bin/env bash
# Runs the test suite in the project-local runtime (built on first use). Arguments go to pytest:
#   scripts/test.sh -m gpu          the GPU tests, on a machine with CUDA
#   scripts/test.sh tests/test_x.py one file
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_runtime.sh"
cd "$ROOT"
exec "${USV_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
