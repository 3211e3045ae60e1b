//! Pass 2 of `prepare`: read → encode → write, with fixed-size buffers. A reader thread
//! reads the documents ([`super::input::Documents`]) into batches of about [`BATCH_BYTES`]
//! (at most two waiting); the calling thread routes each piece to its split, encodes the
//! batch in parallel ([`Encoder`]) and appends the ids, with the end-of-text token after
//! every document, to the open shard of each split. Once either open shard holds
//! `--shard-tokens` tokens (at the end of a piece), both are closed and the resume state is
//! saved: a killed run continues from there ([`super::resume`]). Memory holds two batches,
//! their ids and the open shards' document ends, however large the corpus.
use std::io::IsTerminal;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::encode::Encoder;
use super::input::{Documents, Inputs, Piece, ReadOptions, TextMode};
use super::options::{human_bytes, PrepareOptions, Scan};
use super::progress;
use super::resume::{Counts, State};
use super::shards::{shard_name, Dtype, ShardWriter};
use super::split::Split;

/// Bytes of text read into one batch.
const BATCH_BYTES: usize = 4 << 20;
/// Batches read ahead of the encoder.
const BATCHES_AHEAD: usize = 2;

/// What pass 2 reports.
pub(super) struct Written {
    pub vocab_size: usize,
}

/// One split's open shard and the index of the next.
struct SplitWriter {
    split: &'static str,
    next_index: usize,
    open: Option<ShardWriter>,
}

impl SplitWriter {
    fn push(&mut self, out: &Path, dtype: Dtype, ids: &[u32], eos: Option<u32>) -> Result<()> {
        if ids.is_empty() && eos.is_none() {
            return Ok(());
        }
        if self.open.is_none() {
            self.open = Some(ShardWriter::create(&out.join(shard_name(self.split, self.next_index)), dtype)?);
        }
        let w = self.open.as_mut().expect("opened above");
        w.push(ids)?;
        if let Some(eos) = eos {
            w.push(&[eos])?;
            w.end_document();
        }
        Ok(())
    }

    fn tokens(&self) -> u64 {
        self.open.as_ref().map_or(0, |w| w.tokens())
    }

    /// Closes the open shard (if any), returning its entry.
    fn close(&mut self) -> Result<Option<super::shards::ShardInfo>> {
        let Some(w) = self.open.take() else { return Ok(None) };
        self.next_index += 1;
        w.finish().map(Some)
    }
}

/// Which split gets which part of a piece.
struct Unit {
    val: bool,
    start: usize,
    end: usize,
    /// A document (or the train part of a split document) ends with this unit.
    ends_doc: bool,
}

/// The units of `piece`, whose document has `offset` bytes before it.
fn route(piece: &Piece, split: Split, offset: u64, mode: TextMode) -> Vec<Unit> {
    let len = piece.text.len();
    let Split::Tail { cut } = split else {
        return vec![Unit { val: split.is_val(piece.key), start: 0, end: len, ends_doc: piece.last }];
    };
    let end = offset + len as u64;
    if end <= cut {
        return vec![Unit { val: false, start: 0, end: len, ends_doc: piece.last || end == cut }];
    }
    if offset >= cut {
        return vec![Unit { val: true, start: 0, end: len, ends_doc: piece.last }];
    }
    // The cut falls inside: after the next newline if one is near, else at a character boundary.
    let text = &piece.text;
    let mut c = (cut - offset) as usize;
    // In the document's last piece, look no further than half of what is left for validation.
    let window = if piece.last { (64 << 10).min((len - c) / 2) } else { 64 << 10 };
    if text[c - 1] == b'\n' {
        // Already at a line start.
    } else if let Some(nl) = text[c..len.min(c + window)].iter().position(|&b| b == b'\n') {
        c += nl + 1;
    } else if mode != TextMode::Bytes {
        while c < len && (text[c] & 0xC0) == 0x80 {
            c += 1;
        }
    }
    let mut units = vec![Unit { val: false, start: 0, end: c, ends_doc: true }];
    if c < len || piece.last {
        units.push(Unit { val: true, start: c, end: len, ends_doc: piece.last });
    }
    units
}

/// Reads, encodes and writes everything after the state's position; updates `state` (and
/// saves it after every group of shards).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_shards(
    inputs: &Inputs,
    read: &ReadOptions,
    scan: &Scan,
    encoder: &Encoder,
    eos: u32,
    vocab_size: usize,
    state: &mut State,
    opts: &PrepareOptions,
    out: &Path,
) -> Result<Written> {
    let dtype = Dtype::for_vocab(vocab_size);
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<Piece>>>(BATCHES_AHEAD);
    let (files, reader_opts) = (inputs.files.clone(), read.clone());
    let resume_at = (state.next_doc, state.next_piece);
    let reader = std::thread::spawn(move || {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for piece in Documents::new(&files, &reader_opts) {
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if (piece.doc, piece.index) < resume_at {
                continue;
            }
            bytes += piece.text.len();
            batch.push(piece);
            if bytes >= BATCH_BYTES {
                if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                    return;
                }
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch));
        }
    });

    let mut train = SplitWriter { split: "train", next_index: state.train.len(), open: None };
    let mut val = SplitWriter { split: "val", next_index: state.val.len(), open: None };
    let mut live: Counts = state.counts.clone();
    // Bytes of the current document before the next piece: for routing, and for the state.
    let (mut offset, mut doc_offset) = (state.doc_offset, state.doc_offset);
    let mut bar = Bar::new(scan.text_bytes, state.counts.text_bytes, opts.progress_bar);
    let result = (|| -> Result<()> {
        for batch in rx {
            let batch = batch?;
            let routed: Vec<Vec<Unit>> = batch
                .iter()
                .map(|p| {
                    let units = route(p, scan.split, offset, read.mode);
                    offset = if p.last { 0 } else { offset + p.text.len() as u64 };
                    units
                })
                .collect();
            let texts: Vec<&[u8]> = batch
                .iter()
                .zip(&routed)
                .flat_map(|(p, units)| units.iter().map(|u| &p.text[u.start..u.end]))
                .collect();
            let mut ids = encoder.encode(&texts)?.into_iter();
            crate::alloc::collect_all_threads();
            for (piece, units) in batch.iter().zip(&routed) {
                for unit in units {
                    let ids = ids.next().unwrap_or_default();
                    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                        bail!("the tokenizer produced id {bad}, outside its vocabulary of {vocab_size}");
                    }
                    let (writer, tokens, docs) = match unit.val {
                        true => (&mut val, &mut live.val_tokens, &mut live.val_documents),
                        false => (&mut train, &mut live.train_tokens, &mut live.train_documents),
                    };
                    writer.push(out, dtype, &ids, unit.ends_doc.then_some(eos))?;
                    *tokens += ids.len() as u64 + u64::from(unit.ends_doc);
                    *docs += u64::from(unit.ends_doc);
                }
                live.text_bytes += piece.text.len() as u64;
                doc_offset = if piece.last { 0 } else { doc_offset + piece.text.len() as u64 };
                let (next_doc, next_piece) = if piece.last { (piece.doc + 1, 0) } else { (piece.doc, piece.index + 1) };
                if train.tokens() >= opts.shard_tokens || val.tokens() >= opts.shard_tokens {
                    close(&mut train, &mut val, state)?;
                    (state.next_doc, state.next_piece, state.doc_offset) = (next_doc, next_piece, doc_offset);
                    state.counts = live.clone();
                    state.save(out)?;
                }
                bar.update(
                    live.text_bytes,
                    live.train_documents + live.val_documents,
                    live.train_tokens + live.val_tokens,
                );
            }
        }
        Ok(())
    })();
    bar.finish();
    let reader_ok = reader.join().is_ok();
    if let Err(e) = result {
        for w in [train.open.take(), val.open.take()].into_iter().flatten() {
            w.abandon();
        }
        return Err(e);
    }
    if !reader_ok {
        bail!("the reader thread panicked");
    }
    close(&mut train, &mut val, state)?;
    state.counts = live;
    state.next_doc = scan.documents;
    state.next_piece = 0;
    state.doc_offset = 0;
    state.save(out)?;
    let t = bar.t0.elapsed().as_secs_f64();
    progress(&format!(
        "encoded {} in {t:.2}s ({}/s): {} train + {} val tokens in {} + {} shard(s)",
        human_bytes(state.counts.text_bytes.saturating_sub(bar.start)),
        human_bytes(((state.counts.text_bytes.saturating_sub(bar.start)) as f64 / t.max(1e-9)) as u64),
        state.counts.train_tokens,
        state.counts.val_tokens,
        state.train.len(),
        state.val.len()
    ));
    Ok(Written { vocab_size })
}

/// Closes both open shards, recording them in the state (not yet saved).
fn close(train: &mut SplitWriter, val: &mut SplitWriter, state: &mut State) -> Result<()> {
    if let Some(info) = train.close()? {
        state.train.push(info);
    }
    if let Some(info) = val.close()? {
        state.val.push(info);
    }
    Ok(())
}

/// Progress of pass 2: a bar on a terminal, else a line every 10 seconds.
struct Bar {
    bar: Option<ProgressBar>,
    t0: Instant,
    last_line: Instant,
    total: u64,
    /// Bytes done before this run (a resume).
    start: u64,
}

impl Bar {
    fn new(total: u64, start: u64, enabled: bool) -> Bar {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "prepare: [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {msg}, ETA {eta})",
            )
            .expect("a valid template");
            bar.set_style(style);
            bar.set_position(start);
            bar.reset_eta();
            bar
        });
        let now = Instant::now();
        Bar { bar, t0: now, last_line: now, total, start }
    }

    fn update(&mut self, done: u64, docs: u64, tokens: u64) {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let tok_s = tokens as f64 / secs;
        let msg = format!("{docs} docs, {tokens} tokens, {:.2}M tok/s", tok_s / 1e6);
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(msg);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(10) => {
                self.last_line = Instant::now();
                let rate = done.saturating_sub(self.start) as f64 / secs;
                let eta = self.total.saturating_sub(done) as f64 / rate.max(1e-9);
                progress(&format!(
                    "{:.0}% {} / {} ({}/s), {msg}, ETA {eta:.0}s",
                    100.0 * done as f64 / self.total.max(1) as f64,
                    human_bytes(done),
                    human_bytes(self.total),
                    human_bytes(rate as u64)
                ));
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
