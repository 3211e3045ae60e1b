#!/usr/bin/env bash
# The prepared check for a GPU machine (issue 29): one call, about 8-10 minutes on an
# H100/H200, given the CUDA binary from scripts/build_cuda.sh and a prepared corpus.
#
#   bash scripts/gpu_check.sh [BIN] [DATA_DIR]
#        BIN      default target-cuda/release/lors-lm (a BIN.xz from build_cuda.sh is unpacked)
#        DATA_DIR default data/moby-4k
#   OUT=DIR      where everything goes (default ./gpu-check): logs, gpu_table.md, summary.md
#   DEVICE=cpu   a dry run of the same steps on the CPU with the CPU binary and shrunken models
#                (what can be checked without a GPU: the script itself, every command line)
#
# Every step runs even when an earlier one failed; each is reported (ok / FAILED / n/a) in the
# summary printed last, followed by the tables:
#  1. the GPU, driver and CUDA libraries the binary loads;
#  2. check-device (the same weights on CPU f32 and on the device: logits, loss, and loss after
#     one AdamW step) in f32, TF32 and bf16, each against its tolerance;
#  3. configs/gpu-100m.toml as LORS and as its vanilla twin, bf16, 60 steps: tokens/s, MFU
#     (PaLM formula, median step after warm-up), peak GPU memory (nvidia-smi every 100 ms,
#     CUDA context included) beside `lors-lm params`'s estimate of what the step's tensors hold,
#     final loss; and LORS in f32 for the loss against bf16;
#  4. PyTorch on the same model and device (scripts/bench_vs_torch.py --torch-only), eager and
#     torch.compile, bf16 autocast: tokens/s beside ours, as a ratio;
#  5. greedy generation on the device equals the CPU's, for a tiny run trained on the CPU (f32);
#  6. data-parallel NCCL at world size 1 (`lors-lm launch --nproc 1`: the TCP host link, NCCL
#     on the device): its losses against the same run as a plain process;
#  7. a profile of a few training steps: nsys if present (top 10 kernels by time).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/target-cuda/release/lors-lm}"
data="${2:-$root/data/moby-4k}"
out="${OUT:-$root/gpu-check}"
dev="${DEVICE:-cuda}"
mkdir -p "$out"
if [[ ! -x "$bin" && -f "$bin.xz" ]]; then
    xz -dc "$bin.xz" > "$out/lors-lm" && chmod +x "$out/lors-lm"
    bin="$out/lors-lm"
fi
bin="$(realpath "$bin")"
cd "$root"
py="$(command -v python3 || command -v python)"

# The model of steps 2-4 and 7: gpu-100m on a GPU; on the CPU dry run a tiny model of the
# same shape family, so that every command runs in seconds.
big=(--config configs/gpu-100m.toml)
steps=60
if [[ "$dev" == cpu ]]; then
    big+=(--set model.d_model=64 --set model.n_heads=4 --set model.n_layers=2 --set model.ffn_hidden=172
          --set lors.rank=4 --set train.batch_size=2 --set train.seq_len=64 --set train.warmup_steps=2
          --set train.log_interval=1)
    steps=6
fi
small=("${big[@]}" --set model.n_layers=2 --set train.batch_size=4 --set train.seq_len=128)

summary=()
# step NAME COMMAND...: runs it, logs ok / FAILED (rc) and its seconds; never stops the script.
step() {
    local name="$1"
    shift
    echo
    echo "== $name"
    local t0=$SECONDS rc=0
    "$@" || rc=$?
    local took=$((SECONDS - t0))
    case $rc in
        0) summary+=("| $name | ok | ${took} s |") ;;
        99) summary+=("| $name | n/a: $(cat "$out/.na" 2>/dev/null) | ${took} s |") ;;
        *) summary+=("| $name | **FAILED** (rc $rc) | ${took} s |") ;;
    esac
}
na() { echo "$*" > "$out/.na"; echo "n/a: $*"; return 99; }

gpu_info() {
    echo "date: $(date -u +%FT%TZ), commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), binary: $bin"
    "$bin" --version
    [[ "$dev" == cpu ]] && { na "CPU dry run"; return; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || return 1
    nvidia-smi | head -4
    # The binary links CUDA 13's libcublas/libcublasLt/libcurand/libnvrtc/libcudart: find them
    # in the machine's Python packages (PyTorch ships them under nvidia/), else trust ld.so.
    local libdirs
    libdirs="$("$py" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13",
        "libnccl.so.2"]
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
    ldd "$bin" | grep -E 'libcuda|cublas|curand|nvrtc|cudart|nccl' || true
    if ldd "$bin" | grep -q 'not found'; then
        echo "error: the binary cannot find its CUDA libraries (see 'not found' above)" >&2
        return 1
    fi
}

check() { # check NAME SETS...
    local name="$1"
    shift
    "$bin" check-device "${small[@]}" --device "$dev" "$@" | tee "$out/check_$name.txt"
}

# train_run NAME SETS...: gpu-100m (or its dry-run twin) for $steps steps, memory sampled.
train_run() {
    local name="$1"
    shift
    local run="$out/runs/$name" poller=""
    rm -rf "$run"
    if [[ "$dev" != cpu ]]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/mem_$name.txt" &
        poller=$!
    fi
    "$bin" params "${big[@]}" --data "$data" "$@" --json > "$out/estimate_$name.json" 2>/dev/null || true
    local rc=0
    "$bin" train "${big[@]}" --data "$data" --out "$run" --device "$dev" --set "train.max_steps=$steps" "$@" \
        > "$out/train_$name.log" 2>&1 || rc=$?
    [[ -n "$poller" ]] && { kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null; }
    tail -5 "$out/train_$name.log"
    return $rc
}

torch_ref() {
    "$py" -c 'import torch' 2>/dev/null || [[ -n "${TORCH_PYTHON:-}" ]] || { na "no PyTorch in $py"; return; }
    local p="${TORCH_PYTHON:-$py}" sets=()
    [[ "$dev" == cpu ]] && sets=(--steps 3 --warmup 1)
    # The same model (the dry run's shrunken one is written to a config of its own).
    "$p" scripts/bench_vs_torch.py --torch-only --device "$dev" --dtype bf16 --compile --steps 20 --warmup 5 \
        "${sets[@]}" --vocab-size "$("$py" -c "import json;print(json.load(open('$data/meta.json'))['vocab_size'])")" \
        "$(torch_config)" | tee "$out/torch.jsonl"
    grep -q '"torch_tokens_per_sec": [0-9]' "$out/torch.jsonl"
}

# The model of step 3 as a TOML file for PyTorch (the dry run's overrides applied).
torch_config() {
    local cfg="$out/torch_model.toml"
    "$py" - "${big[@]}" > "$cfg" <<'PY'
import json, sys, tomllib
args = sys.argv[1:]
cfg = tomllib.load(open(args[1], "rb"))
for i, a in enumerate(args):
    if a == "--set":
        key, val = args[i + 1].split("=", 1)
        sec, k = key.split(".")
        cfg[sec][k] = tomllib.loads(f"v = {val}")["v"]
def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)  # strings, numbers and lists of them are valid TOML this way
for sec, kv in cfg.items():
    print(f"[{sec}]")
    for k, v in kv.items():
        print(f"{k} = {value(v)}")
PY
    echo "$cfg"
}

generate_same() {
    local run="$out/runs/tiny-cpu"
    rm -rf "$run"
    "$bin" train --config configs/tiny.toml --data "$data" --out "$run" --set train.max_steps=30 \
        --set 'train.dtype="f32"' > "$out/train_tiny.log" 2>&1 || { tail -5 "$out/train_tiny.log"; return 1; }
    local gen=(generate --run "$run" --prompt "The whale" --max-new-tokens 48 --temperature 0 --json)
    "$bin" "${gen[@]}" --device cpu > "$out/generate_cpu.json" || return 1
    "$bin" "${gen[@]}" --device "$dev" > "$out/generate_$dev.json" || return 1
    "$py" - "$out/generate_cpu.json" "$out/generate_$dev.json" <<'PY'
import json, sys
a, b = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:3])
key = "ids" if "ids" in a else "text"
same = a[key] == b[key]
print(f"greedy, 48 tokens: CPU and device {'equal' if same else 'DIFFER'} ({key})")
if not same:
    print("cpu:   ", a[key]); print("device:", b[key])
sys.exit(0 if same else 1)
PY
}

nccl_one() {
    local plain="$out/runs/dp-plain" one="$out/runs/dp-one"
    rm -rf "$plain" "$one"
    local args=(train --config configs/tiny.toml --data "$data" --device "$dev" --set train.max_steps=20
                --set train.eval_interval=10 --set 'train.dtype="f32"' --set train.tf32=false)
    "$bin" "${args[@]}" --out "$plain" > "$out/dp_plain.log" 2>&1 || { tail -5 "$out/dp_plain.log"; return 1; }
    "$bin" launch --nproc 1 -- "${args[@]}" --out "$one" > "$out/dp_one.log" 2>&1 || { tail -5 "$out/dp_one.log"; return 1; }
    grep -E '^ranks ' "$out/dp_one.log" | head -1
    "$py" - "$plain/metrics.jsonl" "$one/metrics.jsonl" <<'PY' || return 1
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:3])
d = max(abs(x - y) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
print(f"world size 1 vs a plain process: {len(b)} / {len(a)} step losses, max |Δ| = {d:.3g}")
sys.exit(0 if d <= 1e-5 else 1)
PY
    if [[ "$dev" != cpu ]] && ! grep -q 'gradients averaged by NCCL' "$out/dp_one.log"; then
        na "this binary has no NCCL (build it with scripts/build_cuda.sh, not --no-nccl): the host all-reduce ran"
    fi
}

profile() {
    command -v nsys > /dev/null || { na "nsys not installed"; return; }
    nsys profile --force-overwrite true --stats=false -o "$out/profile" \
        "$bin" train "${big[@]}" --data "$data" --out "$out/runs/profile" --device "$dev" --set train.max_steps=12 \
        > "$out/profile.log" 2>&1 || return 1
    nsys stats --report cuda_gpu_kern_sum --format csv "$out/profile.nsys-rep" > "$out/profile_kernels.csv" 2>/dev/null \
        || nsys stats --report gpukernsum --format csv "$out/profile.nsys-rep" > "$out/profile_kernels.csv" || return 1
    head -12 "$out/profile_kernels.csv"
}

step "1. device, driver, libraries" gpu_info
step "2a. check-device f32" check f32 --set 'train.dtype="f32"' --set train.tf32=false
step "2b. check-device TF32" check tf32 --set 'train.dtype="f32"' --set train.tf32=true
step "2c. check-device bf16" check bf16 --set 'train.dtype="bf16"'
step "3a. train LORS bf16" train_run lors-bf16 --set 'lors.mode="lors"' --set 'train.dtype="bf16"'
step "3b. train vanilla bf16" train_run vanilla-bf16 --set 'lors.mode="vanilla"' --set 'train.dtype="bf16"'
step "3c. train LORS f32" train_run lors-f32 --set 'lors.mode="lors"' --set 'train.dtype="f32"' --set train.tf32=false
step "4. PyTorch eager and torch.compile, same model" torch_ref
step "5. greedy generate: device = CPU" generate_same
step "6. NCCL, world size 1" nccl_one
step "7. profile" profile

# The tables: our runs, then PyTorch beside them.
"$py" - "$out" > "$out/gpu_table.md" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
rows = {}
print("| run | tokens/step | tokens/s | MFU | step ms | peak GPU memory (MiB) | `params` estimate (MiB) | final loss |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name in ["lors-bf16", "vanilla-bf16", "lors-f32"]:
    m = os.path.join(out, "runs", name, "metrics.jsonl")
    if not os.path.exists(m):
        print(f"| {name} | – | – | – | – | – | – | (no metrics: the step failed) |")
        continue
    steps = [json.loads(l) for l in open(m) if '"ms"' in l]
    if not steps:
        print(f"| {name} | – | – | – | – | – | – | (no steps logged) |")
        continue
    late = steps[len(steps) // 5:] or steps  # after warm-up
    tps = statistics.median(s["tokens_per_sec"] for s in late)
    # MFU is logged against the device's peak; the CPU has none ("–" in the dry run).
    mfus = [s["mfu"] for s in late if "mfu" in s]
    mfu = f"{100 * statistics.median(mfus):.1f} %" if mfus else "–"
    ms = statistics.median(s["ms"] for s in late)
    tokens = steps[-1]["tokens"] // steps[-1]["step"]
    mem = os.path.join(out, f"mem_{name}.txt")
    peak = max((int(x) for x in open(mem).read().split() if x.strip().isdigit()), default=0) if os.path.exists(mem) else "–"
    rows[name] = tps
    est = os.path.join(out, f"estimate_{name}.json")
    try:
        est = f"{json.load(open(est))['train_memory_bytes']['total'] / 2**20:,.0f}"
    except Exception:
        est = "–"
    print(f"| {name} | {tokens} | {tps:,.0f} | {mfu} | {ms:.1f} | {peak} | {est} | {steps[-1]['loss']:.4f} |")
if "lors-bf16" in rows and "vanilla-bf16" in rows:
    print(f"\nLORS / vanilla tokens/s (bf16): {rows['lors-bf16'] / rows['vanilla-bf16']:.3f}")
tj = os.path.join(out, "torch.jsonl")
if os.path.exists(tj):
    print("\n| PyTorch | mode | tokens/s | peak memory (MiB) | lors-lm / PyTorch |")
    print("|---|---|---:|---:|---:|")
    for l in open(tj):
        if not l.startswith("{"):
            continue
        r = json.loads(l)
        ours = rows.get(f"{r['mode']}-bf16")
        kind = "torch.compile" if r["compiled"] else "eager"
        if r["torch_tokens_per_sec"] is None:
            print(f"| {kind} | {r['mode']} | failed: {r['error']} | | |")
            continue
        ratio = f"{ours / r['torch_tokens_per_sec']:.2f}×" if ours else "–"
        mem = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") else "–"
        print(f"| {kind} | {r['mode']} | {r['torch_tokens_per_sec']:,.0f} | {mem} | {ratio} |")
PY

{
    echo "| step | result | time |"
    echo "|---|---|---:|"
    printf '%s\n' "${summary[@]}"
} > "$out/summary.md"
echo
echo "== summary ($out)"
cat "$out/summary.md"
echo
cat "$out/gpu_table.md"
