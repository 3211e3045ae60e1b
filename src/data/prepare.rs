//! The pipeline behind `lors-lm prepare`, one named step each: check the options and the
//! output directory, resolve the inputs, scan the corpus (pass 1: every input checked, the
//! documents counted and the split chosen, nothing written), get the tokenizer (loaded, built
//! for `--bytes`, or trained on a sample), then read, encode and write the shards (pass 2,
//! [`super::pipeline`]) and `meta.json` last. The rules for each step are in the module docs
//! of [`crate::data`].
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::encode::byte_tokenizer;
use super::input::{self, Documents, Inputs, ReadOptions};
use super::options::{human_bytes, Prepared, Scan};
pub use super::options::{
    PrepareOptions, DEFAULT_SHARD_TOKENS, DEFAULT_TOKENIZER_SAMPLE_BYTES, DEFAULT_VAL_FRACTION, MIN_SPLIT_TOKENS,
};
use super::pipeline::{write_shards, Written};
use super::progress;
use super::resume::{Settings, State};
use super::shards::{file_sha256, is_shard_name, STATE_FILE};
use super::split::{fraction_threshold, Split, SplitPlanner, SplitRule};
use super::tokenizer::{train_bpe_on, TokenizerPlan, TokenizerSpec, EOT};
use super::tokens::{InputFile, Meta};
use crate::files::{same_path, write_atomic};
use crate::formats::load_tokenizer;

/// The fixed names of the files `prepare` writes into `--out` (and `--force` replaces), besides
/// the shards ([`super::shards::is_shard_name`]); `train.bin`/`val.bin` are the splits of
/// directories written before shards, replaced too. Nothing else there is touched.
const OUTPUT_FILES: [&str; 5] = ["meta.json", "tokenizer.json", STATE_FILE, "train.bin", "val.bin"];

/// Whether `name` is a file `prepare` writes into `--out` (or its temp file).
fn is_output_name(name: &str) -> bool {
    let name = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")).unwrap_or(name);
    OUTPUT_FILES.contains(&name) || is_shard_name(name)
}

/// Where the tokenizer comes from.
enum Plan {
    Given(TokenizerPlan),
    Bytes,
}

/// Prepares `opts.out` from `opts.input` and returns the `meta.json` written. Progress goes to
/// stderr. Nothing is written before every input has been read once and found good.
pub fn prepare(opts: &PrepareOptions) -> Result<Meta> {
    let t0 = Instant::now();
    let spec = check_options(opts)?;
    let out = &opts.out;
    if opts.resume && out.join("meta.json").is_file() {
        let _ = fs::remove_file(out.join(STATE_FILE));
        progress(&format!("--resume: {} is already complete (meta.json); nothing to do", out.display()));
        return Meta::load(out);
    }
    let earlier = if opts.resume { State::load(out)? } else { None };
    if opts.resume && earlier.is_none() {
        progress(&format!("--resume: no unfinished prepare in {}; starting from the beginning", out.display()));
    }
    let inputs = input::resolve(&opts.input)?;
    // A given tokenizer is loaded first, so that a bad one fails fast.
    let plan = match spec {
        None => Plan::Bytes,
        Some(spec) => Plan::Given(spec.load()?),
    };
    let read = opts.read_options();
    let scan = scan(&inputs, &read, opts.rule(), t0)?;
    let settings = Settings::new(opts, &inputs, &scan.files);
    if let Some(state) = &earlier {
        state.check(&settings, out)?;
    }
    let tokenizer = match &earlier {
        Some(state) => resumed_tokenizer(out, state, plan)?,
        None => make_tokenizer(plan, opts, &inputs, &read, &scan)?,
    };
    let mut state = match earlier {
        Some(state) => state,
        None => start_fresh(out, &tokenizer, settings)?,
    };
    let Prepared { encoder, vocab_size, eos, .. } = tokenizer;
    let written = write_shards(&inputs, &read, &scan, &encoder, eos, vocab_size, &mut state, opts, out)?;
    let meta = match finish(opts, &inputs, &scan, &state, &written) {
        Ok(meta) => meta,
        Err(e) => {
            // Nothing to resume: leave no half-made directory behind.
            remove_outputs(out)?;
            return Err(e);
        }
    };
    meta.save(out)?;
    let _ = fs::remove_file(out.join(STATE_FILE));
    Ok(meta)
}

/// Checks the options that need no reading and the state of `--out`, refusing to clobber
/// prepared data; returns the tokenizer spec (None for `--bytes`).
fn check_options(opts: &PrepareOptions) -> Result<Option<TokenizerSpec>> {
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        bail!("--val-fraction {} must be between 0 and 1 (exclusive), e.g. 0.1", opts.val_fraction);
    }
    if opts.val_docs == Some(0) {
        bail!("--val-docs 0: the validation split needs at least one document");
    }
    if opts.shard_tokens == 0 {
        bail!("--shard-tokens must be positive, e.g. 100000000");
    }
    if opts.text_field.is_empty() {
        bail!("--text-field must not be empty");
    }
    if opts.force && opts.resume {
        bail!("--force starts over and --resume continues: pass one of them");
    }
    let spec = match opts.bytes {
        true if opts.tokenizer.is_some() => bail!("--bytes and --tokenizer: pass one of them"),
        true => None,
        false => Some(TokenizerSpec::parse(opts.tokenizer.as_deref(), opts.vocab_size)?),
    };
    let out = &opts.out;
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    for input in &opts.input {
        let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = input.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if is_output_name(&name) && same_path(parent, out) {
            bail!(
                "--input {} is the {name} that prepare writes into --out {}: choose another --out",
                input.display(),
                out.display()
            );
        }
    }
    if out.join("meta.json").exists() && !opts.force && !opts.resume {
        bail!(
            "--out {} already holds prepared data (meta.json); pass --force to overwrite it, or choose another --out",
            out.display()
        );
    }
    if out.join(STATE_FILE).exists() && !opts.force && !opts.resume {
        bail!(
            "--out {} holds an unfinished prepare ({STATE_FILE}): pass --resume to continue it, or --force to start over",
            out.display()
        );
    }
    Ok(spec)
}

// ---------------------------------------------------------------------------------------------
// Pass 1: the scan
// ---------------------------------------------------------------------------------------------

/// Reads every input once: file checksums, every document checked (so that bad input is
/// refused before anything is written), counted and keyed; the split chosen.
fn scan(inputs: &Inputs, read: &ReadOptions, rule: SplitRule, t0: Instant) -> Result<Scan> {
    let mut files = Vec::with_capacity(inputs.files.len());
    for f in &inputs.files {
        let bytes = fs::metadata(&f.path).with_context(|| format!("could not stat {}", f.path.display()))?.len();
        let sha256 = file_sha256(&f.path)?;
        files.push(InputFile { path: f.path.to_string_lossy().into_owned(), bytes, sha256 });
    }
    let mut planner = SplitPlanner::new(rule);
    let (mut documents, mut text_bytes) = (0u64, 0u64);
    let read = ReadOptions { warn: true, ..read.clone() };
    for piece in Documents::new(&inputs.files, &read) {
        let piece = piece?;
        text_bytes += piece.text.len() as u64;
        if piece.last {
            planner.observe(piece.key);
            documents += 1;
        }
    }
    let file_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    progress(&format!(
        "read {} file(s), {}: {documents} documents, {} of text, in {:.2}s",
        files.len(),
        human_bytes(file_bytes),
        human_bytes(text_bytes),
        t0.elapsed().as_secs_f64()
    ));
    if documents == 0 {
        bail!(
            "no text found: the {} input file(s) are all empty (no documents: empty files, blank lines or empty \
             text fields) (--input)",
            files.len()
        );
    }
    let (split, split_line) = planner.finish((documents == 1).then_some(text_bytes))?;
    progress(&format!("split: {split_line}"));
    Ok(Scan { files, documents, text_bytes, split, split_line })
}

// ---------------------------------------------------------------------------------------------
// The tokenizer
// ---------------------------------------------------------------------------------------------

/// The tokenizer of a fresh run: loaded, the byte vocabulary, or trained on a sample.
fn make_tokenizer(
    plan: Plan,
    opts: &PrepareOptions,
    inputs: &Inputs,
    read: &ReadOptions,
    scan: &Scan,
) -> Result<Prepared> {
    match plan {
        Plan::Bytes => Prepared::new(byte_tokenizer()?, BYTES_SOURCE.to_string(), None, true),
        Plan::Given(TokenizerPlan::Ready(tok, source)) => Prepared::new(*tok, source, None, false),
        Plan::Given(TokenizerPlan::Train { vocab_size }) => {
            let t = Instant::now();
            progress(&format!(
                "training byte-level BPE tokenizer (vocab size {vocab_size}) on up to {} of training text",
                human_bytes(opts.tokenizer_sample_bytes)
            ));
            let (tok, used) = train_on_sample(inputs, read, scan, vocab_size, opts.tokenizer_sample_bytes)?;
            let got = tok.get_vocab_size(true);
            progress(&format!(
                "trained tokenizer: {got} tokens on {} in {:.2}s",
                human_bytes(used),
                t.elapsed().as_secs_f64()
            ));
            let how = match scan.text_bytes > opts.tokenizer_sample_bytes {
                true => "a hashed sample of the training documents, spread over the corpus",
                false => "all training documents",
            };
            let source = format!(
                "trained: byte-level BPE, vocab_size {got} (requested {vocab_size}), min_frequency 2, {EOT} = 0, \
                 on {used} bytes: {how}"
            );
            Prepared::new(tok, source, Some(used), false)
        }
    }
}

/// A document's key for the tokenizer sample: its split key ([`super::split::doc_key`])
/// rehashed (the SplitMix64 finalizer of the key xor a constant), so that which documents are
/// sampled is independent of which are validation documents.
pub(super) fn sample_key(split_key: u64) -> u64 {
    let mut z = split_key ^ 0x7361_6d70_6c65_2121; // "sample!!"
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What `meta.json` says of the `--bytes` vocabulary.
const BYTES_SOURCE: &str = "bytes: 256 byte tokens (id = byte + 1) and <|endoftext|> = 0";

/// Trains the BPE tokenizer on a sample of the training documents of about `limit` bytes,
/// streamed from a reader thread (only the trainer's word counts stay in memory). When the
/// corpus holds more than `limit` bytes of text, a document is in the sample when its
/// [`sample_key`] is below `limit / corpus bytes` of the key range, so the sample is spread over
/// the whole corpus (not its first documents) and depends only on each document's text; the
/// sample stops at `limit` bytes in any case (whole pieces).
fn train_on_sample(
    inputs: &Inputs,
    read: &ReadOptions,
    scan: &Scan,
    vocab_size: usize,
    limit: u64,
) -> Result<(Tokenizer, u64)> {
    let (tx, rx) = mpsc::sync_channel::<String>(16);
    let (files, read, split) = (inputs.files.clone(), read.clone(), scan.split);
    let max_sample_key = match scan.text_bytes > limit {
        true => fraction_threshold(limit as f64 / scan.text_bytes as f64),
        false => u64::MAX,
    };
    let reader = std::thread::spawn(move || -> Result<u64> {
        let mut used = 0u64;
        let mut offset = 0u64;
        for piece in Documents::new(&files, &read) {
            let piece = piece?;
            let mut text = piece.text;
            match split {
                Split::Tail { cut } => {
                    let keep = cut.saturating_sub(offset).min(text.len() as u64) as usize;
                    offset += text.len() as u64;
                    text.truncate(keep);
                    // A cut inside a character is left to the character's end (it is a sample).
                    while !text.is_empty() && std::str::from_utf8(&text).is_err() {
                        text.pop();
                    }
                }
                Split::Keys { .. } if split.is_val(piece.key) => continue,
                Split::Keys { .. } if sample_key(piece.key) > max_sample_key => continue,
                Split::Keys { .. } => {}
            }
            if text.is_empty() {
                continue;
            }
            used += text.len() as u64;
            let text =
                String::from_utf8(text).map_err(|_| anyhow::anyhow!("internal error: a document is not UTF-8"))?;
            if tx.send(text).is_err() || used >= limit {
                break;
            }
        }
        Ok(used)
    });
    let trained = train_bpe_on(rx.into_iter(), vocab_size);
    let used = reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    Ok((trained?, used))
}

/// The tokenizer of a resumed run: `--out`'s tokenizer.json, which must be the one the earlier
/// run wrote, and which a given tokenizer must equal.
fn resumed_tokenizer(out: &Path, state: &State, plan: Plan) -> Result<Prepared> {
    let path = out.join("tokenizer.json");
    let json = fs::read_to_string(&path).with_context(|| format!("--resume: could not read {}", path.display()))?;
    let sha = |s: &str| format!("{:x}", Sha256::digest(s.as_bytes()));
    if sha(&json) != state.tokenizer_sha256 {
        bail!(
            "--resume: {} is not the tokenizer the earlier run wrote (its SHA-256 differs); start over with --force",
            path.display()
        );
    }
    let p = match plan {
        Plan::Bytes => Prepared::new(byte_tokenizer()?, BYTES_SOURCE.to_string(), None, true)?,
        Plan::Given(TokenizerPlan::Ready(tok, source)) => Prepared::new(*tok, source, None, false)?,
        Plan::Given(TokenizerPlan::Train { .. }) => {
            let tok = load_tokenizer(&path)?;
            Prepared::new(tok, state.tokenizer_source.clone(), state.tokenizer_sample_bytes, false)?
        }
    };
    if sha(&p.json) != state.tokenizer_sha256 {
        bail!(
            "--resume: the tokenizer is not the one the earlier run used ({}); resume with the same tokenizer, \
             or start over with --force",
            state.tokenizer_source
        );
    }
    Ok(p)
}

/// Clears `--out` of an earlier prepare's files (only those, see [`OUTPUT_FILES`]), then writes
/// tokenizer.json and the initial resume state.
fn start_fresh(out: &Path, tok: &Prepared, settings: Settings) -> Result<State> {
    fs::create_dir_all(out).with_context(|| format!("could not create --out {}", out.display()))?;
    // meta.json first: a directory with one is always complete.
    let meta_path = out.join("meta.json");
    if meta_path.exists() {
        fs::remove_file(&meta_path).with_context(|| format!("could not remove old {}", meta_path.display()))?;
    }
    remove_outputs(out)?;
    write_atomic(&out.join("tokenizer.json"), |w| w.write_all(tok.json.as_bytes()))?;
    let state = State::new(settings, tok);
    state.save(out)?;
    Ok(state)
}

/// Removes the files `prepare` writes from `out` (only those, see [`OUTPUT_FILES`]).
fn remove_outputs(out: &Path) -> Result<()> {
    for entry in fs::read_dir(out).with_context(|| format!("could not list --out {}", out.display()))? {
        let entry = entry.with_context(|| format!("could not list --out {}", out.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_output_name(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(entry.path())
                .with_context(|| format!("could not remove old {}", entry.path().display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// meta.json
// ---------------------------------------------------------------------------------------------

/// The meta.json of a finished run, after checking that both splits are usable.
fn finish(opts: &PrepareOptions, inputs: &Inputs, scan: &Scan, state: &State, written: &Written) -> Result<Meta> {
    let c = &state.counts;
    if (c.train_tokens as usize) < MIN_SPLIT_TOKENS || (c.val_tokens as usize) < MIN_SPLIT_TOKENS {
        bail!(
            "the corpus is too small: {} documents gave {} train / {} val tokens ({}); each split needs at least \
             {MIN_SPLIT_TOKENS}: add text or change --val-fraction / --val-docs",
            scan.documents,
            c.train_tokens,
            c.val_tokens,
            scan.split_line
        );
    }
    let mut meta = Meta::empty(written.vocab_size);
    meta.train_tokens = c.train_tokens;
    meta.val_tokens = c.val_tokens;
    meta.train_documents = c.train_documents;
    meta.val_documents = c.val_documents;
    meta.text_bytes = c.text_bytes;
    meta.shards.train = state.train.clone();
    meta.shards.val = state.val.clone();
    meta.bos_id = state.bos_id;
    meta.eos_id = Some(state.eos_id);
    meta.tokenizer_source = state.tokenizer_source.clone();
    meta.tokenizer_file = Some("tokenizer.json".to_string());
    meta.tokenizer_sample_bytes = state.tokenizer_sample_bytes;
    meta.files = scan.files.clone();
    meta.inputs = inputs.specs.clone();
    meta.text_field = Some(opts.text_field.clone());
    meta.split = Some(scan.split_line.clone());
    meta.val_fraction = opts.val_docs.is_none().then_some(opts.val_fraction);
    meta.val_docs = opts.val_docs;
    meta.split_seed = Some(opts.split_seed);
    meta.shard_tokens = Some(opts.shard_tokens);
    meta.byte_level = opts.bytes;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names() {
        for name in ["meta.json", "tokenizer.json", "train.bin", "val-00003.bin", ".train-00000.bin.tmp", STATE_FILE] {
            assert!(is_output_name(name), "{name}");
        }
        for name in ["corpus.txt", "notes.json", "train.txt", ".corpus.txt.tmp", "train-1.bin"] {
            assert!(!is_output_name(name), "{name}");
        }
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
