"""Reading `lors-lm prepare`'s token shards from Python, standard library only (the layout is
src/data/shards.rs's; that module is the one that writes them).

A shard: `LORSTOKS`, format version (u32), bytes per token (u32: 2 or 4), token count n (u64),
document count d (u64), then n token ids and d document ends (u64, exclusive, in tokens from
the shard's start), all little-endian. The file is exactly that long; like the Rust reader,
this refuses anything else before it slices a byte.
"""
import json
import sys
from array import array
from pathlib import Path

MAGIC = b"LORSTOKS"
HEADER = 32


def _shard(path):
    """(ids, ends) of one shard file, after checking its header against its size."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER or raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a lors-lm token shard (no LORSTOKS header)")
    width = int.from_bytes(raw[12:16], "little")
    n = int.from_bytes(raw[16:24], "little")
    d = int.from_bytes(raw[24:32], "little")
    if width not in (2, 4):
        raise ValueError(f"{path}: {width} bytes per token (expected 2 or 4)")
    if len(raw) != HEADER + n * width + 8 * d:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header says {n} tokens and {d} documents")
    ids = array("H" if width == 2 else "I")
    ends = array("Q")
    if ids.itemsize != width or ends.itemsize != 8:
        raise RuntimeError("this Python's array item sizes do not match the shard layout")
    ids.frombytes(raw[HEADER:HEADER + n * width])
    ends.frombytes(raw[HEADER + n * width:])
    if sys.byteorder != "little":
        ids.byteswap()
        ends.byteswap()
    prev = 0
    for e in ends:
        if e < prev or e > n:
            raise ValueError(f"{path}: document ends are not increasing within the {n} tokens")
        prev = e
    return ids, ends


def documents(out, split):
    """Yields each document of `split` ("train" or "val") of the prepared directory `out` as an
    array of token ids, in order; a document continued from one shard into the next comes whole."""
    meta = json.loads((Path(out) / "meta.json").read_text())
    carry = None
    for s in meta["shards"][split]:
        ids, ends = _shard(Path(out) / s["file"])
        prev = 0
        for e in ends:
            doc = ids[prev:e]
            if carry is not None:
                doc, carry = carry + doc, None
            yield doc
            prev = e
        if prev < len(ids):
            carry = ids[prev:] if carry is None else carry + ids[prev:]
