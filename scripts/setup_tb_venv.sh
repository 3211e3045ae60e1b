#!/usr/bin/env bash
# Create .venv-tb in the repo root: a Python with TensorBoard, numpy and safetensors, used by
# the tests (tests/tensorboard_files.rs through scripts/tb_read.py reads our event files with
# TensorBoard's own loaders; tests/export.rs runs tests/reference/llama_ref.py). scripts/test.sh
# calls it. Idempotent: when .venv-tb already holds exactly these pins it returns at once.
# Override the interpreter the tests use with LORS_LM_TB_PYTHON=/path/to/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TENSORBOARD_VERSION="2.21.0"
REQUIREMENTS=tests/reference/requirements.txt
STAMP=.venv-tb/lors-lm-installed
# What is installed, as one line: changes to the pins (or this script's) trigger a reinstall.
want="tensorboard==${TENSORBOARD_VERSION} $(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && .venv-tb/bin/python -c '' 2>/dev/null; then
    echo ".venv-tb: up to date (tensorboard ${TENSORBOARD_VERSION}, $REQUIREMENTS)"
    exit 0
fi
if [ ! -x .venv-tb/bin/python ] || ! .venv-tb/bin/python -c '' 2>/dev/null; then
    rm -rf .venv-tb
    "$PYTHON" -m venv .venv-tb
fi
rm -f "$STAMP"
.venv-tb/bin/python -m pip install --quiet --upgrade pip
.venv-tb/bin/python -m pip install --quiet "tensorboard==${TENSORBOARD_VERSION}" -r "$REQUIREMENTS"
.venv-tb/bin/python -c 'import numpy, safetensors, tensorboard as tb; print(".venv-tb: tensorboard", tb.__version__)'
echo "$want" > "$STAMP"
