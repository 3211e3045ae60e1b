#!/usr/bin/env bash
# The project's test command (README "Tests"): the whole suite, on CPU, in release mode
# (one build serves the binary, the tests and the benchmarks' compile check), then the
# data-parallel tests under mpirun with the `mpi` build where MPI is installed. It first makes
# the Python the tests need (.venv-tb: TensorBoard, numpy, safetensors; quick when it exists):
# no test skips itself, a missing piece fails. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LORS_LM_TB_PYTHON:-}" ]; then
    bash scripts/setup_tb_venv.sh
fi
cargo build --release --all-targets --locked

# cargo test with TEST_ARGS, then the libtest arguments "$@" (after the `--` that TEST_ARGS
# may already hold).
cargo_test() {
    local sep=(--)
    for a in "${TEST_ARGS[@]}"; do
        if [ "$a" = -- ]; then sep=(); fi
    done
    cargo test --release --locked "${TEST_ARGS[@]}" "${sep[@]}" "$@"
}

# f32 matmuls run through OpenBLAS where it is installed (the default `openblas` feature loads
# libopenblas.so.0 at run time) and through the gemm crate elsewhere. Where it is installed,
# the tests that cover matmuls and the kernels built on them run again on gemm
# (LORS_LM_BLAS=gemm), so that both paths are tested; the OpenBLAS test needs the library, so
# it is left out (shown as "filtered out") where the library is missing, and on the gemm pass.
if ldconfig -p 2>/dev/null | grep 'libopenblas\.so\.0 ' >/dev/null; then
    TEST_ARGS=("$@")
    cargo_test
    TEST_ARGS=(--lib --test candle_patches --test ops --test golden "$@")
    LORS_LM_BLAS=gemm cargo_test --skip openblas_bands
elif [ -n "${LORS_LM_REQUIRE_OPENBLAS:-}" ]; then
    echo "LORS_LM_REQUIRE_OPENBLAS is set but libopenblas.so.0 was not found (apt install libopenblas0)" >&2
    exit 1
else
    TEST_ARGS=("$@")
    cargo_test --skip openblas_bands
    echo "NOTE: libopenblas.so.0 not found: the tests ran on the gemm path only, and the OpenBLAS test" \
        "(candle_patches openblas_bands_...) did not run (apt install libopenblas0 to test both)"
fi

# Data-parallel training (cargo feature `mpi`): tests/distributed.rs runs the mpi build under
# `mpirun -n 2`. It needs Open MPI (mpirun, and mpicc + libclang to build the bindings). Run last:
# the mpi build replaces target/release/lors-lm, which the tests above ran without MPI.
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
    cargo test --release --locked --features mpi --test distributed
elif [ -n "${LORS_LM_REQUIRE_MPI:-}" ]; then
    echo "LORS_LM_REQUIRE_MPI is set but mpirun/mpicc were not found (apt install openmpi-bin libopenmpi-dev libclang-dev)" >&2
    exit 1
else
    echo "NOTE: mpirun/mpicc not found: the data-parallel tests (tests/distributed.rs, cargo feature mpi) did not" \
        "run (apt install openmpi-bin libopenmpi-dev libclang-dev to run them)"
fi
