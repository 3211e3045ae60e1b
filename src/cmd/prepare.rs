//! `lors-lm prepare`: text files → tokenizer + token files. The pipeline is
//! [`crate::data::prepare`]; this file holds its flags.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::{PrepareOptions, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE};

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

    /// Use an existing tokenizer instead of training one: a tokenizer.json file, a .gguf model
    /// (its embedded tokenizer, so the data fits that model), or hf:OWNER/NAME[@REVISION] from
    /// the Hugging Face Hub (through its standard cache; HF_HUB_OFFLINE=1 uses the cache only).
    #[arg(long, value_name = "FILE|GGUF|hf:OWNER/NAME")]
    pub tokenizer: Option<String>,

    /// Fraction of the token stream, taken from its end, kept for validation (val.bin).
    #[arg(long, value_name = "F", default_value_t = DEFAULT_VAL_FRACTION)]
    pub val_fraction: f64,

    /// Replace invalid UTF-8 sequences with U+FFFD instead of refusing the file.
    #[arg(long)]
    pub lossy: bool,

    /// Overwrite an output directory that already holds prepared data.
    #[arg(long)]
    pub force: bool,
}

impl PrepareArgs {
    /// The flags as the options of [`crate::data::prepare`].
    pub fn options(&self) -> PrepareOptions {
        PrepareOptions {
            input: self.input.clone(),
            out: self.out.clone(),
            vocab_size: self.vocab_size,
            tokenizer: self.tokenizer.clone(),
            val_fraction: self.val_fraction,
            lossy: self.lossy,
            force: self.force,
        }
    }
}

pub fn run(args: &PrepareArgs) -> Result<()> {
    crate::data::prepare(&args.options()).map(|_| ())
}
