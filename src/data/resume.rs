//! What makes `prepare --resume` possible: `--out/prepare-state.json`, written (atomically)
//! when the run starts and after every group of complete shards. It records the settings
//! that decide the output (inputs with their checksums, tokenizer, split, shard size), the
//! tokenizer written, the complete shards with their checksums, and where the reading
//! stands. A resume checks everything it can before writing anything: the same settings, the
//! same tokenizer, every recorded shard intact; then it reads past what the shards hold and
//! writes the rest, so that its shards are byte for byte those of an uninterrupted run.
//! The file is removed once `meta.json` is written.
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::input::Inputs;
use super::options::{PrepareOptions, Prepared};
use super::shards::{file_sha256, ShardInfo, STATE_FILE};
use super::tokens::InputFile;
use crate::files::write_atomic;

const STATE_VERSION: u32 = 1;

/// The settings that decide a prepared directory's contents: a resume must have the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The `--input` arguments (`hf:` datasets pinned).
    pub inputs: Vec<String>,
    /// Every input file with its size and SHA-256.
    pub files: Vec<InputFile>,
    pub text_field: String,
    /// `bytes`, `train vocab_size=N sample_bytes=S` or the `--tokenizer` argument.
    pub tokenizer: String,
    pub lossy: bool,
    /// `val_fraction=F` or `val_docs=N`.
    pub split: String,
    pub split_seed: u64,
    pub shard_tokens: u64,
}

impl Settings {
    pub(super) fn new(opts: &PrepareOptions, inputs: &Inputs, files: &[InputFile]) -> Settings {
        let tokenizer = match (&opts.tokenizer, opts.bytes) {
            (_, true) => "bytes".to_string(),
            (Some(t), false) => t.clone(),
            (None, false) => {
                format!("train vocab_size={} sample_bytes={}", opts.vocab_size, opts.tokenizer_sample_bytes)
            }
        };
        let split = match opts.val_docs {
            Some(n) => format!("val_docs={n}"),
            None => format!("val_fraction={}", opts.val_fraction),
        };
        Settings {
            inputs: inputs.specs.clone(),
            files: files.to_vec(),
            text_field: opts.text_field.clone(),
            tokenizer,
            lossy: opts.lossy,
            split,
            split_seed: opts.split_seed,
            shard_tokens: opts.shard_tokens,
        }
    }
}

/// Running totals of what the complete shards hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub train_documents: u64,
    pub val_documents: u64,
    /// Bytes of document text read into the complete shards.
    pub text_bytes: u64,
}

/// The contents of `prepare-state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub settings: Settings,
    /// SHA-256 of `--out/tokenizer.json`.
    pub tokenizer_sha256: String,
    pub tokenizer_source: String,
    pub tokenizer_sample_bytes: Option<u64>,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    /// The next piece to read: document ordinal and piece within it.
    pub next_doc: u64,
    pub next_piece: u32,
    /// Bytes of the current document before `next_piece` (a single-document split needs them).
    pub doc_offset: u64,
    /// The complete shards.
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
    pub counts: Counts,
}

impl State {
    pub(super) fn new(settings: Settings, tok: &Prepared) -> State {
        State {
            version: STATE_VERSION,
            settings,
            tokenizer_sha256: format!("{:x}", Sha256::digest(tok.json.as_bytes())),
            tokenizer_source: tok.source.clone(),
            tokenizer_sample_bytes: tok.sample_bytes,
            bos_id: tok.bos,
            eos_id: tok.eos,
            next_doc: 0,
            next_piece: 0,
            doc_offset: 0,
            train: Vec::new(),
            val: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// The state of an unfinished prepare in `out`, if there is one.
    pub(super) fn load(out: &Path) -> Result<Option<State>> {
        let path = out.join(STATE_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a prepare state file; start over with --force", path.display()))?;
        if state.version != STATE_VERSION {
            bail!(
                "{} has version {}, this lors-lm reads {STATE_VERSION}; start over with --force",
                path.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    /// Writes the state atomically.
    pub(super) fn save(&self, out: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("could not serialize the prepare state")?;
        write_atomic(&out.join(STATE_FILE), |w| w.write_all(json.as_bytes()))
    }

    /// Refuses a resume with other settings than the earlier run's (naming the first
    /// difference), or whose recorded shards are missing or changed.
    pub(super) fn check(&self, now: &Settings, out: &Path) -> Result<()> {
        let was = &self.settings;
        let differs = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
            anyhow::anyhow!(
                "--resume: the earlier run in {} had {what} {a:?}, this one {b:?}; resume with the same inputs and \
                 options, or start over with --force",
                out.display()
            )
        };
        if was.inputs != now.inputs {
            return Err(differs("--input", &was.inputs, &now.inputs));
        }
        if was.files.len() != now.files.len() {
            return Err(differs("input files", &was.files.len(), &now.files.len()));
        }
        for (a, b) in was.files.iter().zip(&now.files) {
            if a != b {
                bail!(
                    "--resume: input {} changed since the earlier run in {} (was {} bytes, SHA-256 {}; now {} bytes, \
                     SHA-256 {}); start over with --force",
                    b.path,
                    out.display(),
                    a.bytes,
                    a.sha256,
                    b.bytes,
                    b.sha256
                );
            }
        }
        if was.tokenizer != now.tokenizer {
            return Err(differs("tokenizer", &was.tokenizer, &now.tokenizer));
        }
        if was.text_field != now.text_field {
            return Err(differs("--text-field", &was.text_field, &now.text_field));
        }
        if was.lossy != now.lossy {
            return Err(differs("--lossy", &was.lossy, &now.lossy));
        }
        if (&was.split, was.split_seed) != (&now.split, now.split_seed) {
            return Err(differs("split", &(&was.split, was.split_seed), &(&now.split, now.split_seed)));
        }
        if was.shard_tokens != now.shard_tokens {
            return Err(differs("--shard-tokens", &was.shard_tokens, &now.shard_tokens));
        }
        for shard in self.train.iter().chain(&self.val) {
            let path = out.join(&shard.file);
            let ok = path.is_file() && file_sha256(&path)? == shard.sha256;
            if !ok {
                bail!(
                    "--resume: shard {} of the earlier run is missing or changed; start over with --force",
                    path.display()
                );
            }
        }
        Ok(())
    }
}
