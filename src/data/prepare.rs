//! The pipeline behind `lors-lm prepare`, one named step each: check the options, get the
//! tokenizer, read the corpus, encode it, split it, write the directory (`meta.json` last).
//! The rules for each step are in the module docs of [`crate::data`].
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::progress;
use super::tokenizer::{
    chunking_is_exact, find_bos_eos, split_into_chunks, tokenizer_vocab_size, train_bpe, TokenizerPlan, TokenizerSpec,
    DEFAULT_VOCAB_SIZE, EOT,
};
use super::tokens::{write_splits, InputFile, Meta};
use crate::files::write_atomic;

/// Each split must hold at least this many tokens (one input and one target).
pub const MIN_SPLIT_TOKENS: usize = 2;
/// The files `prepare` writes into `--out` (and `--force` replaces); nothing else there is
/// touched.
const OUTPUT_FILES: [&str; 4] = ["meta.json", "tokenizer.json", "train.bin", "val.bin"];
/// The validation fraction used when none is given.
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;
/// Target size of the text pieces encoded in parallel (see [`split_into_chunks`]).
const CHUNK_BYTES: usize = 128 * 1024;

/// What to prepare: the flags of `lors-lm prepare` as plain values (errors name the flags).
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Text files or directories to read, in this order; directories are searched recursively
    /// for `*.txt` files, sorted by path.
    pub input: Vec<PathBuf>,
    /// Output directory: receives tokenizer.json, train.bin, val.bin and meta.json.
    pub out: PathBuf,
    /// Vocabulary size of the byte-level BPE tokenizer to train (when `tokenizer` is `None`).
    pub vocab_size: usize,
    /// An existing tokenizer instead: a tokenizer.json path, or `hf:OWNER/NAME[@REVISION]`.
    pub tokenizer: Option<String>,
    /// Fraction of the token stream, taken from its end, kept for validation; in (0, 1).
    pub val_fraction: f64,
    /// Replace invalid UTF-8 sequences with U+FFFD instead of refusing the file.
    pub lossy: bool,
    /// Overwrite an output directory that already holds prepared data.
    pub force: bool,
}

impl PrepareOptions {
    /// Options with the defaults of `lors-lm prepare`: train a tokenizer of
    /// [`DEFAULT_VOCAB_SIZE`] tokens, keep [`DEFAULT_VAL_FRACTION`] for validation.
    pub fn new(input: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
        PrepareOptions {
            input,
            out,
            vocab_size: DEFAULT_VOCAB_SIZE,
            tokenizer: None,
            val_fraction: DEFAULT_VAL_FRACTION,
            lossy: false,
            force: false,
        }
    }
}

/// Prepares `opts.out` from the text in `opts.input` and returns the `meta.json` written.
/// Progress lines go to stderr. Nothing is written to `opts.out` before every check has passed.
pub fn prepare(opts: &PrepareOptions) -> Result<Meta> {
    let t0 = Instant::now();
    let spec = check_options(opts)?;
    // A given tokenizer is loaded first, so that a bad one fails fast.
    let plan = spec.load()?;
    let corpus = read_inputs(&opts.input, opts.lossy, t0)?;
    let (mut tok, source) = match plan {
        TokenizerPlan::Ready(tok, source) => (*tok, source),
        TokenizerPlan::Train { vocab_size } => train_tokenizer(&corpus, vocab_size)?,
    };
    let encoded = encode_corpus(&mut tok, &corpus)?;
    let (train, val) = split_tokens(&encoded.ids, opts.val_fraction)?;
    let data = write_data(&opts.out, &tok, train, val, encoded.vocab_size)?;
    let meta = Meta {
        bos_id: encoded.bos_id,
        eos_id: encoded.eos_id,
        tokenizer_source: source,
        files: corpus.files,
        text_bytes: corpus.text.len() as u64,
        val_fraction: Some(opts.val_fraction),
        tokenizer_file: Some("tokenizer.json".to_string()),
        ..data
    };
    meta.save(&opts.out)?;
    progress(&format!(
        "wrote {}: {} train + {} val tokens ({}), vocab {}, in {:.2}s total",
        opts.out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.dtype,
        encoded.vocab_size,
        t0.elapsed().as_secs_f64()
    ));
    Ok(meta)
}

/// Checks the options that need no reading, and refuses to clobber prepared data before
/// doing any work.
fn check_options(opts: &PrepareOptions) -> Result<TokenizerSpec> {
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        bail!("--val-fraction {} must be between 0 and 1 (exclusive), e.g. 0.1", opts.val_fraction);
    }
    let spec = TokenizerSpec::parse(opts.tokenizer.as_deref(), opts.vocab_size)?;
    let out = &opts.out;
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    for name in OUTPUT_FILES {
        let written = out.join(name);
        if let Some(input) = opts.input.iter().find(|i| crate::files::same_path(i, &written)) {
            bail!(
                "--input {} is the {name} that prepare writes into --out {}: choose another --out",
                input.display(),
                out.display()
            );
        }
    }
    if out.join("meta.json").exists() && !opts.force {
        bail!(
            "--out {} already holds prepared data (meta.json); pass --force to overwrite it, or choose another --out",
            out.display()
        );
    }
    Ok(spec)
}

// ---------------------------------------------------------------------------------------------
// Reading the corpus
// ---------------------------------------------------------------------------------------------

/// Collects and reads the input files into one text; refuses an all-empty corpus.
fn read_inputs(inputs: &[PathBuf], lossy: bool, t0: Instant) -> Result<Corpus> {
    let paths = collect_files(inputs)?;
    let corpus = read_corpus(&paths, lossy)?;
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
    Ok(corpus)
}

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

// ---------------------------------------------------------------------------------------------
// Tokenizing
// ---------------------------------------------------------------------------------------------

/// Trains the default byte-level BPE tokenizer on the corpus; returns it with its source line.
fn train_tokenizer(corpus: &Corpus, vocab_size: usize) -> Result<(Tokenizer, String)> {
    let t = Instant::now();
    progress(&format!("training byte-level BPE tokenizer (vocab size {vocab_size})"));
    let chunks = split_into_chunks(&corpus.text, CHUNK_BYTES, true, &corpus.doc_ends);
    let tok = train_bpe(&chunks, vocab_size)?;
    let got = tok.get_vocab_size(true);
    progress(&format!("trained tokenizer: {got} tokens in {:.2}s", t.elapsed().as_secs_f64()));
    let source =
        format!("trained: byte-level BPE, vocab_size {got} (requested {vocab_size}), min_frequency 2, {EOT} = 0");
    Ok((tok, source))
}

/// The corpus as token ids, with what `meta.json` records about the tokenizer.
struct Encoded {
    ids: Vec<u32>,
    /// Ids the model must accept (largest id + 1).
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

/// Encodes the whole corpus. Truncation and padding settings of a loaded tokenizer.json, which
/// would alter the token stream, are switched off first (and so are off in the copy written).
fn encode_corpus(tok: &mut Tokenizer, corpus: &Corpus) -> Result<Encoded> {
    tok.with_truncation(None).map_err(|e| anyhow::anyhow!("could not disable truncation: {e}"))?;
    tok.with_padding(None);
    let vocab_size = tokenizer_vocab_size(tok);
    let (bos_id, eos_id) = find_bos_eos(tok);

    let t = Instant::now();
    let exact = chunking_is_exact(tok);
    let chunks = split_into_chunks(&corpus.text, CHUNK_BYTES, exact, &corpus.doc_ends);
    let ids = encode_chunks(tok, &chunks, corpus.text.len())?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
        bail!("the tokenizer produced id {bad}, outside its vocabulary of {vocab_size}");
    }
    progress(&format!(
        "encoded {} tokens ({:.2} bytes/token) in {:.2}s",
        ids.len(),
        corpus.text.len() as f64 / ids.len().max(1) as f64,
        t.elapsed().as_secs_f64()
    ));
    Ok(Encoded { ids, vocab_size, bos_id, eos_id })
}

/// Encodes the pieces in parallel batches, printing progress lines.
pub(super) fn encode_chunks(tok: &Tokenizer, chunks: &[&str], total_bytes: usize) -> Result<Vec<u32>> {
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
// Splitting and writing
// ---------------------------------------------------------------------------------------------

/// Number of validation tokens for a stream of `total` tokens.
fn val_count(total: usize, val_fraction: f64) -> usize {
    ((total as f64) * val_fraction).round() as usize
}

/// Splits the token stream into (train, val), refusing a split too small to train or evaluate on.
fn split_tokens(ids: &[u32], val_fraction: f64) -> Result<(&[u32], &[u32])> {
    let n_val = val_count(ids.len(), val_fraction);
    let n_train = ids.len() - n_val;
    if n_val < MIN_SPLIT_TOKENS || n_train < MIN_SPLIT_TOKENS {
        bail!(
            "the corpus is too small: {} tokens split into {n_train} train / {n_val} val tokens \
             (--val-fraction {}); each split needs at least {MIN_SPLIT_TOKENS}: add text or change --val-fraction",
            ids.len(),
            val_fraction
        );
    }
    Ok(ids.split_at(n_train))
}

/// Writes everything but `meta.json`: drops an old `meta.json` first (so a directory with one
/// is always complete), then writes tokenizer.json, train.bin and val.bin. Returns the
/// [`Meta`] of the token files, for the caller to complete and save last.
fn write_data(out: &Path, tok: &Tokenizer, train: &[u32], val: &[u32], vocab_size: usize) -> Result<Meta> {
    fs::create_dir_all(out).with_context(|| format!("could not create --out {}", out.display()))?;
    let meta_path = out.join("meta.json");
    if meta_path.exists() {
        fs::remove_file(&meta_path).with_context(|| format!("could not remove old {}", meta_path.display()))?;
    }
    let tok_json = tok.to_string(false).map_err(|e| anyhow::anyhow!("could not serialize the tokenizer: {e}"))?;
    write_atomic(&out.join("tokenizer.json"), |w| w.write_all(tok_json.as_bytes()))?;
    write_splits(out, train, val, vocab_size)
}

/// A byte count for progress lines: `512 B`, `1.5 KiB`, `3.2 MiB`, ….
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn val_count_rounds() {
        assert_eq!(val_count(100, 0.1), 10);
        assert_eq!(val_count(15, 0.1), 2);
        assert_eq!(val_count(14, 0.1), 1);
    }
}
