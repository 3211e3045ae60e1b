#!/usr/bin/env bash
# Quickstart: fetch Moby Dick → prepare (BPE 4096) → train a LORS model → generate.
# About 4 minutes on 2 CPU cores once built (training ~2.5 of them; a cold `cargo build` adds
# 10-15 minutes). Usage: scripts/quickstart.sh [CONFIG]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/moby-lors.toml}"
RUN="runs/$(basename "$CONFIG" .toml)"

cargo build --release
BIN=target/release/lors-lm
[ -n "${CARGO_TARGET_DIR:-}" ] && BIN="$CARGO_TARGET_DIR/release/lors-lm"

bash scripts/fetch_corpus.sh
if [ ! -f data/moby-4k/meta.json ]; then
  "$BIN" prepare --input data/moby-dick --out data/moby-4k --vocab-size 4096
fi
"$BIN" params --config "$CONFIG" --data data/moby-4k
"$BIN" train --config "$CONFIG" --data data/moby-4k --out "$RUN" --force
"$BIN" generate --run "$RUN" --prompt "Call me Ishmael." --max-new-tokens 120 --temperature 0.8 --top-k 50 --seed 1
