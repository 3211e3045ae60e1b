//! Data preparation: text files → tokenizer + memory-mappable token files.
//!
//! `lors-lm prepare` turns a corpus of UTF-8 text files into a *prepared directory*:
//!
//! | file             | contents                                                          |
//! |------------------|-------------------------------------------------------------------|
//! | `tokenizer.json` | the Hugging Face `tokenizers` tokenizer used (trained or loaded)   |
//! | `train.bin`      | the first `1 - val_fraction` of the token stream, little-endian    |
//! | `val.bin`        | the last `val_fraction` of the token stream, same dtype            |
//! | `meta.json`      | [`Meta`]: vocabulary size, dtype, token counts, inputs, tokenizer  |
//!
//! Token files hold `u16` ids when the vocabulary has at most 65 536 entries, else `u32`; no
//! header. `meta.json` is written last (temp file + rename): a directory with a `meta.json`
//! is complete.
//!
//! **Corpus text.** Inputs are files or directories (searched recursively for `*.txt`, sorted
//! by path component-wise, so results do not depend on the file system's order). Files are
//! concatenated in the order given; a `\n` is inserted between two files when the earlier one
//! does not already end in one, nothing is appended after the last file, and empty files
//! contribute nothing. No end-of-text token is inserted between files; a literal
//! `<|endoftext|>` *in the text* is encoded as the special token, so a corpus can mark its
//! own document boundaries.
//!
//! **Tokenizer.** By default a byte-level BPE tokenizer (GPT-2 style: byte alphabet,
//! GPT-2 split regex, no prefix space) is trained on the corpus. Its special token
//! `<|endoftext|>` has id 0 and is recorded as both `bos_id` and `eos_id`; ids 1..=256 are
//! the 256 byte symbols, so every byte sequence stays encodable and decoding reproduces the
//! text exactly. Alternatively an existing `tokenizer.json` or `hf:OWNER/NAME` is used.
//!
//! **Split.** The validation split is the *last* `val_fraction` of the token stream (rounded
//! to the nearest token), the training split everything before it.
use std::collections::HashSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

/// The special token of trained tokenizers (id 0): end of text, also used as beginning of text.
pub const EOT: &str = "<|endoftext|>";
/// Vocabulary size used when neither `--vocab-size` nor `--tokenizer` is given.
pub const DEFAULT_VOCAB_SIZE: usize = 4096;
/// Smallest vocabulary a trained tokenizer can have: the 256 byte symbols plus `<|endoftext|>`.
pub const MIN_VOCAB_SIZE: usize = 256 + 1;
/// Each split must hold at least this many tokens (one input and one target).
pub const MIN_SPLIT_TOKENS: usize = 2;
/// Version of the prepared-directory layout, stored in `meta.json`.
pub const FORMAT_VERSION: u32 = 1;
/// Target size of the text pieces encoded in parallel (see [`split_into_chunks`]).
const CHUNK_BYTES: usize = 128 * 1024;

// ---------------------------------------------------------------------------------------------
// Command-line arguments
// ---------------------------------------------------------------------------------------------

/// Arguments of `lors-lm prepare`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// Text files or directories to read, in this order; directories are searched recursively
    /// for *.txt files, sorted by path. Files must be UTF-8 (see --lossy).
    #[arg(long, short, value_name = "PATH", required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,

    /// Output directory: receives tokenizer.json, train.bin, val.bin and meta.json.
    #[arg(long, short, value_name = "DIR")]
    pub out: PathBuf,

    /// Train a byte-level BPE tokenizer with this many tokens (at most; a small corpus may
    /// yield fewer), counting the 256 byte symbols and <|endoftext|> (id 0).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VOCAB_SIZE, conflicts_with = "tokenizer")]
    pub vocab_size: usize,

    /// Use an existing tokenizer instead of training one: a tokenizer.json file, or
    /// hf:OWNER/NAME[@REVISION] from the Hugging Face Hub (through its standard cache;
    /// HF_HUB_OFFLINE=1 uses the cache only).
    #[arg(long, value_name = "FILE|hf:OWNER/NAME")]
    pub tokenizer: Option<String>,

    /// Fraction of the token stream, taken from its end, kept for validation (val.bin).
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub val_fraction: f64,

    /// Replace invalid UTF-8 sequences with U+FFFD instead of refusing the file.
    #[arg(long)]
    pub lossy: bool,

    /// Overwrite an output directory that already holds prepared data.
    #[arg(long)]
    pub force: bool,
}

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
    let dtype = Dtype::for_vocab(vocab_size);
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
    write_tokens(&dir.join("train.bin"), train, dtype.name())?;
    write_tokens(&dir.join("val.bin"), val, dtype.name())?;
    let meta = Meta {
        vocab_size,
        dtype: dtype.name().to_string(),
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        bos_id,
        eos_id,
        tokenizer_source,
        files: Vec::new(),
        format_version: FORMAT_VERSION,
        text_bytes: 0,
        val_fraction: None,
        tokenizer_file,
    };
    meta.save(dir)?;
    Ok(meta)
}

/// Writes `path` through a temp file in the same directory, renamed into place on success.
fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>) -> Result<()> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let file = fs::File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("could not write {}", path.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tokenizers
// ---------------------------------------------------------------------------------------------

/// Load a tokenizer.json file with a clear error naming the path.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!(
            "tokenizer file {} does not exist (expected a tokenizer.json written by Hugging Face tokenizers)",
            path.display()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    Tokenizer::from_bytes(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a tokenizer.json file (expected the JSON written by Hugging Face tokenizers): {e}",
            path.display()
        )
    })
}

/// Trains a byte-level BPE tokenizer on `chunks` (see the module docs for its layout).
fn train_bpe(chunks: &[&str], vocab_size: usize) -> Result<Tokenizer> {
    let eot = AddedToken::from(EOT, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![eot.clone()])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_post_processor(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_decoder(Some(ByteLevelDecoder::default().add_prefix_space(false).into()))
            .build()
            .map_err(|e| anyhow::anyhow!("could not build the tokenizer: {e}"))?;
    // Registering the special token before training makes a literal `<|endoftext|>` in the
    // text count as the special token rather than as BPE training text.
    tok.add_special_tokens([eot]).map_err(|e| anyhow::anyhow!("could not add {EOT}: {e}"))?;
    tok.train(&mut trainer, chunks.iter()).map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
    let tok = Tokenizer::from(tok);
    if tok.token_to_id(EOT) != Some(0) {
        bail!("internal error: {EOT} did not get id 0 in the trained tokenizer");
    }
    Ok(tok)
}

/// Guesses the beginning/end-of-text ids from the usual special-token spellings.
fn find_bos_eos(tok: &Tokenizer) -> (Option<u32>, Option<u32>) {
    let first = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
    let bos = first(&["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", EOT]);
    let eos = first(&[EOT, "<|end_of_text|>", "</s>", "<eos>"]);
    (bos, eos)
}

/// Number of ids the model must accept: largest id + 1 (ids may have holes).
fn tokenizer_vocab_size(tok: &Tokenizer) -> usize {
    let max_id = tok.get_vocab(true).values().copied().max();
    let by_max = max_id.map_or(0, |m| m as usize + 1);
    by_max.max(tok.get_vocab_size(true))
}

/// Whether encoding the text in pieces cut by [`split_into_chunks`] gives exactly the ids of
/// encoding it whole. True for GPT-2-style byte-level tokenizers: no normalizer, the ByteLevel
/// pre-tokenizer with its regex and no prefix space, added tokens plain special strings.
/// Every token of the GPT-2 regex that is not pure whitespace contains no whitespace but an
/// optional leading space, so the cuts used (after `X\n` before `Y`, or before ` Y`, with X, Y
/// printable ASCII) are pre-token boundaries in both encodings.
fn chunking_is_exact(tok: &Tokenizer) -> bool {
    let pre_ok = matches!(
        tok.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space
    );
    let added_ok = tok
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.lstrip && !t.rstrip && !t.single_word && !t.content.chars().any(char::is_whitespace));
    tok.get_normalizer().is_none() && pre_ok && added_ok
}

enum TokenizerSpec {
    Train { vocab_size: usize },
    File(PathBuf),
    Hub { owner: String, name: String, revision: Option<String> },
}

impl TokenizerSpec {
    fn from_args(args: &PrepareArgs) -> Result<TokenizerSpec> {
        let Some(spec) = &args.tokenizer else {
            if args.vocab_size < MIN_VOCAB_SIZE {
                bail!(
                    "--vocab-size {} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} \
                     (256 byte symbols + {EOT}); try --vocab-size {DEFAULT_VOCAB_SIZE}",
                    args.vocab_size
                );
            }
            return Ok(TokenizerSpec::Train { vocab_size: args.vocab_size });
        };
        let Some(repo) = spec.strip_prefix("hf:") else {
            return Ok(TokenizerSpec::File(PathBuf::from(spec)));
        };
        let (repo, revision) = match repo.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (repo, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        match parts.as_slice() {
            [owner, name]
                if !owner.is_empty() && !name.is_empty() && revision.as_deref().is_none_or(|r| !r.is_empty()) =>
            {
                Ok(TokenizerSpec::Hub { owner: owner.to_string(), name: name.to_string(), revision })
            }
            _ => bail!(
                "--tokenizer {spec}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION, e.g. hf:openai-community/gpt2"
            ),
        }
    }
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only Hub access (as in Python: 1/true/yes/on).
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Resolves `filename` (e.g. `tokenizer.json`) of a Hub model repo through the standard cache;
/// returns its path and a source string naming the commit.
#[cfg(feature = "hub")]
pub fn fetch_hub_file(owner: &str, name: &str, revision: Option<&str>, filename: &str) -> Result<(PathBuf, String)> {
    let repo_id = format!("{owner}/{name}");
    let offline = hub_offline();
    let client = hf_hub::HFClient::new()
        .with_context(|| format!("could not set up the Hugging Face Hub client for hf:{repo_id}"))?;
    let cache = client.cache_dir().to_path_buf();
    let client = hf_hub::HFClientSync::from_inner(client)
        .with_context(|| format!("could not set up the Hugging Face Hub client for hf:{repo_id}"))?;
    let rev_text = revision.unwrap_or("main");
    progress(&format!(
        "resolving hf:{repo_id}@{rev_text} {filename} (cache {}{})",
        cache.display(),
        if offline { ", offline" } else { "" }
    ));
    let result = client
        .model(owner, name)
        .download_file()
        .filename(filename)
        .maybe_revision(revision.map(str::to_string))
        .local_files_only(offline)
        .send();
    let path = match result {
        Ok(path) => path,
        Err(hf_hub::HFError::LocalEntryNotFound { .. }) => bail!(
            "hf:{repo_id}@{rev_text}: {filename} is not in the Hugging Face cache at {} and \
             HF_HUB_OFFLINE is set, so it cannot be downloaded; unset HF_HUB_OFFLINE to download it, \
             or point HF_HUB_CACHE/HF_HOME at a cache that holds it",
            cache.display()
        ),
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "could not get {filename} of hf:{repo_id}@{rev_text} (cache {}); check the repo name, \
                     your network and HF_TOKEN, or set HF_HUB_OFFLINE=1 to use the cache only",
                    cache.display()
                )
            })
        }
    };
    // The cache layout is snapshots/<commit>/tokenizer.json: name the commit in the source.
    let commit = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|c| c.len() == 40 && c.chars().all(|ch| ch.is_ascii_hexdigit()));
    let source = match commit {
        Some(c) => format!("hf:{repo_id}@{c}"),
        None => format!("hf:{repo_id}@{rev_text}"),
    };
    Ok((path, source))
}

#[cfg(not(feature = "hub"))]
pub fn fetch_hub_file(owner: &str, name: &str, _revision: Option<&str>, filename: &str) -> Result<(PathBuf, String)> {
    let _ = hub_offline;
    bail!(
        "hf:{owner}/{name} ({filename}): this lors-lm was built without the `hub` feature; \
         rebuild with default features, or download the files yourself and pass a local path"
    )
}

// ---------------------------------------------------------------------------------------------
// Reading the corpus
// ---------------------------------------------------------------------------------------------

/// Expands `--input` arguments into the list of files to read, in order.
fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input)
            .with_context(|| format!("input path {} does not exist or cannot be read (--input)", input.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk_txt(input, &mut found)?;
            if found.is_empty() {
                bail!(
                    "no *.txt files under directory {} (--input); put the corpus there as .txt files, \
                     e.g. with scripts/fetch_corpus.sh",
                    input.display()
                );
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

/// Recursively collects `*.txt` files (case-insensitive extension). Symlinks to files are
/// followed; symlinked directories are not (no cycles).
fn walk_txt(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("could not list directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list directory {}", dir.display()))?;
        let path = entry.path();
        let ft = entry.file_type().with_context(|| format!("could not stat {}", path.display()))?;
        if ft.is_dir() {
            walk_txt(&path, out)?;
        } else if (ft.is_file() || (ft.is_symlink() && path.is_file()))
            && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The corpus: concatenated text, with file records.
struct Corpus {
    text: String,
    files: Vec<InputFile>,
    /// Byte offset in `text` where each non-empty file's text ends (after any inserted `\n`).
    doc_ends: Vec<usize>,
}

/// Reads, checks and concatenates the files (see the module docs for the joining rule).
fn read_corpus(paths: &[PathBuf], lossy: bool) -> Result<Corpus> {
    let mut text = String::new();
    let mut files = Vec::with_capacity(paths.len());
    let mut doc_ends = Vec::new();
    for path in paths {
        let bytes = fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        files.push(InputFile { path: path.to_string_lossy().into_owned(), bytes: bytes.len() as u64, sha256 });
        let doc = match std::str::from_utf8(&bytes) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(err) => {
                let offset = err.valid_up_to();
                let line = bytes[..offset].iter().filter(|&&b| b == b'\n').count() + 1;
                if !lossy {
                    bail!(
                        "{} is not valid UTF-8: invalid byte 0x{:02x} at byte offset {offset} (line {line}); \
                         convert the file to UTF-8, or pass --lossy to replace invalid bytes with U+FFFD",
                        path.display(),
                        bytes[offset]
                    );
                }
                progress(&format!(
                    "warning: {} is not valid UTF-8 (first invalid byte at offset {offset}, line {line}); \
                     replacing invalid bytes with U+FFFD (--lossy)",
                    path.display()
                ));
                String::from_utf8_lossy(&bytes)
            }
        };
        if doc.is_empty() {
            continue;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
            if let Some(end) = doc_ends.last_mut() {
                *end += 1;
            }
        }
        text.push_str(&doc);
        doc_ends.push(text.len());
    }
    Ok(Corpus { text, files, doc_ends })
}

/// Cuts `text` into pieces of about `target` bytes for parallel encoding.
///
/// With `exact` (see [`chunking_is_exact`]) a piece ends at the first safe cut at or after
/// `target` bytes: after `X\n` when followed by `Y`, or before ` Y`, with X and Y printable
/// ASCII. Otherwise pieces are whole documents (`doc_ends`), the natural unit of tokenizers
/// that add something at the start of each input (e.g. a Metaspace prefix).
fn split_into_chunks<'a>(text: &'a str, target: usize, exact: bool, doc_ends: &[usize]) -> Vec<&'a str> {
    let mut chunks = Vec::new();
    if !exact {
        let mut start = 0;
        for &end in doc_ends {
            chunks.push(&text[start..end]);
            start = end;
        }
        if start < text.len() {
            chunks.push(&text[start..]);
        }
        return chunks;
    }
    let b = text.as_bytes();
    let safe = |i: usize| {
        (i >= 2 && b[i - 1] == b'\n' && b[i - 2].is_ascii_graphic() && b[i].is_ascii_graphic())
            || (i >= 1 && i + 1 < b.len() && b[i] == b' ' && b[i - 1].is_ascii_graphic() && b[i + 1].is_ascii_graphic())
    };
    let mut start = 0;
    while start < b.len() {
        let mut cut = b.len();
        let mut i = start + target.max(1);
        while i < b.len() {
            if safe(i) {
                cut = i;
                break;
            }
            i += 1;
        }
        chunks.push(&text[start..cut]);
        start = cut;
    }
    chunks
}

/// Encodes the pieces in parallel batches, printing progress lines.
fn encode_chunks(tok: &Tokenizer, chunks: &[&str], total_bytes: usize) -> Result<Vec<u32>> {
    let t0 = Instant::now();
    let mut last_report = t0;
    let mut ids: Vec<u32> = Vec::with_capacity(total_bytes / 3);
    let mut done_bytes = 0usize;
    let batch = 4 * std::thread::available_parallelism().map_or(2, |n| n.get());
    for group in chunks.chunks(batch) {
        let encodings =
            tok.encode_batch_fast(group.to_vec(), false).map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        for enc in &encodings {
            ids.extend_from_slice(enc.get_ids());
        }
        done_bytes += group.iter().map(|c| c.len()).sum::<usize>();
        if last_report.elapsed().as_secs_f64() >= 2.0 {
            last_report = Instant::now();
            progress(&format!(
                "encoded {} / {} ({:.0}%), {} tokens, {:.1}s",
                human_bytes(done_bytes as u64),
                human_bytes(total_bytes as u64),
                100.0 * done_bytes as f64 / total_bytes.max(1) as f64,
                ids.len(),
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// prepare
// ---------------------------------------------------------------------------------------------

fn progress(msg: &str) {
    eprintln!("prepare: {msg}");
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Number of validation tokens for a stream of `total` tokens.
fn val_count(total: usize, val_fraction: f64) -> usize {
    ((total as f64) * val_fraction).round() as usize
}

/// Runs `lors-lm prepare`.
pub fn run_prepare(args: &PrepareArgs) -> Result<()> {
    let t0 = Instant::now();
    if !(args.val_fraction > 0.0 && args.val_fraction < 1.0) {
        bail!("--val-fraction {} must be between 0 and 1 (exclusive), e.g. 0.1", args.val_fraction);
    }
    let spec = TokenizerSpec::from_args(args)?;

    // Refuse to clobber prepared data before doing any work.
    let out = &args.out;
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    let meta_path = out.join("meta.json");
    if meta_path.exists() && !args.force {
        bail!(
            "--out {} already holds prepared data (meta.json); pass --force to overwrite it, or choose another --out",
            out.display()
        );
    }

    // A given tokenizer is loaded first, so that a bad one fails fast.
    let (loaded, source) = match &spec {
        TokenizerSpec::Train { .. } => (None, String::new()),
        TokenizerSpec::File(path) => {
            let tok = load_tokenizer(path).context("--tokenizer")?;
            (Some(tok), format!("file:{}", path.display()))
        }
        TokenizerSpec::Hub { owner, name, revision } => {
            let (path, source) = fetch_hub_file(owner, name, revision.as_deref(), "tokenizer.json")?;
            let tok = load_tokenizer(&path).with_context(|| format!("--tokenizer hf:{owner}/{name}"))?;
            (Some(tok), source)
        }
    };

    let paths = collect_files(&args.input)?;
    let corpus = read_corpus(&paths, args.lossy)?;
    let total_file_bytes: u64 = corpus.files.iter().map(|f| f.bytes).sum();
    progress(&format!(
        "read {} file(s), {} ({} of text) in {:.2}s",
        corpus.files.len(),
        human_bytes(total_file_bytes),
        human_bytes(corpus.text.len() as u64),
        t0.elapsed().as_secs_f64()
    ));
    if corpus.text.is_empty() {
        bail!("no text found: the {} input file(s) are all empty (--input)", corpus.files.len());
    }

    let (mut tok, source) = match (loaded, spec) {
        (Some(tok), _) => (tok, source),
        (None, TokenizerSpec::Train { vocab_size }) => {
            let t = Instant::now();
            progress(&format!("training byte-level BPE tokenizer (vocab size {vocab_size})"));
            let chunks = split_into_chunks(&corpus.text, CHUNK_BYTES, true, &corpus.doc_ends);
            let tok = train_bpe(&chunks, vocab_size)?;
            let got = tok.get_vocab_size(true);
            progress(&format!("trained tokenizer: {got} tokens in {:.2}s", t.elapsed().as_secs_f64()));
            let source = format!(
                "trained: byte-level BPE, vocab_size {got} (requested {vocab_size}), min_frequency 2, {EOT} = 0"
            );
            (tok, source)
        }
        (None, _) => bail!("internal error: the given tokenizer was not loaded"),
    };
    // Settings from a loaded tokenizer.json that would alter the token stream.
    tok.with_truncation(None).map_err(|e| anyhow::anyhow!("could not disable truncation: {e}"))?;
    tok.with_padding(None);

    let vocab_size = tokenizer_vocab_size(&tok);
    let dtype = Dtype::for_vocab(vocab_size);
    let (bos_id, eos_id) = find_bos_eos(&tok);

    let t = Instant::now();
    let exact = chunking_is_exact(&tok);
    let chunks = split_into_chunks(&corpus.text, CHUNK_BYTES, exact, &corpus.doc_ends);
    let ids = encode_chunks(&tok, &chunks, corpus.text.len())?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
        bail!("the tokenizer produced id {bad}, outside its vocabulary of {vocab_size}");
    }
    progress(&format!(
        "encoded {} tokens ({:.2} bytes/token) in {:.2}s",
        ids.len(),
        corpus.text.len() as f64 / ids.len().max(1) as f64,
        t.elapsed().as_secs_f64()
    ));

    let n_val = val_count(ids.len(), args.val_fraction);
    let n_train = ids.len() - n_val;
    if n_val < MIN_SPLIT_TOKENS || n_train < MIN_SPLIT_TOKENS {
        bail!(
            "the corpus is too small: {} tokens split into {n_train} train / {n_val} val tokens \
             (--val-fraction {}); each split needs at least {MIN_SPLIT_TOKENS}: add text or change --val-fraction",
            ids.len(),
            args.val_fraction
        );
    }

    // Outputs: drop any old meta.json first, write the data, then meta.json last.
    fs::create_dir_all(out).with_context(|| format!("could not create --out {}", out.display()))?;
    if meta_path.exists() {
        fs::remove_file(&meta_path).with_context(|| format!("could not remove old {}", meta_path.display()))?;
    }
    let tok_json = tok.to_string(false).map_err(|e| anyhow::anyhow!("could not serialize the tokenizer: {e}"))?;
    write_atomic(&out.join("tokenizer.json"), |w| w.write_all(tok_json.as_bytes()))?;
    let (train, val) = ids.split_at(n_train);
    write_tokens(&out.join("train.bin"), train, dtype.name())?;
    write_tokens(&out.join("val.bin"), val, dtype.name())?;
    let meta = Meta {
        vocab_size,
        dtype: dtype.name().to_string(),
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        bos_id,
        eos_id,
        tokenizer_source: source,
        files: corpus.files,
        format_version: FORMAT_VERSION,
        text_bytes: corpus.text.len() as u64,
        val_fraction: Some(args.val_fraction),
        tokenizer_file: Some("tokenizer.json".to_string()),
    };
    meta.save(out)?;
    progress(&format!(
        "wrote {}: {} train + {} val tokens ({}), vocab {vocab_size}, in {:.2}s total",
        out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.dtype,
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "  Call me Ishmael. Some years ago—never mind how long precisely—\n\
        having little or no money in my purse, and nothing particular to interest me on shore,\n\
        I thought I would sail about a little and see the watery part of the world.\n\n\
        Café naïve, 東京タワー, 🐳🐋 and  double  spaces\t\ttabs\r\nCRLF line, Ā ÿ þ ĉ.\n";

    fn sample_text(copies: usize) -> String {
        (0..copies).map(|i| format!("{SAMPLE}{i}: ")).collect::<Vec<_>>().join("")
    }

    #[test]
    fn chunked_encoding_equals_whole_encoding() {
        let text = sample_text(20);
        let chunks = split_into_chunks(&text, 4096, true, &[]);
        let tok = train_bpe(&chunks, 400).unwrap();
        assert!(chunking_is_exact(&tok));
        let whole = tok.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        for target in [1, 7, 64, 1000] {
            let chunks = split_into_chunks(&text, target, true, &[]);
            assert!(chunks.len() > 1);
            assert_eq!(chunks.concat(), text);
            let ids = encode_chunks(&tok, &chunks, text.len()).unwrap();
            assert_eq!(ids, whole, "chunk target {target}");
        }
        assert_eq!(tok.decode(&whole, false).unwrap(), text);
    }

    #[test]
    fn trained_tokenizer_layout() {
        let text = sample_text(5);
        let tok = train_bpe(&[text.as_str()], 300).unwrap();
        assert_eq!(tok.token_to_id(EOT), Some(0));
        assert!(tok.get_vocab_size(true) <= 300);
        assert_eq!(find_bos_eos(&tok), (Some(0), Some(0)));
        // Every single byte is a token.
        assert_eq!(ByteLevel::alphabet().len(), 256);
        for ch in ByteLevel::alphabet() {
            assert!(tok.token_to_id(&ch.to_string()).is_some());
        }
        // A literal <|endoftext|> in the text is the special token.
        let ids = tok.encode_fast("a<|endoftext|>b", false).unwrap();
        assert!(ids.get_ids().contains(&0));
    }

    #[test]
    fn split_by_documents_when_not_exact() {
        let text = "ab\ncd\nef";
        let chunks = split_into_chunks(text, 1, false, &[3, 6]);
        assert_eq!(chunks, vec!["ab\n", "cd\n", "ef"]);
    }

    #[test]
    fn val_count_rounds() {
        assert_eq!(val_count(100, 0.1), 10);
        assert_eq!(val_count(15, 0.1), 2);
        assert_eq!(val_count(14, 0.1), 1);
    }

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
