#!/usr/bin/env bash
# The project's test command (README "Tests"): the whole suite, on CPU, in release mode
# (one build serves the binary, the tests and the benchmarks' compile check).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --all-targets --locked
cargo test --release --locked "$@"
