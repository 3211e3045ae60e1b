#!/usr/bin/env python3
"""Inference benchmark of docs/performance.md ("Inference"): `lors-lm bench --decode` over a
grid of model sizes, vanilla merged against LORS merged and LORS factored, batch 1 and 8,
prompt 64 / decode 128 tokens, random weights (configs/bench-decode.toml: one shared base for
all layers plus private factors of rank d/32).

    cargo build --release --locked
    python3 scripts/bench_decode.py                    # the grid of the doc (~20 min, 2 cores)
    python3 scripts/bench_decode.py --grid quick       # two small sizes, a minute or two

Every (mode, weights, batch) row of every round runs in its own process (bench --decode does
that), rounds alternate the rows. The script prints the machine header bench --decode writes
(cache sizes from sysfs, read bandwidth at 1 MiB / 16 MiB / 1 GiB), then a Markdown table:
medians over rounds, and decode speed as a ratio to vanilla merged at the same size and batch
(ratio of the medians, all from this one run). The JSON lines go to --out.

Only the Python standard library is needed.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (d_model, n_layers, rounds): the range, d_model 256 to 2048 and 8 to 24 layers, in
# about 20 minutes on the 2-core VM. The two largest run one round: a d_model 2048, 8-layer
# model is 1.6 GB of f32 weights, about a minute per row from DRAM. (2048 x 24, 4.8 GB, three
# times that per row and 5 GB of RAM per process, is left out.)
GRIDS = {
    "full": [(256, 8, 2), (256, 24, 2), (512, 16, 2), (1024, 8, 1), (2048, 8, 1)],
    "quick": [(256, 8, 1), (512, 8, 1)],
}


def ffn_hidden(d):
    """About 8/3 d, rounded up to a multiple of 16."""
    return -(-(8 * d // 3) // 16) * 16


def sets(d, layers):
    return {
        "model.d_model": d,
        "model.n_layers": layers,
        "model.n_heads": d // 64,
        "model.ffn_hidden": ffn_hidden(d),
        "lors.rank": d // 32,
    }


def human(b):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if b >= size:
            return f"{b / size:.1f} {unit}" if unit == "GiB" else f"{b / size:.0f} {unit}"
    return f"{b / 1024:.0f} KiB"


def run_one(binary, d, layers, rounds, args):
    cmd = [str(binary), "bench", "--decode", "--json", "--config", str(ROOT / "configs/bench-decode.toml")]
    for k, v in sets(d, layers).items():
        cmd += ["--set", f"{k}={v}"]
    cmd += ["--modes", "vanilla,lors", "--batches", "1,8", "--rounds", str(args.rounds or rounds)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    print(f"d_model {d}, {layers} layers: {len(rows)} rows in {time.time() - t:.0f} s", file=sys.stderr)
    header = [line for line in p.stderr.splitlines() if line.startswith(("caches", "read bandwidth"))]
    return rows, header


def table(rows):
    out = [
        "| d_model | layers | mode | weights | batch | decode tok/s | vs vanilla | prompt tok/s | peak RSS MB "
        "| weights read/token | distinct | auto picks |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = next(
            x
            for x in rows
            if (x["d_model"], x["n_layers"], x["batch"], x["mode"], x["weights"])
            == (r["d_model"], r["n_layers"], r["batch"], "vanilla", "merged")
        )
        ratio = r["decode_tokens_per_sec"] / base["decode_tokens_per_sec"]
        # Bytes per generated token: one step reads the weights once for the whole batch.
        per_token = r["weight_bytes_read"] / r["batch"]
        rss = r["peak_rss_mb"]
        out.append(
            f"| {r['d_model']} | {r['n_layers']} | {r['mode']} | {r['weights']} | {r['batch']} "
            f"| {r['decode_tokens_per_sec']:.1f} | {ratio:.2f}x | {r['prompt_tokens_per_sec']:.0f} "
            f"| {'-' if rss is None else f'{rss:.0f}'} | {human(per_token)} | {human(r['weight_bytes_distinct'])} "
            f"| {r['auto'] if r['mode'] != 'vanilla' else '-'} |"
        )
    return "\n".join(out)


def summary(rows):
    """The issue's goal figures, per size: factored vs vanilla at batch 1 (speed, peak RSS) and,
    where auto picks factored, factored vs LORS merged."""
    out = []
    sizes = sorted({(r["d_model"], r["n_layers"]) for r in rows})
    for d, layers in sizes:
        pick = lambda mode, w, b: next(  # noqa: E731
            r
            for r in rows
            if (r["d_model"], r["n_layers"], r["mode"], r["weights"], r["batch"]) == (d, layers, mode, w, b)
        )
        v, f, m = pick("vanilla", "merged", 1), pick("lors", "factored", 1), pick("lors", "merged", 1)
        line = (
            f"- d_model {d}, {layers} layers: vanilla weights {human(v['weight_bytes_distinct'])}, LORS unique "
            f"{human(f['weight_bytes_distinct'])}; batch 1 factored/vanilla decode "
            f"{f['decode_tokens_per_sec'] / v['decode_tokens_per_sec']:.2f}x"
        )
        if f["peak_rss_mb"] and v["peak_rss_mb"]:
            line += f", peak RSS {f['peak_rss_mb'] / v['peak_rss_mb']:.2f}x"
        for b in (1, 8):
            fb, mb = pick("lors", "factored", b), pick("lors", "merged", b)
            line += (
                f"; batch {b} factored/merged {fb['decode_tokens_per_sec'] / mb['decode_tokens_per_sec']:.2f}x"
            )
        line += f"; auto picks {m['auto']}"
        out.append(line)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--rounds", type=int, help="rounds per size [default: the grid's]")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--bin", default=str(ROOT / "target/release/lors-lm"))
    ap.add_argument("--out", default="bench_decode.jsonl", help="JSON lines of every row")
    args = ap.parse_args()
    rows, header = [], []
    t = time.time()
    for d, layers, rounds in GRIDS[args.grid]:
        r, h = run_one(args.bin, d, layers, rounds, args)
        rows += r
        header = header or h
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(header))
    rounds = sorted({r["rounds"] for r in rows})
    print(f"rounds {'/'.join(map(str, rounds))}, prompt {args.prompt_tokens} / decode {args.gen_tokens} tokens, "
          f"{rows[0]['threads']} threads, matmul {rows[0]['matmul']}; {time.time() - t:.0f} s in all\n")
    print(table(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
