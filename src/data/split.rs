//! The validation split: whole documents, chosen by a seeded hash of their text, so that the
//! choice depends on nothing but the document (adding documents moves none of the others).
//!
//! A document's *key* is the first 8 bytes, read big-endian, of
//! `SHA-256(seed as 8 little-endian bytes ‖ the document's bytes)` ([`doc_key`]).
//!
//! - `--val-fraction F`: a document is a validation document when its key is below
//!   `F × 2^64` (truncated). When no document's key is (a corpus of a few documents), the
//!   document with the smallest key is the validation split.
//! - `--val-docs N`: the N documents with the smallest keys (documents with equal text have
//!   equal keys and go together, so exact duplicates never straddle the split).
//! - A corpus of a single document (one `.txt` file, say) cannot be split into documents:
//!   its last `F` of bytes (cut at a line end where one is near) is the validation split,
//!   and each part is a document of its own split.
use std::collections::BinaryHeap;

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

/// The `--split-seed` used when none is given.
pub const DEFAULT_SPLIT_SEED: u64 = 0;

/// The split key of a document (see the module docs).
pub fn doc_key(seed: u64, text: &[u8]) -> u64 {
    let mut h = KeyHasher::new(seed);
    h.update(text);
    h.finish()
}

/// [`doc_key`] over text that arrives in parts.
#[derive(Clone)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    pub fn new(seed: u64) -> KeyHasher {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        KeyHasher(h)
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> u64 {
        let d = self.0.finalize();
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    }
}

/// How the validation documents are asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SplitRule {
    /// `--val-fraction F`.
    Fraction(f64),
    /// `--val-docs N`.
    Docs(u64),
}

/// The split decided after the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Documents whose key is at most `max_key` go to validation.
    Keys { max_key: Option<u64> },
    /// One document: bytes from `cut` on go to validation.
    Tail { cut: u64 },
}

impl Split {
    /// Whether a (multi-document corpus's) document goes to validation.
    pub fn is_val(&self, key: u64) -> bool {
        match *self {
            Split::Keys { max_key } => max_key.is_some_and(|m| key <= m),
            Split::Tail { .. } => false,
        }
    }
}

/// Keys below this are validation keys under `--val-fraction f` (0 means none).
pub fn fraction_threshold(f: f64) -> u64 {
    // f × 2^64 is exact in f64 (a power-of-two scale); `as` truncates (and saturates at 1.0).
    (f * 18_446_744_073_709_551_616.0) as u64
}

/// Watches the keys of every document during the scan, then decides the [`Split`].
pub struct SplitPlanner {
    rule: SplitRule,
    documents: u64,
    /// Documents below the fraction threshold.
    below: u64,
    min_key: Option<u64>,
    /// The N smallest keys (a max-heap), for `--val-docs N`.
    smallest: BinaryHeap<u64>,
}

impl SplitPlanner {
    pub fn new(rule: SplitRule) -> SplitPlanner {
        SplitPlanner { rule, documents: 0, below: 0, min_key: None, smallest: BinaryHeap::new() }
    }

    /// One document's key.
    pub fn observe(&mut self, key: u64) {
        self.documents += 1;
        self.min_key = Some(self.min_key.map_or(key, |m| m.min(key)));
        match self.rule {
            SplitRule::Fraction(f) => self.below += u64::from(key < fraction_threshold(f)),
            SplitRule::Docs(n) => {
                if (self.smallest.len() as u64) < n {
                    self.smallest.push(key);
                } else if self.smallest.peek().is_some_and(|&top| key < top) {
                    self.smallest.pop();
                    self.smallest.push(key);
                }
            }
        }
    }

    /// The split for the documents seen; `single_doc_bytes` is the length of the only
    /// document when there is exactly one. Also a line saying what was chosen.
    pub fn finish(&self, single_doc_bytes: Option<u64>) -> Result<(Split, String)> {
        let d = self.documents;
        if d == 0 {
            bail!("no documents to split");
        }
        match self.rule {
            SplitRule::Fraction(f) if d == 1 => {
                let len = single_doc_bytes.unwrap_or(0);
                let cut = len - ((len as f64 * f).round() as u64).min(len);
                if cut == 0 || cut == len {
                    bail!(
                        "the corpus is too small: one document of {len} bytes, whose last {f} would leave a split \
                         empty; add text or change --val-fraction"
                    );
                }
                Ok((
                    Split::Tail { cut },
                    format!("one document: its last {:.1} % of bytes is the validation split", 100.0 * f),
                ))
            }
            SplitRule::Fraction(f) if self.below == 0 => Ok((
                Split::Keys { max_key: self.min_key },
                format!(
                    "no document of {d} has a key below --val-fraction {f}: the one with the smallest key is the \
                     validation split"
                ),
            )),
            SplitRule::Fraction(f) => {
                if self.below == d {
                    bail!("every one of the {d} documents fell into the validation split (--val-fraction {f}): lower it or add documents");
                }
                let t = fraction_threshold(f);
                Ok((
                    Split::Keys { max_key: Some(t - 1) },
                    format!("{} of {d} documents are the validation split (key below --val-fraction {f})", self.below),
                ))
            }
            SplitRule::Docs(n) => {
                if n >= d {
                    bail!(
                        "--val-docs {n} leaves no training documents: the corpus has {d} document(s){}",
                        if d == 1 { "; --val-fraction splits a single document by its tail" } else { "" }
                    );
                }
                Ok((
                    Split::Keys { max_key: self.smallest.peek().copied() },
                    format!("the {n} of {d} documents with the smallest keys are the validation split (--val-docs)"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sha256_prefixes() {
        // SHA-256 of 8 zero bytes followed by "abc", first 8 bytes; python:
        // int.from_bytes(hashlib.sha256((0).to_bytes(8, "little") + b"abc").digest()[:8], "big")
        let mut h = Sha256::new();
        h.update([0u8; 8]);
        h.update(b"abc");
        let d = h.finalize();
        assert_eq!(doc_key(0, b"abc"), u64::from_be_bytes(d[..8].try_into().unwrap()));
        let mut k = KeyHasher::new(7);
        k.update(b"ab");
        k.update(b"c");
        assert_eq!(k.finish(), doc_key(7, b"abc"));
        assert_ne!(doc_key(7, b"abc"), doc_key(0, b"abc"));
        assert_eq!(fraction_threshold(0.5), 1 << 63);
        assert_eq!(fraction_threshold(1.0), u64::MAX);
    }

    #[test]
    fn rules() {
        let keys: Vec<u64> = (0..100u64).map(|i| doc_key(0, &i.to_le_bytes())).collect();
        let mut p = SplitPlanner::new(SplitRule::Fraction(0.1));
        keys.iter().for_each(|&k| p.observe(k));
        let (split, _) = p.finish(None).unwrap();
        let val = keys.iter().filter(|&&k| split.is_val(k)).count();
        assert!((3..=20).contains(&val), "{val}");

        let mut p = SplitPlanner::new(SplitRule::Docs(7));
        keys.iter().for_each(|&k| p.observe(k));
        let (split, _) = p.finish(None).unwrap();
        let mut sorted = keys.clone();
        sorted.sort();
        assert!(keys.iter().filter(|&&k| split.is_val(k)).count() == 7);
        assert!(split.is_val(sorted[6]) && !split.is_val(sorted[7]));

        // Two documents, neither below 1 %: the smaller key is validation.
        let mut p = SplitPlanner::new(SplitRule::Fraction(1e-9));
        p.observe(keys[0]);
        p.observe(keys[1]);
        let (split, _) = p.finish(None).unwrap();
        assert!(split.is_val(keys[0].min(keys[1])) && !split.is_val(keys[0].max(keys[1])));

        // One document: its tail.
        let mut p = SplitPlanner::new(SplitRule::Fraction(0.25));
        p.observe(keys[0]);
        assert_eq!(p.finish(Some(1000)).unwrap().0, Split::Tail { cut: 750 });
        let mut p = SplitPlanner::new(SplitRule::Docs(1));
        p.observe(keys[0]);
        assert!(p.finish(Some(1000)).is_err());
    }
}
