//! The files of a prepared directory as the trainer sees them: `meta.json` ([`Meta`]) and each
//! split's tokens as one logical stream ([`TokenFile`], memory-mapped shards), with the
//! writers the tests use for synthetic data. Every file is written through a temp file and a
//! rename ([`crate::files::write_atomic`]); the shard format is in [`super::shards`].
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::shards::{is_shard_name, max_id, shard_name, write_shard, Dtype, Shard, ShardInfo, STATE_FILE};
use super::tokenizer::find_bos_eos;
use crate::files::write_atomic;
use crate::formats::load_tokenizer;

/// Version of the prepared-directory layout, stored in `meta.json`: 2 = token shards with a
/// header and document index listed in `meta.json`; 1 (or absent) = one headerless
/// `train.bin` and `val.bin`, still read.
pub const FORMAT_VERSION: u32 = 2;

// ---------------------------------------------------------------------------------------------
// meta.json
// ---------------------------------------------------------------------------------------------

/// One input file as read by `prepare`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The path as found (the `--input` argument, joined with the path below it for
    /// directories; a file in the Hugging Face cache for `hf:datasets/…`).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

/// The shards of each split, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitShards {
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
}

/// Contents of `meta.json` in a prepared directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Number of token ids the model must accept (largest id + 1).
    pub vocab_size: usize,
    /// Element type of the token ids: "u16" or "u32" (little-endian).
    pub dtype: String,
    /// Number of tokens in the training split.
    pub train_tokens: u64,
    /// Number of tokens in the validation split.
    pub val_tokens: u64,
    /// Beginning-of-text token id, if the tokenizer has one.
    pub bos_id: Option<u32>,
    /// End-of-text token id, if the tokenizer has one; `prepare` puts it after every document.
    pub eos_id: Option<u32>,
    /// Where the tokenizer came from: a description of the training run, a file, or hf:OWNER/NAME@COMMIT.
    pub tokenizer_source: String,
    /// The input files, in the order they were read.
    pub files: Vec<InputFile>,
    /// Layout version of the prepared directory ([`FORMAT_VERSION`]).
    #[serde(default)]
    pub format_version: u32,
    /// Bytes of document text that were tokenized.
    #[serde(default)]
    pub text_bytes: u64,
    /// The `--val-fraction` used (None with `--val-docs`).
    #[serde(default)]
    pub val_fraction: Option<f64>,
    /// Name of the tokenizer file in the directory, if one was written.
    #[serde(default)]
    pub tokenizer_file: Option<String>,
    /// The token shards of each split (format 2; empty in format 1, whose splits are
    /// `train.bin` and `val.bin`).
    #[serde(default)]
    pub shards: SplitShards,
    /// Documents in the training split.
    #[serde(default)]
    pub train_documents: u64,
    /// Documents in the validation split.
    #[serde(default)]
    pub val_documents: u64,
    /// The `--input` arguments as given (`hf:` datasets pinned to the commit read).
    #[serde(default)]
    pub inputs: Vec<String>,
    /// The JSON lines / Parquet field holding the text (`--text-field`).
    #[serde(default)]
    pub text_field: Option<String>,
    /// How the validation documents were chosen (see `lors-lm prepare --help`).
    #[serde(default)]
    pub split: Option<String>,
    /// The `--val-docs` used.
    #[serde(default)]
    pub val_docs: Option<u64>,
    /// The `--split-seed` of the document hash.
    #[serde(default)]
    pub split_seed: Option<u64>,
    /// The `--shard-tokens` used.
    #[serde(default)]
    pub shard_tokens: Option<u64>,
    /// Bytes of text a trained tokenizer was trained on (`--tokenizer-sample-bytes` caps it).
    #[serde(default)]
    pub tokenizer_sample_bytes: Option<u64>,
    /// `prepare --bytes`: ids 1..=256 are the bytes 0..=255 (id = byte + 1), 0 is `<|endoftext|>`.
    #[serde(default)]
    pub byte_level: bool,
}

impl Meta {
    /// Reads and checks `DIR/meta.json`.
    pub fn load(dir: &Path) -> Result<Meta> {
        let path = dir.join("meta.json");
        if !path.is_file() && dir.join(STATE_FILE).is_file() {
            bail!(
                "{} holds an unfinished prepare (no meta.json yet, {STATE_FILE}): finish it with \
                 `lors-lm prepare --resume` and the same arguments",
                dir.display()
            );
        }
        if !path.is_file() {
            bail!("no meta.json in {}: run `lors-lm prepare` first", dir.display());
        }
        let text = fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
        let meta: Meta = serde_json::from_str(&text).with_context(|| {
            format!("{} is not valid prepared-data metadata; re-run `lors-lm prepare --force`", path.display())
        })?;
        meta.check()
            .with_context(|| format!("{} is inconsistent; re-run `lors-lm prepare --force`", path.display()))?;
        Ok(meta)
    }

    /// The checks [`Meta::load`] makes: dtype and vocabulary, and (format 2) shard names and
    /// counts that add up.
    fn check(&self) -> Result<()> {
        let dtype = Dtype::parse(&self.dtype)?;
        if self.vocab_size == 0 || self.vocab_size > dtype.max_vocab() {
            bail!("vocab_size {} does not fit dtype {}", self.vocab_size, self.dtype);
        }
        if self.format_version > FORMAT_VERSION {
            bail!(
                "format_version {} was written by a newer lors-lm (this one reads up to {FORMAT_VERSION})",
                self.format_version
            );
        }
        if self.format_version < 2 {
            return Ok(());
        }
        for (split, shards, tokens, documents) in [
            ("train", &self.shards.train, self.train_tokens, self.train_documents),
            ("val", &self.shards.val, self.val_tokens, self.val_documents),
        ] {
            for s in shards {
                if !is_shard_name(&s.file) || !s.file.starts_with(&format!("{split}-")) {
                    bail!("{s:?} is not a {split} shard name like {}", shard_name(split, 0));
                }
            }
            let sum = shards.iter().try_fold(0u64, |a, s| a.checked_add(s.tokens));
            let docs = shards.iter().try_fold(0u64, |a, s| a.checked_add(s.documents));
            if sum != Some(tokens) || docs != Some(documents) {
                bail!(
                    "the {split} shards hold {sum:?} tokens and {docs:?} documents, but {split}_tokens is {tokens} \
                     and {split}_documents {documents}"
                );
            }
        }
        Ok(())
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

    /// An empty meta for `vocab_size` (dtype chosen), for the writers to fill in.
    pub(super) fn empty(vocab_size: usize) -> Meta {
        Meta {
            vocab_size,
            dtype: Dtype::for_vocab(vocab_size).name().to_string(),
            train_tokens: 0,
            val_tokens: 0,
            bos_id: None,
            eos_id: None,
            tokenizer_source: String::new(),
            files: Vec::new(),
            format_version: FORMAT_VERSION,
            text_bytes: 0,
            val_fraction: None,
            tokenizer_file: None,
            shards: SplitShards::default(),
            train_documents: 0,
            val_documents: 0,
            inputs: Vec::new(),
            text_field: None,
            split: None,
            val_docs: None,
            split_seed: None,
            shard_tokens: None,
            tokenizer_sample_bytes: None,
            byte_level: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token files
// ---------------------------------------------------------------------------------------------

/// One split's tokens: its shards, memory-mapped, read as one stream (a window may span two
/// shards). An old directory's `train.bin`/`val.bin` is one shard without a document index.
pub struct TokenFile {
    /// `DIR/train-*.bin` (or `DIR/train.bin`), for messages.
    label: PathBuf,
    shards: Vec<Shard>,
    /// Token offset of each shard in the stream, then the total (`shards.len() + 1` entries).
    starts: Vec<usize>,
    /// Global document ends of each shard's first document index entry: `doc_base[s]` is the
    /// number of documents ending before shard `s` (`shards.len() + 1` entries).
    doc_base: Vec<usize>,
    dtype: Dtype,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("label", &self.label)
            .field("shards", &self.shards.len())
            .field("dtype", &self.dtype)
            .field("len", &self.len())
            .finish()
    }
}

impl TokenFile {
    /// Opens split `split` ("train"/"val") of DIR: every shard meta.json lists (each checked:
    /// header, size, counts against meta.json), or an old directory's `DIR/{split}.bin`
    /// (checked against meta's token count). Errors name the file.
    pub fn open(dir: &Path, split: &str, meta: &Meta) -> Result<TokenFile> {
        let (expected, infos) = match split {
            "train" => (meta.train_tokens, &meta.shards.train),
            "val" => (meta.val_tokens, &meta.shards.val),
            other => bail!("unknown split {other:?} (expected \"train\" or \"val\")"),
        };
        let dtype = Dtype::parse(&meta.dtype)?;
        let (label, shards) = if meta.format_version >= 2 {
            let mut shards = Vec::with_capacity(infos.len());
            for info in infos {
                let path = dir.join(&info.file);
                let shard = Shard::open(&path, dtype)?;
                if shard.len() as u64 != info.tokens || shard.documents() != Some(info.documents as usize) {
                    bail!(
                        "{} holds {} tokens and {:?} documents, but meta.json says {} and {}; \
                         re-run `lors-lm prepare --force`",
                        path.display(),
                        shard.len(),
                        shard.documents().unwrap_or(0),
                        info.tokens,
                        info.documents
                    );
                }
                shards.push(shard);
            }
            (dir.join(format!("{split}-*.bin")), shards)
        } else {
            let path = dir.join(format!("{split}.bin"));
            (path.clone(), vec![Shard::open_raw(&path, dtype, expected)?])
        };
        let mut starts = vec![0usize];
        let mut doc_base = vec![0usize];
        for s in &shards {
            let total = starts.last().copied().unwrap_or(0).checked_add(s.len());
            starts.push(total.with_context(|| format!("{} is too large for this platform", label.display()))?);
            doc_base.push(doc_base.last().copied().unwrap_or(0) + s.documents().unwrap_or(0));
        }
        Ok(TokenFile { label, shards, starts, doc_base, dtype })
    }

    /// Number of tokens in the split.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// True when the split holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The split's files, for messages: `DIR/train-*.bin` (or an old `DIR/train.bin`).
    pub fn path(&self) -> &Path {
        &self.label
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// tokens [start, start+len) as u32 (across shards); an out-of-range window is an error.
    pub fn window(&self, start: usize, len: usize) -> Result<Vec<u32>> {
        let end = start.checked_add(len).filter(|&end| end <= self.len()).with_context(|| {
            format!(
                "token window [{start}, {start}+{len}) is out of range for {} ({} tokens)",
                self.label.display(),
                self.len()
            )
        })?;
        let mut out = Vec::with_capacity(len);
        let mut pos = start;
        // The shard holding `pos`: the last one starting at or before it.
        let mut s = self.starts.partition_point(|&x| x <= pos).saturating_sub(1);
        while pos < end {
            let (lo, hi) = (self.starts[s], self.starts[s + 1]);
            let stop = end.min(hi);
            self.shards[s].read_into(pos - lo, stop - lo, &mut out);
            pos = stop;
            s += 1;
        }
        Ok(out)
    }

    /// Largest token id in the split (a parallel scan), for validating against the model vocabulary.
    pub fn max_id(&self) -> u32 {
        self.shards.iter().map(|s| max_id(s.token_bytes(), self.dtype)).max().unwrap_or(0)
    }

    /// Number of documents in the split (None for an old directory without a document index).
    pub fn documents(&self) -> Option<usize> {
        self.shards.iter().map(|s| s.documents()).sum()
    }

    /// The token range [start, end) of document `i` in the stream (its end-of-text token included).
    pub fn document_range(&self, i: usize) -> Result<(usize, usize)> {
        let n = self.documents().with_context(|| format!("{} has no document index", self.label.display()))?;
        if i >= n {
            bail!("document {i} is out of range for {} ({n} documents)", self.label.display());
        }
        let end = |i: usize| {
            let s = self.doc_base.partition_point(|&b| b <= i) - 1;
            self.starts[s] + self.shards[s].doc_end(i - self.doc_base[s]) as usize
        };
        Ok((if i == 0 { 0 } else { end(i - 1) }, end(i)))
    }

    /// The tokens of document `i` (its end-of-text token included).
    pub fn document(&self, i: usize) -> Result<Vec<u32>> {
        let (start, end) = self.document_range(i)?;
        self.window(start, end - start)
    }
}

/// Write tokens to an old-style headerless token file (format 1) in the given dtype.
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

/// Writes a synthetic prepared directory for tests: one shard per non-empty split
/// (`train-00000.bin`, `val-00000.bin`, each one document), meta.json, and tokenizer.json
/// copied if given. Ids must be below `vocab_size`.
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
    let mut meta = Meta::empty(vocab_size);
    meta.tokenizer_source = "synthetic".to_string();
    if let Some(src) = tokenizer {
        let tok = load_tokenizer(src)?;
        (meta.bos_id, meta.eos_id) = find_bos_eos(&tok);
        let dest = dir.join("tokenizer.json");
        fs::copy(src, &dest).with_context(|| format!("could not copy {} to {}", src.display(), dest.display()))?;
        meta.tokenizer_file = Some("tokenizer.json".to_string());
        meta.tokenizer_source = format!("synthetic, tokenizer {}", src.display());
    }
    let data = write_splits(dir, train, val, vocab_size)?;
    (meta.shards, meta.train_tokens, meta.val_tokens) = (data.shards, data.train_tokens, data.val_tokens);
    (meta.train_documents, meta.val_documents) = (data.train_documents, data.val_documents);
    meta.save(dir)?;
    Ok(meta)
}

/// Writes each split as one shard of one document and returns the [`Meta`] that describes
/// them; the caller fills in the tokenizer and input fields and saves it last.
pub(super) fn write_splits(dir: &Path, train: &[u32], val: &[u32], vocab_size: usize) -> Result<Meta> {
    let mut meta = Meta::empty(vocab_size);
    let dtype = Dtype::for_vocab(vocab_size);
    for (split, tokens) in [("train", train), ("val", val)] {
        let shards = match tokens.is_empty() {
            true => vec![],
            false => vec![write_shard(&dir.join(shard_name(split, 0)), dtype, tokens, &[tokens.len() as u64])?],
        };
        let n = shards.len() as u64;
        match split {
            "train" => (meta.shards.train, meta.train_tokens, meta.train_documents) = (shards, train.len() as u64, n),
            _ => (meta.shards.val, meta.val_tokens, meta.val_documents) = (shards, val.len() as u64, n),
        }
    }
    Ok(meta)
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
        assert_eq!(tf.documents(), Some(1));
        assert_eq!(tf.document(0).unwrap(), train);
        let vf = TokenFile::open(dir.path(), "val", &meta).unwrap();
        assert_eq!(vf.window(0, 3).unwrap(), val);
        assert!(TokenFile::open(dir.path(), "test", &meta).is_err());

        let small = write_prepared_dir(dir.path(), &[1, 2, 3], &[], 16, None).unwrap();
        assert_eq!(small.dtype, "u16");
        let vf = TokenFile::open(dir.path(), "val", &small).unwrap();
        assert!(vf.is_empty());
        assert_eq!(vf.max_id(), 0);
        // A meta.json that disagrees with the shard is caught, naming the file.
        let mut wrong = small.clone();
        wrong.shards.train[0].tokens = 4;
        wrong.train_tokens = 4;
        let err = TokenFile::open(dir.path(), "train", &wrong).unwrap_err();
        assert!(format!("{err:#}").contains("train-00000.bin"), "{err:#}");
        assert!(write_tokens(&dir.path().join("x.bin"), &[70000], "u16").is_err());
        assert!(write_prepared_dir(dir.path(), &[16], &[], 16, None).is_err());
    }

    #[test]
    fn windows_and_documents_span_shards() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u32> = (0..50).collect();
        // Shard 0: documents ending at 5 and 20; tokens 20..30 continue into shard 1, whose
        // first document ends at its token 5 (stream token 35); then one more ending at 50.
        let a = write_shard(&dir.path().join("train-00000.bin"), Dtype::U16, &tokens[..30], &[5, 20]).unwrap();
        let b = write_shard(&dir.path().join("train-00001.bin"), Dtype::U16, &tokens[30..], &[5, 20]).unwrap();
        let mut meta = Meta::empty(100);
        (meta.train_tokens, meta.train_documents) = (50, 4);
        meta.shards.train = vec![a, b];
        meta.save(dir.path()).unwrap();
        let meta = Meta::load(dir.path()).unwrap();
        let tf = TokenFile::open(dir.path(), "train", &meta).unwrap();
        assert_eq!(tf.shards().len(), 2);
        assert_eq!(tf.window(25, 10).unwrap(), &tokens[25..35]);
        assert_eq!(tf.window(0, 50).unwrap(), tokens);
        assert_eq!(tf.window(30, 0).unwrap(), Vec::<u32>::new());
        assert_eq!(tf.documents(), Some(4));
        let ranges: Vec<_> = (0..4).map(|i| tf.document_range(i).unwrap()).collect();
        assert_eq!(ranges, [(0, 5), (5, 20), (20, 35), (35, 50)]);
        assert!(tf.document(4).is_err());
        assert_eq!(tf.max_id(), 49);
        // Counts that do not add up are refused when loading.
        let mut bad = meta.clone();
        bad.train_documents = 3;
        bad.save(dir.path()).unwrap();
        assert!(format!("{:#}", Meta::load(dir.path()).unwrap_err()).contains("train_documents 3"));
        let mut bad = meta.clone();
        bad.shards.train[0].file = "../train-00000.bin".into();
        bad.save(dir.path()).unwrap();
        assert!(Meta::load(dir.path()).is_err());
    }

    #[test]
    fn old_directories_are_read_as_one_shard() {
        let dir = tempfile::tempdir().unwrap();
        let train: Vec<u32> = (0..100).collect();
        write_tokens(&dir.path().join("train.bin"), &train, "u16").unwrap();
        write_tokens(&dir.path().join("val.bin"), &[7, 8, 9], "u16").unwrap();
        let json = r#"{"vocab_size": 300, "dtype": "u16", "train_tokens": 100, "val_tokens": 3,
            "bos_id": 0, "eos_id": 0, "tokenizer_source": "trained", "files": [], "format_version": 1}"#;
        fs::write(dir.path().join("meta.json"), json).unwrap();
        let meta = Meta::load(dir.path()).unwrap();
        let tf = TokenFile::open(dir.path(), "train", &meta).unwrap();
        assert_eq!(tf.window(90, 10).unwrap(), &train[90..]);
        assert_eq!(tf.documents(), None);
        assert!(tf.document(0).is_err());
        assert_eq!(TokenFile::open(dir.path(), "val", &meta).unwrap().window(0, 3).unwrap(), [7, 8, 9]);
        fs::write(dir.path().join("val.bin"), [0u8; 4]).unwrap();
        let err = format!("{:#}", TokenFile::open(dir.path(), "val", &meta).unwrap_err());
        assert!(err.contains("val.bin") && err.contains("holds 4 bytes"), "{err}");
    }

    #[test]
    fn meta_load_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = Meta::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("run `lors-lm prepare` first"), "{err}");
    }
}
