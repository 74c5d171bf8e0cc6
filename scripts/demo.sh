#!/usr/bin/env bash
# Sets up the runtime (first run only) and generates a video through the USV nodes in the real
# ComfyUI. Arguments go to scripts/demo.py (--help lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_runtime.sh"
cd "$ROOT"
exec "${USV_VENV:-$ROOT/.venv}/bin/python" scripts/demo.py "$@"
