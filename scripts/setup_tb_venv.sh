#!/usr/bin/env bash
# Create .venv-tb in the repo root: a Python with TensorBoard, used by
# tests/tensorboard_files.rs (through scripts/tb_read.py) to check that TensorBoard's own
# EventAccumulator reads the event files we write. Override the interpreter the tests use
# with LORS_LM_TB_PYTHON=/path/to/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TENSORBOARD_VERSION="2.21.0"
if [ ! -x .venv-tb/bin/python ]; then
    "$PYTHON" -m venv .venv-tb
fi
.venv-tb/bin/python -m pip install --quiet --upgrade pip
.venv-tb/bin/python -m pip install --quiet "tensorboard==${TENSORBOARD_VERSION}" -r tests/reference/requirements.txt
.venv-tb/bin/python -c 'import tensorboard as tb; print("tensorboard", tb.__version__)'
