//! What `lors-lm prepare` is asked to do ([`PrepareOptions`]) and what its steps hand each
//! other: the scan's findings ([`Scan`], pass 1) and the tokenizer ready for pass 2
//! ([`Prepared`]). The steps themselves are in `prepare.rs` (the order), `pipeline.rs` (pass 2)
//! and `resume.rs` (`--resume`); this module depends on none of them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tokenizers::Tokenizer;

use super::encode::Encoder;
use super::input::{ReadOptions, TextMode};
use super::split::{Split, SplitRule, DEFAULT_SPLIT_SEED};
use super::tokenizer::{find_bos_eos, tokenizer_vocab_size, DEFAULT_VOCAB_SIZE, EOT};
use super::tokens::InputFile;

/// Each split must hold at least this many tokens (one input and one target).
pub const MIN_SPLIT_TOKENS: usize = 2;
/// The validation fraction used when none is given.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
/// Tokens per shard when `--shard-tokens` is not given.
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;
/// Bytes of text a BPE tokenizer is trained on when `--tokenizer-sample-bytes` is not given.
pub const DEFAULT_TOKENIZER_SAMPLE_BYTES: u64 = 256 << 20;
/// What to prepare: the flags of `lors-lm prepare` as plain values (errors name the flags).
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files, directories or `hf:datasets/…` repos to read, in this order (see `--help`).
    pub input: Vec<PathBuf>,
    /// Output directory: receives tokenizer.json, the shards and meta.json.
    pub out: PathBuf,
    /// Vocabulary size of the byte-level BPE tokenizer to train (when `tokenizer` is `None`).
    pub vocab_size: usize,
    /// An existing tokenizer instead: a tokenizer.json path, a GGUF, or `hf:OWNER/NAME[@REVISION]`.
    pub tokenizer: Option<String>,
    /// A byte-level vocabulary instead of a tokenizer: 256 byte tokens + `<|endoftext|>`.
    pub bytes: bool,
    /// The JSON lines field / Parquet column holding the text.
    pub text_field: String,
    /// Fraction of the documents kept for validation (by their hash); in (0, 1).
    pub val_fraction: f64,
    /// Exactly this many documents (the smallest hashes) for validation instead.
    pub val_docs: Option<u64>,
    /// Seed of the document hash that chooses the validation documents.
    pub split_seed: u64,
    /// A shard is closed once it holds this many tokens.
    pub shard_tokens: u64,
    /// At most this many bytes of training text are used to train a BPE tokenizer.
    pub tokenizer_sample_bytes: u64,
    /// Replace invalid UTF-8 sequences with U+FFFD instead of refusing the file.
    pub lossy: bool,
    /// Overwrite an output directory that already holds prepared data.
    pub force: bool,
    /// Continue a killed prepare from its last complete shards.
    pub resume: bool,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress_bar: bool,
}

impl PrepareOptions {
    /// Options with the defaults of `lors-lm prepare`.
    pub fn new(input: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
        PrepareOptions {
            input,
            out,
            vocab_size: DEFAULT_VOCAB_SIZE,
            tokenizer: None,
            bytes: false,
            text_field: "text".to_string(),
            val_fraction: DEFAULT_VAL_FRACTION,
            val_docs: None,
            split_seed: DEFAULT_SPLIT_SEED,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            tokenizer_sample_bytes: DEFAULT_TOKENIZER_SAMPLE_BYTES,
            lossy: false,
            force: false,
            resume: false,
            progress_bar: false,
        }
    }

    pub(super) fn rule(&self) -> SplitRule {
        match self.val_docs {
            Some(n) => SplitRule::Docs(n),
            None => SplitRule::Fraction(self.val_fraction),
        }
    }

    pub(super) fn read_options(&self) -> ReadOptions {
        let mode = if self.bytes { TextMode::Bytes } else { TextMode::Utf8 { lossy: self.lossy } };
        ReadOptions { text_field: self.text_field.clone(), mode, seed: self.split_seed, warn: false }
    }
}

/// What the scan found.
pub(super) struct Scan {
    pub files: Vec<InputFile>,
    pub documents: u64,
    pub text_bytes: u64,
    pub split: Split,
    pub split_line: String,
}

/// The tokenizer ready for pass 2.
pub(super) struct Prepared {
    pub encoder: Encoder,
    /// tokenizer.json as written into --out.
    pub json: String,
    pub source: String,
    pub vocab_size: usize,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Bytes a trained tokenizer was trained on.
    pub sample_bytes: Option<u64>,
}

impl Prepared {
    /// Truncation and padding of a loaded tokenizer.json, which would alter the token stream,
    /// are switched off (and so are off in the copy written).
    pub(super) fn new(mut tok: Tokenizer, source: String, sample_bytes: Option<u64>, bytes: bool) -> Result<Prepared> {
        tok.with_truncation(None).map_err(|e| anyhow::anyhow!("could not disable truncation: {e}"))?;
        tok.with_padding(None);
        let vocab_size = tokenizer_vocab_size(&tok);
        let (bos, eos) = find_bos_eos(&tok);
        let Some(eos) = eos else {
            bail!(
                "the tokenizer ({source}) has no end-of-text token (none of {EOT}, <|end_of_text|>, </s>, <eos>); \
                 prepare puts one after every document"
            )
        };
        let json = tok.to_string(false).map_err(|e| anyhow::anyhow!("could not serialize the tokenizer: {e}"))?;
        let encoder = if bytes { Encoder::Bytes } else { Encoder::tokenizer(tok) };
        Ok(Prepared { encoder, json, source, vocab_size, bos, eos, sample_bytes })
    }
}

/// A byte count for progress lines: `512 B`, `1.5 KiB`, `3.2 MiB`, ….
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
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
