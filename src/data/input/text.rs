//! Text files: one document each, UTF-8 (or bytes with `--bytes`), optionally `.gz`/`.zst`.
//! A file up to [`PIECE_BYTES`] is read whole; a larger one is read twice, in pieces of about
//! that size: once for its split key, once for its text.
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{
    check_text, open_stream, read_error_hint, InputPath, RawPiece, ReadOptions, Reader, TextMode, PIECE_BYTES,
};
use crate::data::split::KeyHasher;

/// Where a piece may end: after `X\n` before `Y`, or before ` Y`, with X and Y printable
/// ASCII — pre-token boundaries of the GPT-2 byte-level regex (see
/// `tokenizer::split_into_chunks`), so a byte-level BPE encodes the pieces as the whole.
fn safe_cut(b: &[u8], i: usize) -> bool {
    (i >= 2 && i < b.len() && b[i - 1] == b'\n' && b[i - 2].is_ascii_graphic() && b[i].is_ascii_graphic())
        || (i >= 1 && i + 1 < b.len() && b[i] == b' ' && b[i - 1].is_ascii_graphic() && b[i + 1].is_ascii_graphic())
}

/// Where to end a piece of `buf` that is not the end of the file: the last safe cut, else
/// after the last newline, else at the last UTF-8 character boundary.
fn piece_end(buf: &[u8]) -> usize {
    let lo = buf.len() / 2;
    if let Some(i) = (lo.max(1)..buf.len()).rev().find(|&i| safe_cut(buf, i)) {
        return i;
    }
    if let Some(i) = buf.iter().rposition(|&b| b == b'\n').filter(|&i| i + 1 >= lo) {
        return i + 1;
    }
    let mut i = buf.len();
    while i > lo && i > buf.len().saturating_sub(4) && (buf[i - 1] & 0xC0) == 0x80 {
        i -= 1;
    }
    // `i - 1` is a lead byte (or ASCII): cut before it unless it completes the buffer.
    if i > lo && i < buf.len() {
        i - 1
    } else if i == buf.len() && buf.last().is_some_and(|&b| b >= 0xC0) {
        buf.len() - 1
    } else {
        buf.len()
    }
}

/// Cuts a text stream into checked pieces.
struct Cutter {
    path: PathBuf,
    input: InputPath,
    stream: Box<dyn Read + Send>,
    mode: TextMode,
    warn: bool,
    buf: Vec<u8>,
    eof: bool,
    /// File offset and line (1-based) where `buf` starts.
    offset: u64,
    line: u64,
    warned: bool,
}

impl Cutter {
    fn new(input: &InputPath, mode: TextMode, warn: bool) -> Result<Cutter> {
        Ok(Cutter {
            path: input.path.clone(),
            input: input.clone(),
            stream: open_stream(input)?,
            mode,
            warn,
            buf: Vec::new(),
            eof: false,
            offset: 0,
            line: 1,
            warned: false,
        })
    }

    /// Reads until the buffer holds a piece or the stream ends.
    fn fill(&mut self) -> Result<()> {
        let mut chunk = vec![0u8; 1 << 16];
        while !self.eof && self.buf.len() < PIECE_BYTES {
            let n = self
                .stream
                .read(&mut chunk)
                .with_context(|| format!("could not read {}{}", self.path.display(), read_error_hint(&self.input)))?;
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    /// Whether no more pieces follow.
    fn done(&self) -> bool {
        self.eof && self.buf.is_empty()
    }

    fn next(&mut self) -> Result<Option<Vec<u8>>> {
        self.fill()?;
        if self.buf.is_empty() {
            return Ok(None);
        }
        let end = if self.eof && self.buf.len() <= PIECE_BYTES { self.buf.len() } else { piece_end(&self.buf) };
        let rest = self.buf.split_off(end);
        let piece = std::mem::replace(&mut self.buf, rest);
        let (offset, line) = (self.offset, self.line);
        let newlines = piece.iter().filter(|&&b| b == b'\n').count() as u64;
        self.offset += piece.len() as u64;
        self.line += newlines;
        let path = self.path.clone();
        let place = |bytes: &[u8], valid: usize| {
            let line = line + bytes[..valid].iter().filter(|&&b| b == b'\n').count() as u64;
            (offset + valid as u64, line, bytes.get(valid).copied().unwrap_or(0))
        };
        let mut first_bad = None;
        let (text, replaced) = check_text(piece, self.mode, |bytes, valid| {
            let (o, l, b) = place(bytes, valid);
            format!(
                "{} is not valid UTF-8: invalid byte 0x{b:02x} at byte offset {o} (line {l}); \
                 convert the file to UTF-8, or pass --lossy to replace invalid bytes with U+FFFD \
                 (or --bytes to read it as bytes)",
                path.display()
            )
        })?;
        if let Some(valid) = replaced {
            // Where in the original piece: the text before it was valid, so the same offset.
            first_bad =
                Some((offset + valid as u64, line + text[..valid].iter().filter(|&&b| b == b'\n').count() as u64));
        }
        if let (Some((o, l)), true, false) = (first_bad, self.warn, self.warned) {
            self.warned = true;
            crate::data::progress(&format!(
                "warning: {} is not valid UTF-8 (first invalid byte at offset {o}, line {l}); \
                 replacing invalid bytes with U+FFFD (--lossy)",
                path.display()
            ));
        }
        Ok(Some(text))
    }
}

enum State {
    /// A file read whole: its one piece, until taken.
    Whole(Option<RawPiece>),
    /// A file read in pieces, one looked ahead.
    Pieces { cutter: Box<Cutter>, key: u64, ahead: Option<Vec<u8>> },
}

/// Reads one text file as one document.
pub(super) struct TextReader {
    state: State,
}

impl TextReader {
    pub(super) fn open(input: &InputPath, opts: &ReadOptions) -> Result<TextReader> {
        let mut cutter = Cutter::new(input, opts.mode, opts.warn)?;
        let Some(first) = cutter.next()? else { return Ok(TextReader { state: State::Whole(None) }) };
        if cutter.done() {
            let mut key = KeyHasher::new(opts.seed);
            key.update(&first);
            return Ok(TextReader {
                state: State::Whole(Some(RawPiece { key: key.finish(), last: true, text: first })),
            });
        }
        // The key needs the whole text: a first reading for it, then a second for the pieces.
        let mut key = KeyHasher::new(opts.seed);
        key.update(&first);
        while let Some(piece) = cutter.next()? {
            key.update(&piece);
        }
        let mut cutter = Cutter::new(input, opts.mode, false)?;
        let ahead = cutter.next()?;
        Ok(TextReader { state: State::Pieces { cutter: Box::new(cutter), key: key.finish(), ahead } })
    }
}

impl Reader for TextReader {
    fn next_piece(&mut self) -> Result<Option<RawPiece>> {
        match &mut self.state {
            State::Whole(piece) => Ok(piece.take()),
            State::Pieces { cutter, key, ahead } => {
                let Some(text) = ahead.take() else { return Ok(None) };
                *ahead = cutter.next()?;
                Ok(Some(RawPiece { key: *key, last: ahead.is_none(), text }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_ends_are_safe_cuts_or_boundaries() {
        let text = b"alpha beta\ngamma delta";
        let end = piece_end(text);
        assert!(safe_cut(text, end), "{end}");
        assert_eq!(&text[end..], b" delta");
        // No safe cut: after the last newline.
        assert_eq!(piece_end("ééé\n\n\nééé".as_bytes()), 9);
        // No newline either: at a character boundary.
        let s = "éééééé".as_bytes();
        let end = piece_end(s);
        assert!(std::str::from_utf8(&s[..end]).is_ok() && end > 0, "{end}");
        let s = "aaaaaaé".as_bytes();
        assert_eq!(piece_end(&s[..s.len() - 1]), 6);
    }
}
