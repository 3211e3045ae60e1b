//! Token shards: the one module that writes and reads them.
//!
//! A shard holds a run of whole documents' tokens of one split, with a small header and a
//! document index (all integers little-endian):
//!
//! | offset            | size       | field                                                        |
//! |-------------------|------------|--------------------------------------------------------------|
//! | 0                 | 8          | magic `LORSTOKS`                                             |
//! | 8                 | 4          | format version (u32, [`SHARD_VERSION`])                      |
//! | 12                | 4          | bytes per token (u32: 2 = u16 ids, 4 = u32 ids)              |
//! | 16                | 8          | token count `n` (u64)                                        |
//! | 24                | 8          | document count `d` (u64)                                     |
//! | 32                | `n × 2/4`  | the token ids                                                |
//! | 32 + `n × 2/4`    | `d × 8`    | document index: where each document ends (u64, exclusive, in tokens from the shard's start) |
//!
//! The file is exactly that long; a reader refuses anything else (wrong magic, another version
//! or dtype, a size that does not match the counts, an index that is not increasing). A
//! document that continues from the previous shard (only a `.txt` file larger than a shard
//! does) has its end in the later shard; tokens after the last end continue in the next shard.
//!
//! A shard is written through a hidden temp file (`.NAME.tmp`) that is renamed into place
//! once complete and synced, so a reader never sees half of one. `meta.json` lists each
//! shard with its counts and SHA-256 ([`ShardInfo`]).
//!
//! Directories written before shards existed (`format_version` 1) hold one headerless file per
//! split (`train.bin`, `val.bin`); [`Shard::open_raw`] reads such a file as one shard without
//! a document index.
use std::fs;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The resume state's file name in a `prepare --out` directory (written by `resume.rs`; its
/// presence without meta.json marks an unfinished prepare).
pub const STATE_FILE: &str = "prepare-state.json";
/// First 8 bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"LORSTOKS";
/// Version of the shard layout written (and the only one read).
pub const SHARD_VERSION: u32 = 1;
/// Size of the shard header in bytes.
pub const HEADER_BYTES: usize = 32;

/// Element type of token ids on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub(super) fn parse(s: &str) -> Result<Dtype> {
        match s {
            "u16" => Ok(Dtype::U16),
            "u32" => Ok(Dtype::U32),
            other => bail!("unknown token dtype {other:?} (expected \"u16\" or \"u32\")"),
        }
    }
    pub(super) fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    pub(super) fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "u16",
            Dtype::U32 => "u32",
        }
    }
    pub(super) fn bytes(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    pub(super) fn max_vocab(self) -> usize {
        match self {
            Dtype::U16 => 1 << 16,
            Dtype::U32 => 1 << 32,
        }
    }
    fn from_width(width: u32) -> Option<Dtype> {
        match width {
            2 => Some(Dtype::U16),
            4 => Some(Dtype::U32),
            _ => None,
        }
    }
}

/// Decodes little-endian ids of `dtype` into `out` (appending).
pub(super) fn decode_into(bytes: &[u8], dtype: Dtype, out: &mut Vec<u32>) {
    match dtype {
        Dtype::U16 => out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)),
        Dtype::U32 => out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
    }
}

/// Largest id in little-endian ids of `dtype` (0 when empty), scanned in parallel.
pub(super) fn max_id(bytes: &[u8], dtype: Dtype) -> u32 {
    use rayon::prelude::*;
    let w = dtype.bytes();
    let block = (1 << 20) * w;
    bytes
        .par_chunks(block)
        .map(|b| match dtype {
            Dtype::U16 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).max().unwrap_or(0) as u32,
            Dtype::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).max().unwrap_or(0),
        })
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Names and meta.json entries
// ---------------------------------------------------------------------------------------------

/// One shard as `meta.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name in the prepared directory, e.g. `train-00000.bin`.
    pub file: String,
    /// Number of tokens.
    pub tokens: u64,
    /// Number of documents that end in this shard.
    pub documents: u64,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
}

/// The file name of shard `index` of `split`: `train-00000.bin`, `val-00003.bin`, ….
pub fn shard_name(split: &str, index: usize) -> String {
    format!("{split}-{index:05}.bin")
}

/// Whether `name` is a shard file name ([`shard_name`] of "train" or "val", any index).
pub fn is_shard_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".bin") else { return false };
    let digits = stem.strip_prefix("train-").or_else(|| stem.strip_prefix("val-"));
    digits.is_some_and(|d| d.len() >= 5 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// SHA-256 of a file's bytes, lowercase hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("could not read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Writes one shard: tokens and document ends are streamed to a hidden temp file, and
/// [`ShardWriter::finish`] writes the index and header and renames the file into place.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<fs::File>,
    dtype: Dtype,
    tokens: u64,
    doc_ends: Vec<u64>,
}

impl ShardWriter {
    /// Starts `path` (its temp file); `dtype` is "u16" or "u32".
    pub(super) fn create(path: &Path, dtype: Dtype) -> Result<ShardWriter> {
        let tmp = crate::files::temp_path(path)?;
        let file = fs::File::create(&tmp).with_context(|| format!("could not create {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_BYTES]).with_context(|| format!("could not write {}", tmp.display()))?;
        Ok(ShardWriter { path: path.to_path_buf(), tmp, out, dtype, tokens: 0, doc_ends: Vec::new() })
    }

    /// Tokens written so far.
    pub(super) fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Appends token ids; an id that does not fit the dtype is an error.
    pub(super) fn push(&mut self, ids: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(ids.len() * self.dtype.bytes());
        match self.dtype {
            Dtype::U16 => {
                for &id in ids {
                    let v = u16::try_from(id)
                        .map_err(|_| anyhow::anyhow!("token id {id} does not fit u16 ({})", self.path.display()))?;
                    buf.extend_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::U32 => ids.iter().for_each(|id| buf.extend_from_slice(&id.to_le_bytes())),
        }
        self.out.write_all(&buf).with_context(|| format!("could not write {}", self.tmp.display()))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Marks the end of a document at the current position.
    pub(super) fn end_document(&mut self) {
        self.doc_ends.push(self.tokens);
    }

    /// Writes the index and header, syncs, renames the file into place and returns its entry.
    pub(super) fn finish(self) -> Result<ShardInfo> {
        let ShardWriter { path, tmp, mut out, dtype, tokens, doc_ends } = self;
        let result = (|| -> std::io::Result<()> {
            for end in &doc_ends {
                out.write_all(&end.to_le_bytes())?;
            }
            let mut file = out.into_inner().map_err(|e| e.into_error())?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&header(dtype, tokens, doc_ends.len() as u64))?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(err) = result {
            let _ = fs::remove_file(&tmp);
            return Err(err).with_context(|| format!("could not write {}", path.display()));
        }
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let sha256 = file_sha256(&path)?;
        Ok(ShardInfo { file, tokens, documents: doc_ends.len() as u64, sha256 })
    }

    /// Drops the unfinished shard (its temp file).
    pub(super) fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

fn header(dtype: Dtype, tokens: u64, documents: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(&SHARD_MAGIC);
    h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(dtype.bytes() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&tokens.to_le_bytes());
    h[24..32].copy_from_slice(&documents.to_le_bytes());
    h
}

/// Writes a whole shard at once (tests and synthetic data): `docs` are the document ends.
pub(super) fn write_shard(path: &Path, dtype: Dtype, tokens: &[u32], doc_ends: &[u64]) -> Result<ShardInfo> {
    let mut w = ShardWriter::create(path, dtype)?;
    let mut start = 0usize;
    for &end in doc_ends {
        let end = (end as usize).min(tokens.len());
        w.push(&tokens[start.min(end)..end])?;
        w.end_document();
        start = end;
    }
    w.push(&tokens[start.min(tokens.len())..])?;
    w.finish()
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// A memory-mapped shard (or an old headerless token file), checked on opening.
pub struct Shard {
    path: PathBuf,
    /// `None` for an empty file (which cannot be mapped on every platform).
    mmap: Option<memmap2::Mmap>,
    dtype: Dtype,
    tokens: usize,
    documents: usize,
    /// Byte offset of the first token.
    data_start: usize,
    /// Whether the file has a document index (format-1 files have none).
    indexed: bool,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("dtype", &self.dtype)
            .field("tokens", &self.tokens)
            .field("documents", &self.documents)
            .finish()
    }
}

const REDO: &str = "re-run `lors-lm prepare --force` (or `--resume` an unfinished one)";

fn map(path: &Path) -> Result<(Option<memmap2::Mmap>, u64)> {
    let file = fs::File::open(path).with_context(|| format!("could not open {}; {REDO}", path.display()))?;
    let len = file.metadata().with_context(|| format!("could not stat {}", path.display()))?.len();
    if len == 0 {
        return Ok((None, 0));
    }
    // SAFETY: the file is opened read-only; shards are written once (temp file + rename) and
    // never modified in place, which is the usual contract for mapped data.
    let mmap =
        unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("could not memory-map {}", path.display()))?;
    Ok((Some(mmap), len))
}

impl Shard {
    /// Opens a shard, checking its header against the file size and `dtype` (from meta.json).
    pub(super) fn open(path: &Path, dtype: Dtype) -> Result<Shard> {
        let (mmap, len) = map(path)?;
        let bytes = mmap.as_deref().unwrap_or(&[]);
        let bad = |what: String| anyhow::anyhow!("{} is not a valid token shard: {what}; {REDO}", path.display());
        if bytes.len() < HEADER_BYTES {
            return Err(bad(format!("{len} bytes, shorter than the {HEADER_BYTES}-byte header")));
        }
        if bytes[0..8] != SHARD_MAGIC {
            return Err(bad(format!(
                "wrong magic {:?} (expected \"LORSTOKS\")",
                String::from_utf8_lossy(&bytes[0..8])
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != SHARD_VERSION {
            return Err(bad(format!("format version {version}, this lors-lm reads version {SHARD_VERSION}")));
        }
        let width = u32_at(12);
        let file_dtype =
            Dtype::from_width(width).ok_or_else(|| bad(format!("{width} bytes per token (expected 2 or 4)")))?;
        if file_dtype != dtype {
            return Err(bad(format!("{} tokens, but meta.json says {}", file_dtype.name(), dtype.name())));
        }
        let (tokens, documents) = (u64_at(16), u64_at(24));
        let expected = tokens
            .checked_mul(width as u64)
            .and_then(|t| documents.checked_mul(8).and_then(|d| t.checked_add(d)))
            .and_then(|b| b.checked_add(HEADER_BYTES as u64));
        if expected != Some(len) {
            return Err(bad(format!(
                "its header says {tokens} tokens and {documents} documents ({} bytes), but the file holds {len} bytes",
                expected.map_or("too many".to_string(), |b| b.to_string())
            )));
        }
        let shard = Shard {
            path: path.to_path_buf(),
            mmap,
            dtype,
            tokens: usize::try_from(tokens).map_err(|_| bad("too large for this platform".into()))?,
            documents: usize::try_from(documents).map_err(|_| bad("too large for this platform".into()))?,
            data_start: HEADER_BYTES,
            indexed: true,
        };
        let mut prev = 0u64;
        for i in 0..shard.documents {
            let end = shard.doc_end(i);
            if end < prev || end > tokens {
                return Err(bad(format!(
                    "document {i} ends at token {end}, outside 0..={tokens} or before the previous end"
                )));
            }
            prev = end;
        }
        Ok(shard)
    }

    /// Opens an old headerless token file holding `expected` tokens of `dtype`.
    pub(super) fn open_raw(path: &Path, dtype: Dtype, expected: u64) -> Result<Shard> {
        let (mmap, len) = map(path)?;
        let expected_bytes = expected.checked_mul(dtype.bytes() as u64);
        if expected_bytes != Some(len) {
            bail!(
                "{} holds {len} bytes, but meta.json says {expected} {} tokens ({} bytes); \
                 the directory is inconsistent: {REDO}",
                path.display(),
                dtype.name(),
                expected_bytes.map_or("too many".to_string(), |b| b.to_string())
            );
        }
        let tokens =
            usize::try_from(expected).with_context(|| format!("{} is too large for this platform", path.display()))?;
        Ok(Shard { path: path.to_path_buf(), mmap, dtype, tokens, documents: 0, data_start: 0, indexed: false })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// True when the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Number of documents that end in the shard (None for an old file without an index).
    pub fn documents(&self) -> Option<usize> {
        self.indexed.then_some(self.documents)
    }

    /// The token bytes (little-endian ids).
    pub(super) fn token_bytes(&self) -> &[u8] {
        let all = self.mmap.as_deref().unwrap_or(&[]);
        &all[self.data_start..self.data_start + self.tokens * self.dtype.bytes()]
    }

    /// Where document `i` ends (exclusive, in tokens); `i < documents`.
    pub(super) fn doc_end(&self, i: usize) -> u64 {
        let all = self.mmap.as_deref().unwrap_or(&[]);
        let o = self.data_start + self.tokens * self.dtype.bytes() + 8 * i;
        u64::from_le_bytes(all[o..o + 8].try_into().expect("8 bytes"))
    }

    /// Appends tokens `[start, end)` to `out`; the caller keeps within bounds.
    pub(super) fn read_into(&self, start: usize, end: usize, out: &mut Vec<u32>) {
        let w = self.dtype.bytes();
        decode_into(&self.token_bytes()[start * w..end * w], self.dtype, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_round_trip_and_header_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(shard_name("train", 0));
        assert_eq!(path.file_name().unwrap(), "train-00000.bin");
        let tokens: Vec<u32> = (0..100).collect();
        let info = write_shard(&path, Dtype::U16, &tokens, &[10, 60, 100]).unwrap();
        assert_eq!((info.tokens, info.documents), (100, 3));
        assert_eq!(info.sha256, file_sha256(&path).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().len(), 32 + 200 + 24);
        let shard = Shard::open(&path, Dtype::U16).unwrap();
        assert_eq!((shard.len(), shard.documents()), (100, Some(3)));
        let mut out = Vec::new();
        shard.read_into(58, 63, &mut out);
        assert_eq!(out, [58, 59, 60, 61, 62]);
        assert_eq!((0..3).map(|i| shard.doc_end(i)).collect::<Vec<_>>(), [10, 60, 100]);
        assert!(Shard::open(&path, Dtype::U32).unwrap_err().to_string().contains("meta.json says u32"));
        // No temp file left.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let bytes = fs::read(&path).unwrap();
        let check = |b: Vec<u8>, needle: &str| {
            fs::write(&path, &b).unwrap();
            let err = format!("{:#}", Shard::open(&path, Dtype::U16).unwrap_err());
            assert!(err.contains("train-00000.bin") && err.contains(needle), "{err}");
        };
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        check(wrong_magic, "wrong magic");
        let mut wrong_count = bytes.clone();
        wrong_count[16] = 101;
        check(wrong_count, "header says 101 tokens");
        check(bytes[..bytes.len() - 1].to_vec(), "holds 255 bytes");
        check(bytes[..10].to_vec(), "shorter than");
        let mut bad_index = bytes.clone();
        bad_index[32 + 200] = 200;
        check(bad_index, "document 0 ends at token 200");
    }

    #[test]
    fn shard_names() {
        assert!(is_shard_name("train-00000.bin") && is_shard_name("val-123456.bin"));
        for bad in ["train.bin", "train-0.bin", "test-00000.bin", "train-0000a.bin", "../train-00000.bin"] {
            assert!(!is_shard_name(bad), "{bad}");
        }
    }
}
