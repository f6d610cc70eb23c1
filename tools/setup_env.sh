#!/usr/bin/env bash
# One-step, idempotent set-up: a virtual environment in .venv with the pinned stack, and mmcv 2.1.0 built
# from its sdist (C++20 for torch 2.14's headers, compiled ops; CUDA ops when nvcc and a GPU are present).
# The mmcv wheel is cached in $OVERLOCK_CACHE (default ~/.cache/overlock), so a second set-up takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OVERLOCK_VENV:-$ROOT/.venv}"
CACHE="${OVERLOCK_CACHE:-$HOME/.cache/overlock}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.overlock-setup-$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "$0" | sha1sum | cut -c1-12)"
log() { printf '[setup] %s\n' "$*"; }

if [[ -f "$STAMP" ]]; then exit 0; fi
mkdir -p "$CACHE/wheels" "$CACHE/logs"
if [[ ! -x "$VENV/bin/python" ]]; then
  # torch's CUDA build alone is ~6 GiB installed; fail now, naming the disk, rather than midway through pip.
  NEED_GIB=8
  FREE_GIB=$(( $(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}') / 1048576 ))
  if (( FREE_GIB < NEED_GIB )); then
    log "ERROR: $(dirname "$VENV") has ${FREE_GIB} GiB free; the environment needs about ${NEED_GIB} GiB."
    log "Free some space there, or set OVERLOCK_VENV to a path on a larger disk, then run 'make setup' again."
    exit 1
  fi
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip warns about every missing local mirror folder; keep real errors only
pip_quiet() { "$@" 2> >(grep -v "Location '.*' is ignored" >&2); }
log "installing pinned requirements (first run: several minutes)"
"${PIP[@]}" install --upgrade 'pip<25' wheel ninja
"${PIP[@]}" install -r "$ROOT/requirements.txt"
# mmcv's and mmengine's setup/runtime use pkg_resources, gone from setuptools >= 70 (torch pulls a newer one).
"${PIP[@]}" install 'setuptools<70' 2>/dev/null

# --- mmcv 2.1.0 with compiled ops -------------------------------------------------------------------------
FLAVOUR=cpu
if command -v nvcc >/dev/null && "$VENV/bin/python" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  FLAVOUR=cuda
fi
TORCH_VER="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.replace("+", "_"))')"
WHEEL_DIR="$CACHE/wheels/mmcv-2.1.0-torch${TORCH_VER}-${FLAVOUR}"
if ! ls "$WHEEL_DIR"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  log "building mmcv 2.1.0 ($FLAVOUR ops) from source, about 7 minutes on 2 cores; log: $CACHE/logs/mmcv-build.log"
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
  if ! "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$BUILD" >"$CACHE/logs/mmcv-download.log" 2>&1; then
    log "ERROR: could not download the mmcv 2.1.0 sdist; see $CACHE/logs/mmcv-download.log"; exit 1
  fi
  tar -xzf "$BUILD"/mmcv-2.1.0.tar.gz -C "$BUILD"
  sed -i 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-2.1.0/setup.py"
  export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  if [[ $FLAVOUR == cuda ]]; then export FORCE_CUDA=1; else export FORCE_CUDA=0; fi
  mkdir -p "$WHEEL_DIR"
  if ! "${PIP[@]}" wheel --no-build-isolation --no-deps "$BUILD/mmcv-2.1.0" -w "$WHEEL_DIR.tmp" \
       >"$CACHE/logs/mmcv-build.log" 2>&1; then
    rm -rf "$WHEEL_DIR" "$WHEEL_DIR.tmp"
    log "ERROR: building mmcv 2.1.0 failed. The first compiler errors:"
    grep -m 8 -E 'error:|Error' "$CACHE/logs/mmcv-build.log" | cut -c1-200 || true
    log "Full log: $CACHE/logs/mmcv-build.log. Needs gcc/g++ >= 10 (C++20), python3-dev headers,"
    log "and for CUDA ops a toolkit matching torch's CUDA. Fix that, then run 'make setup' again."
    exit 1
  fi
  mv "$WHEEL_DIR.tmp"/*.whl "$WHEEL_DIR"/ && rm -rf "$WHEEL_DIR.tmp"
fi
"${PIP[@]}" install --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-2.1.0-*.whl
"${PIP[@]}" install --no-deps -e "$ROOT"
"$VENV/bin/python" -c 'import mmcv.ops, mmdet, mmseg, overlock_core' \
  || { log "ERROR: the environment does not import; see the message above"; exit 1; }
# ContMix's fused CPU kernels (overlock_core/csrc), cached in $CACHE/ext; without them the PyTorch formulation runs
OVERLOCK_CACHE="$CACHE" "$VENV/bin/python" -c 'from overlock_core.ops import cpu_ext; cpu_ext.build()' || true
rm -f "$VENV"/.overlock-setup-* && touch "$STAMP"
log "ready: $VENV ($FLAVOUR mmcv ops)"
