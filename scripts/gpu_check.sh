#!/usr/bin/env bash
# One prepared check on a GPU machine (under 8 minutes on an H100/H200), given the CUDA binary
# from scripts/build_cuda.sh, a prepared corpus and the configs:
#
#   bash scripts/gpu_check.sh [BIN] [DATA_DIR]
#        BIN      default target-cuda/release/lors-lm (a BIN.xz from build_cuda.sh is unpacked)
#        DATA_DIR default data/moby-4k
#
# 1. prints the GPU, the driver and the CUDA libraries the binary will load;
# 2. correctness: `lors-lm check-device` (same weights on CPU f32 and on CUDA: logits, loss,
#    and loss after one AdamW step) in f32 and in bf16, each within its tolerance;
# 3. speed: trains configs/gpu-100m.toml (~100M vanilla-equivalent parameters) as LORS and as
#    its vanilla twin for 60 steps in bf16, and reports tokens/s and MFU (median step after
#    warm-up) and peak GPU memory (nvidia-smi, sampled every 100 ms, CUDA context included).
# Writes the table to $OUT/gpu_table.md (OUT defaults to ./gpu-check) and the logs beside it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/target-cuda/release/lors-lm}"
data="${2:-$root/data/moby-4k}"
out="${OUT:-$root/gpu-check}"
mkdir -p "$out"
if [[ ! -x "$bin" && -f "$bin.xz" ]]; then
    xz -dc "$bin.xz" > "$out/lors-lm" && chmod +x "$out/lors-lm"
    bin="$out/lors-lm"
fi
bin="$(realpath "$bin")"
cd "$root"
py="$(command -v python3 || command -v python)"

echo "== 1. GPU, driver, libraries"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The binary links libcublas/libcublasLt/libcurand/libnvrtc/libcudart of CUDA 13: find them in
# the machine's Python packages (PyTorch ships them under nvidia/), else trust ld.so.
libdirs="$("$py" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]
dirs = []
for r in roots:
    for w in want:
        for hit in glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True):
            d = os.path.dirname(hit)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$bin" | grep -E 'libcuda|cublas|curand|nvrtc|cudart' || true
if ldd "$bin" | grep -q 'not found'; then
    echo "error: the binary cannot find its CUDA libraries (see 'not found' above)" >&2
    exit 1
fi

echo "== 2. correctness: CPU f32 reference vs CUDA"
small=(--config configs/gpu-100m.toml --set model.n_layers=2 --set train.batch_size=4 --set train.seq_len=128)
"$bin" check-device "${small[@]}" --device cuda --set 'train.dtype="f32"' --set train.tf32=false | tee "$out/check_f32.txt"
"$bin" check-device "${small[@]}" --device cuda --set 'train.dtype="bf16"' | tee "$out/check_bf16.txt"

echo "== 3. speed: ~100M config, bf16, LORS vs vanilla"
printf '| mode | unique params | tokens/step | tokens/s | MFU | step ms | peak GPU memory (MiB) |\n|---|---:|---:|---:|---:|---:|---:|\n' > "$out/gpu_table.md"
for mode in lors vanilla; do
    run="$out/runs/$mode"
    rm -rf "$run"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/mem_$mode.txt" &
    poller=$!
    "$bin" train --config configs/gpu-100m.toml --data "$data" --out "$run" --device cuda \
        --set "lors.mode=\"$mode\"" 2>&1 | tee "$out/train_$mode.log"
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    unique="$("$bin" params --run "$run" --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["total_unique"])' 2>/dev/null || echo '?')"
    "$py" - "$run/metrics.jsonl" "$out/mem_$mode.txt" "$mode" "$unique" >> "$out/gpu_table.md" <<'PY'
import json, statistics, sys
metrics, mem, mode, unique = sys.argv[1:5]
steps = [json.loads(l) for l in open(metrics) if '"ms"' in l]
steps = steps[10:] or steps  # after warm-up
ms = statistics.median(s["ms"] for s in steps)
tps = statistics.median(s["tokens_per_sec"] for s in steps)
mfu = statistics.median(s.get("mfu", float("nan")) for s in steps)
tokens = steps[-1]["tokens"] // steps[-1]["step"]
peak = max((int(x) for x in open(mem).read().split() if x.strip().isdigit()), default=0)
print(f"| {mode} | {unique} | {tokens} | {tps:,.0f} | {100*mfu:.1f} % | {ms:.1f} | {peak} |")
PY
done
echo
cat "$out/gpu_table.md"
