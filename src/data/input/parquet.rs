//! Parquet files: one document per row, the `--text-field` column (a string or binary
//! column; a nested one as `outer.inner`). Only that column is read (column projection),
//! row group by row group and page by page, so memory holds a page, not a file. A null is
//! an error naming the row group and row (the row has no text); an empty value is skipped,
//! as in JSON lines.
use std::fs::File;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::{check_text, InputPath, RawPiece, ReadOptions, Reader};
use crate::data::split::doc_key;

/// Rows decoded at once.
const BATCH_ROWS: usize = 256;

/// Reads one Parquet file's text column.
pub(super) struct ParquetReader {
    path: PathBuf,
    file: SerializedFileReader<File>,
    opts: ReadOptions,
    column: usize,
    max_def: i16,
    row_groups: usize,
    /// The row group being read and its column reader.
    group: usize,
    reader: Option<ColumnReaderImpl<ByteArrayType>>,
    /// Rows of the current group read so far (the row of `defs[pos]` is `row - defs.len() + pos`).
    row: u64,
    values: Vec<ByteArray>,
    defs: Vec<i16>,
    /// Next entry of `defs` (rows) and of `values` to hand on.
    pos: usize,
    value_pos: usize,
    warned: bool,
}

impl ParquetReader {
    pub(super) fn open(input: &InputPath, opts: &ReadOptions) -> Result<ParquetReader> {
        let path = input.path.clone();
        let f = File::open(&path).with_context(|| format!("could not open {}", path.display()))?;
        let file = SerializedFileReader::new(f)
            .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
        let schema = file.metadata().file_metadata().schema_descr_ptr();
        let field = &opts.text_field;
        let found =
            schema.columns().iter().position(|c| c.path().string() == *field || c.path().parts() == [field.clone()]);
        let Some(column) = found else {
            let names: Vec<String> = schema.columns().iter().take(20).map(|c| c.path().string()).collect();
            bail!(
                "{} has no column {field:?} (its columns: {}); pass --text-field NAME",
                path.display(),
                names.join(", ")
            );
        };
        let desc = schema.column(column);
        if desc.physical_type() != PhysicalType::BYTE_ARRAY || desc.max_rep_level() > 0 {
            bail!(
                "{}: column {field:?} is {:?}{}, not a string column; pass --text-field NAME",
                path.display(),
                desc.physical_type(),
                if desc.max_rep_level() > 0 { " in a list" } else { "" }
            );
        }
        let row_groups = file.metadata().num_row_groups();
        Ok(ParquetReader {
            path,
            file,
            opts: opts.clone(),
            column,
            max_def: desc.max_def_level(),
            row_groups,
            group: 0,
            reader: None,
            row: 0,
            values: Vec::new(),
            defs: Vec::new(),
            pos: 0,
            value_pos: 0,
            warned: false,
        })
    }

    /// Decodes the next batch of rows into `defs`/`values`; false at the end of the file.
    fn refill(&mut self) -> Result<bool> {
        loop {
            if self.reader.is_none() {
                if self.group >= self.row_groups {
                    return Ok(false);
                }
                let group = self.file.get_row_group(self.group).map_err(|e| self.error(e))?;
                let reader = match group.get_column_reader(self.column).map_err(|e| self.error(e))? {
                    ColumnReader::ByteArrayColumnReader(r) => r,
                    _ => {
                        bail!("{}: row group {}: the text column is not a byte array", self.path.display(), self.group)
                    }
                };
                self.reader = Some(reader);
                self.row = 0;
            }
            let reader = self.reader.as_mut().expect("set above");
            self.values.clear();
            self.defs.clear();
            let defs = (self.max_def > 0).then_some(&mut self.defs);
            let result = reader.read_records(BATCH_ROWS, defs, None, &mut self.values);
            let (rows, values, _) = match result {
                Ok(r) => r,
                Err(e) => return Err(self.error(e)),
            };
            if self.max_def == 0 {
                self.defs.resize(values, 0);
            }
            (self.pos, self.value_pos) = (0, 0);
            if rows == 0 {
                self.reader = None;
                self.group += 1;
                continue;
            }
            self.defs.truncate(rows);
            self.row += rows as u64;
            return Ok(true);
        }
    }

    fn error(&self, e: parquet::errors::ParquetError) -> anyhow::Error {
        anyhow::anyhow!("{}: row group {}: could not read the text column: {e}", self.path.display(), self.group)
    }
}

impl Reader for ParquetReader {
    fn next_piece(&mut self) -> Result<Option<RawPiece>> {
        loop {
            if self.pos >= self.defs.len() && !self.refill()? {
                return Ok(None);
            }
            let row = self.row - self.defs.len() as u64 + self.pos as u64;
            let def = self.defs[self.pos];
            self.pos += 1;
            if def < self.max_def {
                bail!(
                    "{}: row group {}, row {row}: {:?} is null (every row needs its text)",
                    self.path.display(),
                    self.group,
                    self.opts.text_field
                );
            }
            let Some(value) = self.values.get(self.value_pos) else {
                bail!("{}: row group {}: fewer values than rows in the text column", self.path.display(), self.group);
            };
            self.value_pos += 1;
            if value.is_empty() {
                continue;
            }
            let (path, group) = (&self.path, self.group);
            let (text, replaced) = check_text(value.data().to_vec(), self.opts.mode, |bytes, valid| {
                format!(
                    "{}: row group {group}, row {row}: the text is not valid UTF-8 (invalid byte 0x{:02x} at byte {valid}); \
                     pass --lossy to replace invalid bytes with U+FFFD, or --bytes to read it as bytes",
                    path.display(),
                    bytes[valid]
                )
            })?;
            if replaced.is_some() && self.opts.warn && !self.warned {
                self.warned = true;
                crate::data::progress(&format!(
                    "warning: {}: row group {group}, row {row}: not valid UTF-8; replacing invalid bytes with U+FFFD (--lossy)",
                    path.display()
                ));
            }
            return Ok(Some(RawPiece { key: doc_key(self.opts.seed, &text), last: true, text }));
        }
    }
}
