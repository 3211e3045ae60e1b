//! Reading the corpus: the `--input` arguments resolved into files ([`resolve`]), and one
//! reader per format, each yielding documents, behind one iterator ([`Documents`]).
//!
//! | format        | files                                          | a document is       | reader        |
//! |---------------|------------------------------------------------|---------------------|---------------|
//! | text          | `*.txt` (and any file not named below)          | the whole file      | `text.rs`     |
//! | JSON lines    | `*.jsonl`, `*.ndjson`, each also `.gz` / `.zst` | the `--text-field` of one line | `jsonl.rs` |
//! | Parquet       | `*.parquet`                                     | the text column of one row | `parquet.rs` |
//!
//! Directories are searched recursively for those names, sorted by path; `hf:datasets/…`
//! arguments name the data files of a Hugging Face dataset repo ([`super::hub`]). Empty
//! documents are skipped. A document reaches the pipeline as one or more [`Piece`]s: only a
//! text file larger than [`PIECE_BYTES`] is read in several, cut where a byte-level BPE
//! tokenizer encodes the parts exactly as the whole.
mod jsonl;
mod parquet;
mod text;

use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How a document's text is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextMode {
    /// UTF-8 text; invalid UTF-8 is an error naming the place, or with `lossy` replaced by U+FFFD.
    Utf8 { lossy: bool },
    /// Bytes as they are (`prepare --bytes`): a text file or a Parquet binary value byte for
    /// byte, valid UTF-8 or not; JSON strings (which are Unicode) as their UTF-8 bytes.
    Bytes,
}

/// What the readers need besides the files.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// The JSON lines field / Parquet column holding the text.
    pub text_field: String,
    pub mode: TextMode,
    /// Seed of the document keys ([`super::split::doc_key`]).
    pub seed: u64,
    /// Print warnings (replaced invalid UTF-8): on one of the passes over the corpus only.
    pub warn: bool,
}

/// File formats, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    JsonLines,
    Parquet,
}

/// Whole-file compression of a text or JSON lines file, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPath {
    pub path: PathBuf,
    pub format: Format,
    pub compression: Compression,
}

impl InputPath {
    /// The format and compression that `path`'s name says.
    pub fn classify(path: &Path) -> InputPath {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
            (s.to_string(), Compression::Gzip)
        } else if let Some(s) = name.strip_suffix(".zst") {
            (s.to_string(), Compression::Zstd)
        } else {
            (name, Compression::None)
        };
        let format = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
            Format::JsonLines
        } else if stem.ends_with(".parquet") && compression == Compression::None {
            Format::Parquet
        } else {
            Format::Text
        };
        InputPath { path: path.to_path_buf(), format, compression }
    }

    /// Whether a directory walk picks this file up.
    fn wanted_in_directory(&self) -> bool {
        let name = self.path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        match self.format {
            Format::Text => name.ends_with(".txt") && self.compression == Compression::None,
            Format::JsonLines | Format::Parquet => true,
        }
    }
}

/// The `--input` arguments resolved.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The files, in reading order.
    pub files: Vec<InputPath>,
    /// The arguments as recorded in meta.json (`hf:` datasets pinned to a commit).
    pub specs: Vec<String>,
}

/// The names a directory walk picks up, for messages.
pub const DIRECTORY_FILES: &str = "*.txt, *.jsonl[.gz|.zst], *.ndjson[.gz|.zst] or *.parquet";

/// Expands the `--input` arguments into the files to read, in order: a file as it is, a
/// directory's [`DIRECTORY_FILES`] (recursively, sorted), an `hf:datasets/…` repo's data files.
pub fn resolve(args: &[PathBuf]) -> Result<Inputs> {
    let mut files = Vec::new();
    let mut specs = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if text.starts_with("hf:") {
            let (paths, pinned) = super::hub::fetch_hub_dataset(&text)?;
            files.extend(paths.iter().map(|p| InputPath::classify(p)));
            specs.push(pinned);
            continue;
        }
        specs.push(text.into_owned());
        let meta = fs::metadata(arg)
            .with_context(|| format!("input path {} does not exist or cannot be read (--input)", arg.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(arg, &mut found)?;
            if found.is_empty() {
                bail!(
                    "no {DIRECTORY_FILES} files under directory {} (--input); put the corpus there, \
                     e.g. with scripts/fetch_corpus.sh",
                    arg.display()
                );
            }
            found.sort();
            files.extend(found.iter().map(|p| InputPath::classify(p)));
        } else {
            files.push(InputPath::classify(arg));
        }
    }
    Ok(Inputs { files, specs })
}

/// Recursively collects the files a directory walk picks up. Symlinks to files are followed;
/// symlinked directories are not (no cycles).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("could not list directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list directory {}", dir.display()))?;
        let path = entry.path();
        let ft = entry.file_type().with_context(|| format!("could not stat {}", path.display()))?;
        if ft.is_dir() {
            walk(&path, out)?;
        } else if (ft.is_file() || (ft.is_symlink() && path.is_file()))
            && InputPath::classify(&path).wanted_in_directory()
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Opens a text or JSON lines file through its decompressor.
fn open_stream(input: &InputPath) -> Result<Box<dyn Read + Send>> {
    let file = fs::File::open(&input.path).with_context(|| format!("could not open {}", input.path.display()))?;
    let file = BufReader::with_capacity(1 << 16, file);
    Ok(match input.compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(file)
                .with_context(|| format!("could not start a zstd decoder for {}", input.path.display()))?,
        ),
    })
}

/// What a decompressing read error most likely means, for messages.
fn read_error_hint(input: &InputPath) -> &'static str {
    match input.compression {
        Compression::None => "",
        Compression::Gzip => " (a truncated or corrupt gzip file?)",
        Compression::Zstd => " (a truncated or corrupt zstd file?)",
    }
}

// ---------------------------------------------------------------------------------------------
// Documents
// ---------------------------------------------------------------------------------------------

/// Largest piece of a text file handed on at once; a larger file is read in pieces.
pub const PIECE_BYTES: usize = 4 << 20;

/// A document, or a piece of one, as read.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Ordinal of the document among the corpus's non-empty documents.
    pub doc: u64,
    /// Ordinal of this piece within the document.
    pub index: u32,
    /// Whether this is the document's last piece.
    pub last: bool,
    /// The document's split key ([`super::split::doc_key`] of its whole text).
    pub key: u64,
    /// The bytes: valid UTF-8 unless [`TextMode::Bytes`].
    pub text: Vec<u8>,
}

/// A piece as a format reader yields it (before numbering).
pub(super) struct RawPiece {
    pub key: u64,
    pub last: bool,
    pub text: Vec<u8>,
}

/// A reader of one file's documents.
trait Reader: Send {
    /// The next piece; None at the end of the file.
    fn next_piece(&mut self) -> Result<Option<RawPiece>>;
}

fn open_reader(input: &InputPath, opts: &ReadOptions) -> Result<Box<dyn Reader>> {
    Ok(match input.format {
        Format::Text => Box::new(text::TextReader::open(input, opts)?),
        Format::JsonLines => Box::new(jsonl::JsonLinesReader::open(input, opts)?),
        Format::Parquet => Box::new(parquet::ParquetReader::open(input, opts)?),
    })
}

/// Every document of the corpus, file after file, as [`Piece`]s.
pub struct Documents {
    files: Vec<InputPath>,
    opts: ReadOptions,
    next_file: usize,
    reader: Option<Box<dyn Reader>>,
    next_doc: u64,
    next_index: u32,
    failed: bool,
}

impl Documents {
    pub fn new(files: &[InputPath], opts: &ReadOptions) -> Documents {
        Documents {
            files: files.to_vec(),
            opts: opts.clone(),
            next_file: 0,
            reader: None,
            next_doc: 0,
            next_index: 0,
            failed: false,
        }
    }

    fn advance(&mut self) -> Result<Option<Piece>> {
        loop {
            if self.reader.is_none() {
                let Some(input) = self.files.get(self.next_file) else { return Ok(None) };
                self.reader = Some(open_reader(input, &self.opts)?);
                self.next_file += 1;
            }
            let reader = self.reader.as_mut().expect("opened above");
            match reader.next_piece()? {
                None => self.reader = None,
                Some(raw) => {
                    let piece = Piece {
                        doc: self.next_doc,
                        index: self.next_index,
                        last: raw.last,
                        key: raw.key,
                        text: raw.text,
                    };
                    if raw.last {
                        (self.next_doc, self.next_index) = (self.next_doc + 1, 0);
                    } else {
                        self.next_index += 1;
                    }
                    return Ok(Some(piece));
                }
            }
        }
    }
}

impl Iterator for Documents {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        if self.failed {
            return None;
        }
        let r = self.advance().transpose();
        self.failed = matches!(r, Some(Err(_)));
        r
    }
}

/// Checks `bytes` as the text of a document under `mode`: kept when valid UTF-8 (or in bytes
/// mode), replaced when lossy, else the error `what(bytes, valid_up_to)` describes. Returns
/// the text and, when it was replaced, where the first invalid byte was.
fn check_text(
    bytes: Vec<u8>,
    mode: TextMode,
    what: impl FnOnce(&[u8], usize) -> String,
) -> Result<(Vec<u8>, Option<usize>)> {
    let TextMode::Utf8 { lossy } = mode else { return Ok((bytes, None)) };
    match std::str::from_utf8(&bytes) {
        Ok(_) => Ok((bytes, None)),
        Err(e) if lossy => Ok((String::from_utf8_lossy(&bytes).into_owned().into_bytes(), Some(e.valid_up_to()))),
        Err(e) => bail!("{}", what(&bytes, e.valid_up_to())),
    }
}
