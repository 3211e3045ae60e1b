//! `lors-lm prepare`: a corpus → tokenizer + token shards. The pipeline is
//! [`crate::data::prepare`]; this file holds its flags and prints the summary line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::data::{
    PrepareOptions, DEFAULT_SHARD_TOKENS, DEFAULT_SPLIT_SEED, DEFAULT_TOKENIZER_SAMPLE_BYTES, DEFAULT_VAL_FRACTION,
    DEFAULT_VOCAB_SIZE,
};

/// Arguments of `lors-lm prepare`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// What to read, in this order (repeatable, mixed): text files (*.txt, or any name not
    /// below; a file is one document, UTF-8, see --lossy/--bytes); JSON lines (*.jsonl,
    /// *.ndjson, also .gz/.zst: one document per line, its --text-field); Parquet (*.parquet:
    /// one document per row of the --text-field column); directories (searched recursively
    /// for those names, sorted by path); hf:datasets/OWNER/NAME[@REVISION][:CONFIG/SPLIT], the
    /// Parquet / JSON lines files of a Hugging Face dataset repo (all of them, or those under
    /// CONFIG/ whose path has a directory SPLIT or a name starting SPLIT-), through the Hub
    /// cache (HF_HUB_OFFLINE=1: the cache only).
    #[arg(long, short, value_name = "PATH|hf:datasets/…", required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,

    /// Output directory: receives tokenizer.json, the shards (train-00000.bin, …, val-00000.bin,
    /// …) and meta.json (written last).
    #[arg(long, short, value_name = "DIR")]
    pub out: PathBuf,

    /// Train a byte-level BPE tokenizer with this many tokens (at most; a small corpus may
    /// yield fewer), counting the 256 byte symbols and <|endoftext|> (id 0).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VOCAB_SIZE, conflicts_with_all = ["tokenizer", "bytes"])]
    pub vocab_size: usize,

    /// Use an existing tokenizer instead of training one: a tokenizer.json file, a .gguf model
    /// (its embedded tokenizer, so the data fits that model), or hf:OWNER/NAME[@REVISION] from
    /// the Hugging Face Hub (through its standard cache; HF_HUB_OFFLINE=1 uses the cache only).
    #[arg(long, value_name = "FILE|GGUF|hf:OWNER/NAME")]
    pub tokenizer: Option<String>,

    /// Byte-level vocabulary instead of a tokenizer: the 256 bytes (id = byte + 1) and
    /// <|endoftext|> (id 0), 257 ids (the smallest embedding). Text files are read byte for
    /// byte, valid UTF-8 or not (JSON strings as their UTF-8); recorded in meta.json
    /// (byte_level) and written as a tokenizer.json that decodes the ids back to bytes.
    #[arg(long, conflicts_with = "tokenizer")]
    pub bytes: bool,

    /// The JSON lines field / Parquet column that holds the text.
    #[arg(long, value_name = "NAME", default_value = "text")]
    pub text_field: String,

    /// Fraction of the documents kept for validation, chosen by a seeded hash of each
    /// document's text (so adding documents moves none of the others). A corpus of a single
    /// document keeps its last fraction of bytes instead.
    #[arg(long, value_name = "F", default_value_t = DEFAULT_VAL_FRACTION)]
    pub val_fraction: f64,

    /// Keep exactly this many documents for validation instead: those with the smallest hashes.
    #[arg(long, value_name = "N", conflicts_with = "val_fraction")]
    pub val_docs: Option<u64>,

    /// Seed of the document hash that picks the validation documents.
    #[arg(long, value_name = "SEED", default_value_t = DEFAULT_SPLIT_SEED)]
    pub split_seed: u64,

    /// Tokens per shard: a shard is closed at the first document end (or, for a text file
    /// larger than a shard, piece end) at which it holds this many.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,

    /// Train the BPE tokenizer on a sample of about this many bytes of training documents, picked
    /// by a hash of each document so that it spreads over the whole corpus (all of them when the
    /// corpus is smaller).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_TOKENIZER_SAMPLE_BYTES)]
    pub tokenizer_sample_bytes: u64,

    /// Replace invalid UTF-8 sequences with U+FFFD instead of refusing the file.
    #[arg(long)]
    pub lossy: bool,

    /// Overwrite an output directory that already holds prepared data (only prepare's own
    /// files there are replaced).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,

    /// Continue an interrupted prepare in --out from its last complete shards, with the same
    /// inputs and options (refused otherwise); the result equals an uninterrupted run's.
    #[arg(long)]
    pub resume: bool,
}

impl PrepareArgs {
    /// The flags as the options of [`crate::data::prepare`].
    pub fn options(&self) -> PrepareOptions {
        PrepareOptions {
            input: self.input.clone(),
            out: self.out.clone(),
            vocab_size: self.vocab_size,
            tokenizer: self.tokenizer.clone(),
            bytes: self.bytes,
            text_field: self.text_field.clone(),
            val_fraction: self.val_fraction,
            val_docs: self.val_docs,
            split_seed: self.split_seed,
            shard_tokens: self.shard_tokens,
            tokenizer_sample_bytes: self.tokenizer_sample_bytes,
            lossy: self.lossy,
            force: self.force,
            resume: self.resume,
            progress_bar: true,
        }
    }
}

/// Gives prepare glibc's allocator defaults back (large buffers mmapped and returned, the heap
/// trimmed): `device::tune_allocator` keeps all freed memory for training's fixed working set,
/// which for a stream of batches of every size only lets RSS creep up (360 MB instead of 240 MB
/// on 70 MB of JSON lines). A user's own `MALLOC_*` settings win.
fn default_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        // SAFETY: mallopt only changes allocator parameters; called before prepare starts threads.
        unsafe {
            if !set("MALLOC_MMAP_MAX_") && !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_MAX, 65536);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
            }
        }
    }
}

pub fn run(args: &PrepareArgs) -> Result<()> {
    default_allocator();
    let t0 = Instant::now();
    let meta = crate::data::prepare(&args.options())?;
    let secs = t0.elapsed().as_secs_f64();
    let tokens = meta.train_tokens + meta.val_tokens;
    let rss = crate::monitor::peak_rss_mb().map_or("n/a".to_string(), |mb| format!("{mb:.0} MB"));
    eprintln!(
        "prepare: done: {} documents ({} train / {} val), {tokens} tokens ({} train / {} val, {:.2} bytes/token), \
         {} + {} shards, vocab {} ({}), {:.1}s ({:.1} MB/s of text), peak RSS {rss} -> {}",
        meta.train_documents + meta.val_documents,
        meta.train_documents,
        meta.val_documents,
        meta.train_tokens,
        meta.val_tokens,
        meta.text_bytes as f64 / tokens.max(1) as f64,
        meta.shards.train.len(),
        meta.shards.val.len(),
        meta.vocab_size,
        meta.dtype,
        secs,
        meta.text_bytes as f64 / 1e6 / secs.max(1e-9),
        args.out.display()
    );
    Ok(())
}
