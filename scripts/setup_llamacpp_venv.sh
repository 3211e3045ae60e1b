#!/usr/bin/env bash
# Create .venv-llamacpp in the repo root: a Python with llama-cpp-python (a source build of
# llama.cpp, the reference for our GGUF files) and numpy, used by scripts/check_llamacpp.sh.
# The first run compiles llama.cpp (about 10-20 minutes on 2 cores; set
# CMAKE_BUILD_PARALLEL_LEVEL to use more); later runs return at once while .venv-llamacpp
# holds exactly these pins. Needs python3 (with venv) and a C/C++ compiler; cmake comes as a
# wheel from PyPI when the system has none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
NUMPY_VERSION="2.4.6"
# A portable CPU build (no -march=native: the venv may outlive the CPU it was built on), and
# only the library: no multimodal (llava/mtmd), tests, examples, tools or server.
CMAKE_ARGS_PINNED="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
VENV=.venv-llamacpp
STAMP="$VENV/lors-lm-installed"
want="llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION} numpy==${NUMPY_VERSION} ${CMAKE_ARGS_PINNED}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "$VENV: up to date (llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION})"
    exit 0
fi
for tool in cc c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found: install a C/C++ compiler (apt install g++)" >&2; exit 1; }
done
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
start=$(date +%s)
echo "$VENV: building llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION} from source (llama.cpp; takes a while)..."
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "numpy==${NUMPY_VERSION}"
CMAKE_ARGS="$CMAKE_ARGS_PINNED" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
"$VENV/bin/python" -c 'import llama_cpp; print(".venv-llamacpp: llama-cpp-python", llama_cpp.__version__)'
echo "$want" > "$STAMP"
echo "$VENV: built in $(( $(date +%s) - start )) s"
