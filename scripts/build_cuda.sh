#!/usr/bin/env bash
# Build the CUDA binary (cargo feature `cuda`) on a machine without a GPU or a system CUDA,
# with NVIDIA's CUDA 13.0 toolkit from PyPI. Output: target-cuda/release/lors-lm.
#
#   bash scripts/build_cuda.sh              # toolkit into .cuda-toolkit/, binary into target-cuda/,
#                                           # with NCCL (data-parallel GPU gradients; ranks from
#                                           # `lors-lm launch` or torchrun, no MPI needed)
#   bash scripts/build_cuda.sh --no-nccl    # the same without NCCL (no libnccl at run time)
#   bash scripts/build_cuda.sh --nccl-check # compile-check the `nccl` feature only (cargo check)
#
# NCCL comes from NVIDIA's nvidia-nccl-cu13 wheel (2.30.7, PyTorch 2.11's): linked against its
# libnccl.so.2, which the GPU machine's PyTorch wheels provide at run time.
#
# Every wheel is pinned to the CUDA 13.0 line: the PTX must not be newer than the GPU machine's
# driver (580 = CUDA 13.0); unpinned, nvcc 13.0 pulls newer crt/nvvm/runtime wheels and the
# PTX will not load. The wheels ship only versioned .so files and no libcuda: this script makes
# the unversioned links and a link-time stub libcuda.so (soname libcuda.so.1) exporting the
# driver symbols. At run time the real libcuda.so.1 comes from the driver, and the CUDA 13
# libraries (cublas, curand, nvrtc, cudart) from LD_LIBRARY_PATH; scripts/gpu_check.sh finds
# them. candle builds sm_90 code (H100/H200) unless CUDA_COMPUTE_CAP says otherwise.
#
# A cold build takes tens of minutes on 2 cores (nvcc on candle-kernels). It uses its own
# target dir so that CPU builds stay free of CUDA (the CUDA binary needs libcuda.so.1 even to
# start).
set -euo pipefail

mode=build
features=nccl
case "${1:-}" in
    "") ;;
    --no-nccl) features=cuda ;;
    --nccl-check) mode=nccl-check ;;
    *) echo "usage: build_cuda.sh [--no-nccl | --nccl-check]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tk="${CUDA_TOOLKIT_DIR:-$root/.cuda-toolkit}"
py="${PYTHON:-python3}"

if [[ ! -f "$tk/.complete" ]]; then
    echo "installing the CUDA 13.0 toolkit wheels into $tk ..."
    "$py" -m pip install --quiet --no-deps --target "$tk" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
        nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    touch "$tk/.complete"
fi
# NCCL in a pip target of its own (nccl-wheel/, which only this script writes): pip --target
# skips a top-level folder that already exists (nvidia/, from the toolkit wheels), so installed
# beside them NCCL would silently be left out.
if [[ "$features" == nccl && ! -f "$tk/nccl-wheel/.complete" ]]; then
    rm -rf "$tk/nccl-wheel"
    "$py" -m pip install --quiet --no-deps --target "$tk/nccl-wheel" nvidia-nccl-cu13==2.30.7
    touch "$tk/nccl-wheel/.complete"
fi
cuda="$tk/nvidia/cu13"
[[ -x "$cuda/bin/nvcc" ]] || { echo "error: $cuda/bin/nvcc missing: delete $tk and rerun" >&2; exit 1; }

# Unversioned links for the linker (libfoo.so -> libfoo.so.N...).
for lib in "$cuda"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [[ -e "$base" ]] || ln -s "$(basename "$lib")" "$base"
done
# lib64 is where some build scripts look.
[[ -e "$cuda/lib64" ]] || ln -s lib "$cuda/lib64"

# Link-time stub for the driver API: every cu* symbol cudarc's bindings reference, as a no-op.
stub="$cuda/stub"
if [[ ! -f "$stub/libcuda.so" ]]; then
    mkdir -p "$stub"
    cargo fetch --manifest-path "$root/Cargo.toml" >/dev/null
    bindings="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/*' -name '*.rs')"
    [[ -n "$bindings" ]] || { echo "error: cudarc's driver bindings not found in the cargo registry" >&2; exit 1; }
    # shellcheck disable=SC2086
    grep -ho 'pub \(unsafe \)\?fn cu[A-Za-z0-9_]*' $bindings | awk '{print $NF}' | sort -u |
        awk '{printf "int %s(void) { return 999; }\n", $1}' > "$stub/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/stub.c"
    echo "stub libcuda.so with $(grep -c '^int' "$stub/stub.c") driver symbols"
fi

export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export PATH="$cuda/bin:$PATH"
# NCCL's wheel puts libnccl.so.2 (and nccl.h) under nvidia/nccl/ (cu13 layouts vary: find it).
nccl_lib="$(dirname "$(find "$tk/nccl-wheel" -name 'libnccl.so.2' -print -quit 2>/dev/null)" 2>/dev/null || true)"
if [[ -n "$nccl_lib" && -f "$nccl_lib/libnccl.so.2" ]]; then
    [[ -e "$nccl_lib/libnccl.so" ]] || ln -s libnccl.so.2 "$nccl_lib/libnccl.so"
else
    nccl_lib="$cuda/lib"
    [[ "$features" != nccl ]] || { echo "error: libnccl.so.2 not found under $tk/nccl-wheel: delete it and rerun" >&2; exit 1; }
fi
export LIBRARY_PATH="$cuda/lib:$nccl_lib:$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $cuda/lib -L $nccl_lib -L $stub"
nvcc --version | tail -n 2
cd "$root"
if [[ "$mode" == nccl-check ]]; then
    # Type-checks src/train/distributed/nccl.rs against cudarc's NCCL API (build scripts run,
    # candle-kernels' PTX included; no binary is linked, so libnccl is not needed).
    CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$root/target-cuda}" cargo check --release --locked --features nccl --bin lors-lm
    echo "the nccl feature compiles (cargo check)"
    exit 0
fi
CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$root/target-cuda}" cargo build --release --features "$features" --bin lors-lm
echo "built with --features $features"
bin="${CUDA_TARGET_DIR:-$root/target-cuda}/release/lors-lm"
# The binary embeds candle's PTX (~80 MB); a stripped, xz-compressed copy (~12 MB) is what to
# carry to a GPU machine (scripts/gpu_check.sh unpacks it).
strip -o "$bin.stripped" "$bin"
xz -T0 -f "$bin.stripped" && mv "$bin.stripped.xz" "$bin.xz"
echo "built $bin (sm_${CUDA_COMPUTE_CAP}) and $bin.xz ($(du -h "$bin.xz" | cut -f1))"
