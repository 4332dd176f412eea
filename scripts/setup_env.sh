#!/usr/bin/env bash
# Create ./.venv for COLIPRISlicer development, the offline demo and the tests (idempotent).
# torch is pinned here (torch==2.14.1, torchvision==0.29.1: a matched pair that pip takes from
# the local wheel store on the project's machines); the package itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

# EGL/Mesa for offscreen rendering of slice views in the tests (headless machines).
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing EGL/Mesa for headless rendering" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null
  else
    echo "[setup] libEGL not found; offscreen rendering tests will be skipped" >&2
  fi
fi

# dicom3tools (dciodvfy) to validate the DICOM SEG/SR exports in the tests.
if ! command -v dciodvfy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing dicom3tools for DICOM validation" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null
  else
    echo "[setup] dciodvfy not found; DICOM validation tests will be skipped" >&2
  fi
fi

echo "[setup] creating .venv with $PYTHON (first run takes a few minutes)" >&2
"$PYTHON" -m venv .venv
log=.venv/setup.log
pip_install() {
  .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "[setup] pip failed; see $log" >&2; exit 1; }
}
pip_install --upgrade pip
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e ".[test,cluster,faiss]"  # cluster: Ray, for the --engine ray tests; faiss: search --backend faiss
rm -f .venv/.setup-*
touch "$stamp"
echo "[setup] done" >&2
