#!/usr/bin/env python3
"""Cross-entropy of an add-one-smoothed unigram model (fit on train.bin) on val.bin: the loss
a model that ignores context would reach. Usage: scripts/unigram_baseline.py DATA_DIR"""
import collections, json, math, struct, sys

d = sys.argv[1] if len(sys.argv) > 1 else "data/moby-4k"
meta = json.load(open(f"{d}/meta.json"))
fmt, size = ("H", 2) if meta["dtype"] == "u16" else ("I", 4)
def load(split):
    b = open(f"{d}/{split}.bin", "rb").read()
    return struct.unpack(f"<{len(b) // size}{fmt}", b)
train, val = load("train"), load("val")
counts, n, v = collections.Counter(train), len(train), meta["vocab_size"]
ce = -sum(math.log((counts[t] + 1) / (n + v)) for t in val) / len(val)
print(f"unigram val loss {ce:.3f} (ppl {math.exp(ce):.1f}) on {d}")
