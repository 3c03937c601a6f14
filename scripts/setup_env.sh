#!/usr/bin/env bash
# Creates ./.venv (if needed) and installs cps_hf with its test/dev extras into it. Idempotent: a stamp
# records what was installed, so a second call returns at once unless pyproject.toml changed.
#
# CPS_TORCH_SPEC picks the torch build (default: the releases pip finds on this project's CI machines;
# set it to e.g. "torch torchvision" to let pip choose for your platform/CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${CPS_VENV:-.venv}"
TORCH_SPEC="${CPS_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.cps_hf_installed"
WANTED="$(cat pyproject.toml; echo "$TORCH_SPEC")"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
printf '%s' "$WANTED" > "$STAMP"
echo "cps_hf installed in $VENV"
