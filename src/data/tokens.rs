//! The files of a prepared directory: `meta.json` ([`Meta`]) and the token files
//! `train.bin`/`val.bin` ([`TokenFile`], memory-mapped), with the writers `prepare` and the
//! tests use. Every file is written through a temp file and a rename ([`crate::files::write_atomic`]).
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::tokenizer::{find_bos_eos, load_tokenizer};
use crate::files::write_atomic;

/// Version of the prepared-directory layout, stored in `meta.json`.
pub const FORMAT_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------------
// meta.json
// ---------------------------------------------------------------------------------------------

/// One input file as read by `prepare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The path as found (the `--input` argument, joined with the path below it for directories).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

/// Contents of `meta.json` in a prepared directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Number of token ids the model must accept (largest id + 1).
    pub vocab_size: usize,
    /// Element type of train.bin/val.bin: "u16" or "u32" (little-endian).
    pub dtype: String,
    /// Number of tokens in train.bin.
    pub train_tokens: u64,
    /// Number of tokens in val.bin.
    pub val_tokens: u64,
    /// Beginning-of-text token id, if the tokenizer has one.
    pub bos_id: Option<u32>,
    /// End-of-text token id, if the tokenizer has one.
    pub eos_id: Option<u32>,
    /// Where the tokenizer came from: a description of the training run, a file, or hf:OWNER/NAME@COMMIT.
    pub tokenizer_source: String,
    /// The input files, in the order they were concatenated.
    pub files: Vec<InputFile>,
    /// Layout version of the prepared directory.
    #[serde(default)]
    pub format_version: u32,
    /// Bytes of UTF-8 text that were tokenized (files plus inserted newlines).
    #[serde(default)]
    pub text_bytes: u64,
    /// The `--val-fraction` used.
    #[serde(default)]
    pub val_fraction: Option<f64>,
    /// Name of the tokenizer file in the directory, if one was written.
    #[serde(default)]
    pub tokenizer_file: Option<String>,
}

impl Meta {
    /// Reads and checks `DIR/meta.json`.
    pub fn load(dir: &Path) -> Result<Meta> {
        let path = dir.join("meta.json");
        if !path.is_file() {
            bail!("no meta.json in {}: run `lors-lm prepare` first", dir.display());
        }
        let text = fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
        let meta: Meta = serde_json::from_str(&text).with_context(|| {
            format!("{} is not valid prepared-data metadata; re-run `lors-lm prepare --force`", path.display())
        })?;
        let dtype = Dtype::parse(&meta.dtype).with_context(|| format!("invalid dtype in {}", path.display()))?;
        if meta.vocab_size == 0 || meta.vocab_size > dtype.max_vocab() {
            bail!("{}: vocab_size {} does not fit dtype {}", path.display(), meta.vocab_size, meta.dtype);
        }
        Ok(meta)
    }

    /// Writes `DIR/meta.json` atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("could not serialize meta.json")?;
        write_atomic(&dir.join("meta.json"), |w| {
            w.write_all(json.as_bytes())?;
            w.write_all(b"\n")
        })
    }

    /// Path of the tokenizer file in `dir`, if the directory has one.
    pub fn tokenizer_path(&self, dir: &Path) -> Option<PathBuf> {
        self.tokenizer_file.as_ref().map(|name| dir.join(name))
    }
}

// ---------------------------------------------------------------------------------------------
// Token files
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    U16,
    U32,
}

impl Dtype {
    fn parse(s: &str) -> Result<Dtype> {
        match s {
            "u16" => Ok(Dtype::U16),
            "u32" => Ok(Dtype::U32),
            other => bail!("unknown token dtype {other:?} (expected \"u16\" or \"u32\")"),
        }
    }
    fn for_vocab(vocab_size: usize) -> Dtype {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dtype::U16 => "u16",
            Dtype::U32 => "u32",
        }
    }
    fn bytes(self) -> usize {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    fn max_vocab(self) -> usize {
        match self {
            Dtype::U16 => 1 << 16,
            Dtype::U32 => 1 << 32,
        }
    }
}

/// Memory-mapped token file.
pub struct TokenFile {
    path: PathBuf,
    /// `None` for an empty file (which cannot be mapped on every platform).
    mmap: Option<memmap2::Mmap>,
    dtype: Dtype,
    len: usize,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .finish()
    }
}

impl TokenFile {
    /// Opens DIR/{split}.bin ("train"/"val"), checks its byte length matches meta's token count and dtype, errors naming the file otherwise.
    pub fn open(dir: &Path, split: &str, meta: &Meta) -> Result<TokenFile> {
        let expected = match split {
            "train" => meta.train_tokens,
            "val" => meta.val_tokens,
            other => bail!("unknown split {other:?} (expected \"train\" or \"val\")"),
        };
        let dtype = Dtype::parse(&meta.dtype)?;
        let path = dir.join(format!("{split}.bin"));
        let file = fs::File::open(&path)
            .with_context(|| format!("could not open {}; re-run `lors-lm prepare --force`", path.display()))?;
        let byte_len = file.metadata().with_context(|| format!("could not stat {}", path.display()))?.len();
        let expected_bytes = expected * dtype.bytes() as u64;
        if byte_len != expected_bytes {
            bail!(
                "{} holds {byte_len} bytes, but meta.json says {expected} {} tokens ({expected_bytes} bytes); \
                 the directory is inconsistent: re-run `lors-lm prepare --force`",
                path.display(),
                dtype.name()
            );
        }
        let len =
            usize::try_from(expected).with_context(|| format!("{} is too large for this platform", path.display()))?;
        let mmap = if byte_len == 0 {
            None
        } else {
            // SAFETY: the file is opened read-only; prepared files are written once (temp file +
            // rename) and not modified in place, which is the usual contract for mapped data.
            let mmap = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("could not memory-map {}", path.display()))?;
            Some(mmap)
        };
        Ok(TokenFile { path, mmap, dtype, len })
    }

    /// Number of tokens in the file.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the file holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bytes(&self) -> &[u8] {
        self.mmap.as_deref().unwrap_or(&[])
    }

    /// tokens [start, start+len) as u32; caller guarantees bounds (return Result anyway on out of range).
    pub fn window(&self, start: usize, len: usize) -> Result<Vec<u32>> {
        let end = start.checked_add(len).filter(|&end| end <= self.len).with_context(|| {
            format!(
                "token window [{start}, {start}+{len}) is out of range for {} ({} tokens)",
                self.path.display(),
                self.len
            )
        })?;
        let b = self.dtype.bytes();
        let bytes = &self.bytes()[start * b..end * b];
        Ok(decode_le(bytes, self.dtype).collect())
    }

    /// Largest token id in the file (scan), for validating against the model vocabulary.
    pub fn max_id(&self) -> u32 {
        decode_le(self.bytes(), self.dtype).max().unwrap_or(0)
    }
}

fn decode_le(bytes: &[u8], dtype: Dtype) -> Box<dyn Iterator<Item = u32> + '_> {
    match dtype {
        Dtype::U16 => Box::new(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)),
        Dtype::U32 => Box::new(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
    }
}

/// Write tokens to a bin file in the given dtype (used by tests of other modules to make synthetic data).
///
/// `dtype` is "u16" or "u32"; an id that does not fit is an error. Written via a temp file and
/// a rename, so the file is either complete or absent.
pub fn write_tokens(path: &Path, tokens: &[u32], dtype: &str) -> Result<()> {
    let dtype = Dtype::parse(dtype)?;
    if dtype == Dtype::U16 {
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t > u16::MAX as u32) {
            bail!("token id {t} at position {i} does not fit in u16 (writing {})", path.display());
        }
    }
    write_atomic(path, |w| {
        for &t in tokens {
            match dtype {
                Dtype::U16 => w.write_all(&(t as u16).to_le_bytes())?,
                Dtype::U32 => w.write_all(&t.to_le_bytes())?,
            }
        }
        Ok(())
    })
}

/// Writes a synthetic prepared directory (train.bin, val.bin, meta.json; tokenizer.json copied
/// if given) for tests. Ids must be below `vocab_size`.
pub fn write_prepared_dir(
    dir: &Path,
    train: &[u32],
    val: &[u32],
    vocab_size: usize,
    tokenizer: Option<&Path>,
) -> Result<Meta> {
    if vocab_size == 0 {
        bail!("vocab_size must be positive");
    }
    if let Some(&t) = train.iter().chain(val).find(|&&t| t as usize >= vocab_size) {
        bail!("token id {t} is not below vocab_size {vocab_size}");
    }
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let (mut bos_id, mut eos_id, mut tokenizer_file) = (None, None, None);
    let mut tokenizer_source = "synthetic".to_string();
    if let Some(src) = tokenizer {
        let tok = load_tokenizer(src)?;
        (bos_id, eos_id) = find_bos_eos(&tok);
        let dest = dir.join("tokenizer.json");
        fs::copy(src, &dest).with_context(|| format!("could not copy {} to {}", src.display(), dest.display()))?;
        tokenizer_file = Some("tokenizer.json".to_string());
        tokenizer_source = format!("synthetic, tokenizer {}", src.display());
    }
    let meta = Meta { bos_id, eos_id, tokenizer_source, tokenizer_file, ..write_splits(dir, train, val, vocab_size)? };
    meta.save(dir)?;
    Ok(meta)
}

/// Writes `DIR/train.bin` and `DIR/val.bin` in the dtype `vocab_size` needs, and returns the
/// [`Meta`] that describes them; the caller fills in the tokenizer and input fields (here
/// empty) and saves it last.
pub(super) fn write_splits(dir: &Path, train: &[u32], val: &[u32], vocab_size: usize) -> Result<Meta> {
    let dtype = Dtype::for_vocab(vocab_size);
    write_tokens(&dir.join("train.bin"), train, dtype.name())?;
    write_tokens(&dir.join("val.bin"), val, dtype.name())?;
    Ok(Meta {
        vocab_size,
        dtype: dtype.name().to_string(),
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        bos_id: None,
        eos_id: None,
        tokenizer_source: String::new(),
        files: Vec::new(),
        format_version: FORMAT_VERSION,
        text_bytes: 0,
        val_fraction: None,
        tokenizer_file: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_round_trip_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let train: Vec<u32> = (0..1000).map(|i| (i * 7919) % 70000).collect();
        let val = vec![69999, 0, 5];
        let meta = write_prepared_dir(dir.path(), &train, &val, 70000, None).unwrap();
        assert_eq!(meta.dtype, "u32");
        let meta = Meta::load(dir.path()).unwrap();
        let tf = TokenFile::open(dir.path(), "train", &meta).unwrap();
        assert_eq!(tf.len(), 1000);
        assert_eq!(tf.window(10, 5).unwrap(), &train[10..15]);
        assert_eq!(tf.max_id(), *train.iter().max().unwrap());
        assert!(tf.window(998, 3).is_err());
        assert!(tf.window(usize::MAX, 2).is_err());
        let vf = TokenFile::open(dir.path(), "val", &meta).unwrap();
        assert_eq!(vf.window(0, 3).unwrap(), val);
        assert!(TokenFile::open(dir.path(), "test", &meta).is_err());

        let small = write_prepared_dir(dir.path(), &[1, 2, 3], &[], 16, None).unwrap();
        assert_eq!(small.dtype, "u16");
        let vf = TokenFile::open(dir.path(), "val", &small).unwrap();
        assert!(vf.is_empty());
        assert_eq!(vf.max_id(), 0);
        // A meta.json that disagrees with the file size is caught, naming the file.
        let mut wrong = small.clone();
        wrong.train_tokens = 4;
        let err = TokenFile::open(dir.path(), "train", &wrong).unwrap_err();
        assert!(format!("{err:#}").contains("train.bin"), "{err:#}");
        assert!(write_tokens(&dir.path().join("x.bin"), &[70000], "u16").is_err());
        assert!(write_prepared_dir(dir.path(), &[16], &[], 16, None).is_err());
    }

    #[test]
    fn meta_load_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = Meta::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("run `lors-lm prepare` first"), "{err}");
    }
}
