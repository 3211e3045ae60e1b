#!/usr/bin/env bash
# The project's test command (README "Tests"): the whole suite, on CPU, in release mode
# (one build serves the binary, the tests and the benchmarks' compile check).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --all-targets --locked
cargo test --release --locked "$@"

# f32 matmuls run through OpenBLAS where it is installed (the default `openblas` feature loads
# libopenblas.so.0 at run time) and through the gemm crate elsewhere. Where it is installed,
# the tests that cover matmuls and the kernels built on them run again on gemm
# (LORS_LM_BLAS=gemm), so that both paths are tested.
if ldconfig -p 2>/dev/null | grep 'libopenblas\.so\.0 ' >/dev/null; then
    LORS_LM_BLAS=gemm cargo test --release --locked --lib --test candle_patches --test ops --test golden "$@"
elif [ -n "${LORS_LM_REQUIRE_OPENBLAS:-}" ]; then
    echo "LORS_LM_REQUIRE_OPENBLAS is set but libopenblas.so.0 was not found (apt install libopenblas0)" >&2
    exit 1
else
    echo "note: libopenblas.so.0 not found: the tests ran on the gemm path only (apt install libopenblas0 to test both)"
fi
