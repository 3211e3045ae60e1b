#!/usr/bin/env bash
# Data-parallel throughput on one machine (docs/distributed.md): the same config trained as
# 1 rank × 2 threads and as 2 ranks × 1 thread (Open MPI), same batch per rank, reporting
# tokens/s (global) and the share of each step spent in the gradient all-reduce.
#
#   bash scripts/bench_distributed.sh DATA_DIR [CONFIG] [STEPS] [--set k=v ...]
#
# Needs the mpi build (cargo build --release --features mpi) and mpirun. The first 5 steps are
# warm-up and left out of the means. A benchmark, not a test: on a shared machine the numbers
# move with the load (the script prints the load average beside them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${1:?usage: bench_distributed.sh DATA_DIR [CONFIG] [STEPS] [--set k=v ...]}"
config="${2:-$root/configs/bench-small.toml}"
steps="${3:-25}"
shift $(( $# < 3 ? $# : 3 ))
bin="${LORS_LM_BIN:-$root/target/release/lors-lm}"
[[ -x "$bin" ]] || { echo "error: $bin not found: cargo build --release --features mpi" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "error: mpirun not found (apt install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sets=(--set "train.max_steps=$steps" --set train.warmup_steps=2 --set train.eval_interval=100000
      --set train.ckpt_interval=0 --set train.log_interval=100000 "$@")

# Mean tokens/s, ms/step and all-reduce ms over steps > 5 of a run's metrics.jsonl.
summarise() {
    python3 - "$1/metrics.jsonl" "$2" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "loss" in r and r["step"] > 5]
ms = sum(r["ms"] for r in steps) / len(steps)
tok = sum(r["tokens_per_sec"] for r in steps) / len(steps)
ar = [r["allreduce_ms"] for r in steps if "allreduce_ms" in r]
share = f"{100 * sum(ar) / sum(r['ms'] for r in steps):5.1f} %" if ar else "    –  "
print(f"{sys.argv[2]:<22} {tok:>10.0f} {ms:>10.1f} {share:>14}")
EOF
}

echo "config $config, $steps steps (means over steps 6..$steps), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-22s %10s %10s %14s\n' "layout" "tokens/s" "ms/step" "all-reduce"
RAYON_NUM_THREADS=2 "$bin" train --config "$config" --data "$data" --out "$tmp/one" --quiet "${sets[@]}" >/dev/null
summarise "$tmp/one" "1 rank × 2 threads"
mpirun --oversubscribe -n 2 -x RAYON_NUM_THREADS=1 \
    "$bin" train --config "$config" --data "$data" --out "$tmp/two" --quiet "${sets[@]}" >/dev/null
summarise "$tmp/two" "2 ranks × 1 thread"
python3 - "$tmp/two/metrics.jsonl" <<'EOF'
import json, sys
r = next(json.loads(l) for l in open(sys.argv[1]) if "allreduce_bytes_per_step" in l)
print(f"all-reduce {r['allreduce_bytes_per_step']} B/step per rank "
      f"(vanilla at these dimensions {r['vanilla_allreduce_bytes_per_step']} B); "
      f"global batch {r['global_batch_sequences']} sequences, {r['tokens_per_step']} tokens/step")
EOF
