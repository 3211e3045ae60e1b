#!/usr/bin/env bash
# The project's test command (README "Tests"): the whole suite, on CPU, in release mode
# (one build serves the binary, the tests and the benchmarks' compile check).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --all-targets --locked
cargo test --release --locked "$@"

# The `openblas` feature (f32 matmuls through a system OpenBLAS): the tests that cover matmuls
# and the kernels built on them, when libopenblas is installed (apt install libopenblas-dev).
if ldconfig -p 2>/dev/null | grep 'libopenblas\.so ' >/dev/null; then
    cargo test --release --locked --features openblas --lib --test candle_patches --test ops --test golden "$@"
elif [ -n "${LORS_LM_REQUIRE_OPENBLAS:-}" ]; then
    echo "LORS_LM_REQUIRE_OPENBLAS is set but libopenblas.so was not found (apt install libopenblas-dev)" >&2
    exit 1
else
    echo "note: skipping the openblas feature's tests: libopenblas.so not found (apt install libopenblas-dev)"
fi
