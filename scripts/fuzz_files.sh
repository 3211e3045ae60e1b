#!/usr/bin/env bash
# Hostile files, measured (issue 30): the seeded mutation fuzzer of tests/fuzz.rs
# (hostile_files_are_refused_or_loaded_never_a_panic_or_a_hang) over a GGUF model, a
# checkpoint, a prepared data directory and a tokenizer.json, FUZZ_CASES (default 10,000) cases
# each, one process. Prints the table (cases loaded / refused / panics, slowest case, cases over
# 1 s) and the peak RSS, then checks the guarantees: zero panics (the test's own assertion),
# no case over 1 s, peak RSS under 256 MB. Exits non-zero if any fails.
#   bash scripts/fuzz_files.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-${FUZZ_CASES:-10000}}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "fuzzing $cases cases per file (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F))"
status=0
FUZZ_CASES="$cases" cargo test --release --locked --test fuzz hostile_files -- --nocapture --test-threads=1 \
    >"$log" 2>&1 || status=$?
grep -E '^\||^peak RSS|^test result|panicked|HANG|^[a-z]+ case [0-9]+:' "$log" || true
[ "$status" -eq 0 ] || { echo "FAIL: the fuzz test failed (panic, hang or error above)"; exit 1; }
slow=$(awk -F'|' '/^\| [A-Za-z]/ && $8+0 > 0 {n += $8} END {print n+0}' "$log")
rss=$(sed -n 's/^peak RSS of the fuzzing process: \([0-9]*\) MB/\1/p' "$log")
[ "$slow" -eq 0 ] || { echo "FAIL: $slow case(s) took over 1 s"; exit 1; }
[ -n "$rss" ] && [ "$rss" -lt 256 ] || { echo "FAIL: peak RSS ${rss:-unknown} MB (limit 256 MB)"; exit 1; }
echo "OK: no panic, no case over 1 s, peak RSS $rss MB < 256 MB"
