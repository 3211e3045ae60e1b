//! TensorBoard event files under RUN_DIR/tb, behind one small module so a crate swap stays local.
//!
//! Writing goes through tensorboard-rs's `FileWriter` (a background thread frames each event
//! as a TFRecord: u64 LE length, masked CRC32C of the length, data, masked CRC32C of the data).
//! That crate panics on I/O failures and its `flush` does not wait, so [`Board`]:
//! - checks that the directory can be created and written before opening it (`open` returns an
//!   error, never panics), and turns later writer failures into one warning that disables
//!   logging rather than a panic in the training loop;
//! - makes `flush` wait until the file holds every queued event (a SIGKILL right after it
//!   loses nothing that was flushed);
//! - never opens two writers in one directory within the same second (the crate names files
//!   `events.out.tfevents.<unix seconds>.<host>.<pid>.0`, so a second writer would truncate the
//!   first file, and TensorBoard reads files in name order).
//!
//! Restarts: every `Board::open` writes a `SessionLog` START event at the first step this
//! process writes: step 0 for a fresh run, `step + 1` for `Board::open(dir, Some(step))` (a
//! resume from the checkpoint at `step`). TensorBoard's Python loaders then drop every event
//! they have read so far (earlier files sort first) whose step is at least the START step:
//! the events the earlier process wrote after its last checkpoint, so the plots neither go
//! back in steps nor duplicate.
//! - `event_accumulator.EventAccumulator` purges at every START (`_CheckForRestartAndMaybePurge`
//!   → `_Purge`, which keeps `x.step < event.step`), but only its scalar, histogram, image and
//!   audio reservoirs: text (tensor) points of the earlier process stay.
//! - `plugin_event_accumulator.EventAccumulator` (`tensorboard --load_fast=false`) purges all
//!   points, but ignores the first START it sees in a run: hence the START of fresh runs too.
//! - Both need `file_version` "brain.Event:2" (tensorboard-rs writes it first in every file).
//! - The Rust data server (`tensorboard --load_fast=true`, the default) ignores START events: a
//!   point at step s evicts that tag's earlier points with step >= s.
//!
//! [`read_event_file`] is an independent reader (its own CRC32C and protobuf wire decoding) used
//! to validate what was written.

use anyhow::{anyhow, bail, Context, Result};
use protobuf::{Message, RepeatedField};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
use tensorboard_proto::summary::{Summary, SummaryMetadata, SummaryMetadata_PluginData, Summary_Value};
use tensorboard_proto::tensor::TensorProto;
use tensorboard_proto::tensor_shape::TensorShapeProto;
use tensorboard_proto::types::DataType;
use tensorboard_rs::summary_writer::FileWriter;

/// Event file names start with this (TensorBoard only reads files whose name contains "tfevents").
const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";
/// What the crate writes as the first event of every file; TensorBoard needs version >= 2 to
/// honour SessionLog START events.
const FILE_VERSION: &str = "brain.Event:2";
/// TensorBoard's text plugin.
const TEXT_PLUGIN: &str = "text";
/// Longest `flush` waits for the writer thread to catch up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// (directory, unix second of the newest writer opened there by this process): no two writers
/// in one directory may share a second, as the crate's file name has one-second resolution.
static OPENED: Mutex<Vec<(PathBuf, u64)>> = Mutex::new(Vec::new());

/// A TensorBoard event-file writer for one run directory (e.g. RUN_DIR/tb).
pub struct Board {
    dir: PathBuf,
    /// `None` once the writer failed (logging is then disabled, with one warning).
    writer: Option<FileWriter>,
    /// Bounds of the unix second in the name of the file the writer thread creates.
    name_secs: (u64, u64),
    /// That file, once `flush` has found it.
    file: Option<PathBuf>,
    /// Bytes of every record queued so far: `flush` waits until the file is this long.
    queued_bytes: u64,
}

impl Board {
    /// Create `dir` (e.g. RUN_DIR/tb) if needed and open a writer; an error names the directory.
    ///
    /// `resume_from`: `Some(step)` when the run resumes from the checkpoint taken at `step`.
    /// A SessionLog START event at `step + 1` (at 0 for a fresh run) makes TensorBoard drop
    /// the events of earlier processes from that step on (see the module documentation).
    pub fn open(dir: &Path, resume_from: Option<usize>) -> Result<Board> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create TensorBoard directory {}", dir.display()))?;
        let probe = dir.join(format!(".lors-lm-write-probe.{}", std::process::id()));
        std::fs::write(&probe, b"probe")
            .with_context(|| format!("cannot write in TensorBoard directory {}", dir.display()))?;
        std::fs::remove_file(&probe)
            .with_context(|| format!("cannot remove {} (TensorBoard directory)", probe.display()))?;

        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let (writer, name_secs) = loop {
            let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
            let now = unix_secs();
            let mut newest = opened.iter().find(|(d, _)| *d == key).map(|&(_, s)| s);
            // Files of earlier processes: start in a later second so ours sorts after theirs
            // (unless a file claims a time far ahead of our clock; then do not wait for it).
            if let Some(s) = newest_event_file_secs(dir).filter(|&s| s <= now + 2) {
                newest = newest.max(Some(s));
            }
            if let Some(s) = newest.filter(|&s| s >= now) {
                drop(opened);
                std::thread::sleep(until_second(s + 1));
                continue;
            }
            let writer = catch_unwind(|| FileWriter::new(dir))
                .map_err(|_| anyhow!("cannot open a TensorBoard writer in {}", dir.display()))?;
            let after = unix_secs();
            match opened.iter_mut().find(|(d, _)| *d == key) {
                Some(entry) => entry.1 = after,
                None => opened.push((key.clone(), after)),
            }
            break (writer, (now, after));
        };

        let mut version = Event::new();
        version.set_wall_time(1.0);
        version.set_file_version(FILE_VERSION.to_string());
        let mut board = Board {
            dir: dir.to_path_buf(),
            writer: Some(writer),
            name_secs,
            file: None,
            queued_bytes: record_len(&version),
        };
        let start = resume_from.map_or(0, |step| step + 1);
        let mut log = SessionLog::new();
        log.set_status(SessionLog_SessionStatus::START);
        if let Some(step) = resume_from {
            log.set_msg(format!("resumed from the checkpoint at step {step}"));
        }
        let mut event = Event::new();
        event.set_session_log(log);
        board.add(event, start);
        board.flush();
        Ok(board)
    }

    /// The directory the event file is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A scalar (stored as an f32 `simple_value`, as TensorBoard's scalar plugin reads it).
    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) {
        let mut event = Event::new();
        event.set_summary(tensorboard_rs::summary::scalar(tag, value as f32));
        self.add(event, step);
    }

    /// A text summary for TensorBoard's text plugin (markdown is rendered).
    pub fn text(&mut self, tag: &str, text: &str, step: usize) {
        let mut plugin = SummaryMetadata_PluginData::new();
        plugin.set_plugin_name(TEXT_PLUGIN.to_string());
        let mut metadata = SummaryMetadata::new();
        metadata.set_plugin_data(plugin);
        let mut tensor = TensorProto::new();
        tensor.set_dtype(DataType::DT_STRING);
        tensor.set_tensor_shape(TensorShapeProto::new()); // rank 0: one string
        tensor.set_string_val(RepeatedField::from_vec(vec![text.as_bytes().to_vec()]));
        let mut value = Summary_Value::new();
        value.set_tag(tag.to_string());
        value.set_metadata(metadata);
        value.set_tensor(tensor);
        let mut summary = Summary::new();
        summary.set_value(RepeatedField::from_vec(vec![value]));
        let mut event = Event::new();
        event.set_summary(summary);
        self.add(event, step);
    }

    /// Write every queued event to the file (the OS has it when this returns: a process killed
    /// afterwards keeps it).
    pub fn flush(&mut self) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        if catch_unwind(AssertUnwindSafe(|| writer.flush())).is_err() {
            return self.disable("flushing");
        }
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut pause = Duration::from_micros(50);
        loop {
            if self.file.is_none() {
                self.file = self.find_own_file();
            }
            let written = self.file.as_ref().and_then(|f| std::fs::metadata(f).ok()).map_or(0, |m| m.len());
            if written >= self.queued_bytes {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "warning: TensorBoard events in {} not on disk after {FLUSH_TIMEOUT:?} \
                     ({written} of {} bytes)",
                    self.dir.display(),
                    self.queued_bytes
                );
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Queue `event` at `step` (the crate sets its wall time and step).
    fn add(&mut self, mut event: Event, step: usize) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        // The crate overwrites both; set them here so that the size below is the written one.
        event.set_wall_time(1.0);
        event.set_step(step as i64);
        let len = record_len(&event);
        match catch_unwind(AssertUnwindSafe(|| writer.add_event(&event, step))) {
            Ok(()) => self.queued_bytes += len,
            Err(_) => self.disable("writing an event"),
        }
    }

    /// The writer thread died (its panic message is already printed): stop logging, once.
    fn disable(&mut self, doing: &str) {
        eprintln!(
            "warning: TensorBoard logging to {} disabled: the event writer failed while {doing}",
            self.dir.display()
        );
        // Dropping it would panic again (its Drop expects the dead thread to answer).
        std::mem::forget(self.writer.take());
    }

    /// The file this process's writer thread created: a name with our pid and a second in
    /// `name_secs` (no other writer in this directory shares that second, see `open`).
    fn find_own_file(&self) -> Option<PathBuf> {
        let suffix = format!(".{}.0", std::process::id());
        let entries = std::fs::read_dir(&self.dir).ok()?;
        entries.flatten().map(|e| e.path()).find(|path| {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            name.ends_with(&suffix)
                && event_file_secs(name).is_some_and(|s| s >= self.name_secs.0 && s <= self.name_secs.1)
        })
    }
}

impl Drop for Board {
    /// Stop the writer thread (it writes what is queued) and join it.
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            if catch_unwind(AssertUnwindSafe(move || drop(writer))).is_err() {
                eprintln!(
                    "warning: closing the TensorBoard writer in {} failed; events may be missing",
                    self.dir.display()
                );
            }
        }
    }
}

/// Length on disk of `event` as one TFRecord (8-byte length, 4-byte CRC, data, 4-byte CRC).
fn record_len(event: &Event) -> u64 {
    16 + u64::from(event.compute_size())
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How long until the unix clock reaches second `secs` (plus a little margin).
fn until_second(secs: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(secs).saturating_sub(now) + Duration::from_millis(5)
}

/// The unix second in an event file name `events.out.tfevents.<secs>.<host>.<pid>.<n>`.
fn event_file_secs(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(EVENT_FILE_PREFIX)?;
    rest.split('.').next()?.parse().ok()
}

/// The newest unix second among the event files already in `dir`.
fn newest_event_file_secs(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir).ok()?.flatten().filter_map(|e| event_file_secs(e.file_name().to_str()?)).max()
}

// ---------------------------------------------------------------------------------------------
// Reading and validating event files.

/// What [`read_event_file`] found in one event file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFileContents {
    /// Scalar (`simple_value`) summaries as (tag, step, value), in file order.
    pub scalars: Vec<(String, i64, f32)>,
    /// Text-plugin summaries as (tag, step, text), in file order.
    pub texts: Vec<(String, i64, String)>,
    /// Complete, valid records read.
    pub records: usize,
    /// The last record is cut short (the writer was killed mid-write); everything before it
    /// is valid.
    pub truncated_tail: bool,
    /// The `file_version` of the file (the first event: "brain.Event:2").
    pub file_version: Option<String>,
    /// Steps of SessionLog START events (written when a run resumes).
    pub session_starts: Vec<i64>,
}

/// Read and validate every record of one event file: TFRecord framing (u64 LE length, masked
/// CRC32C of the length bytes, data, masked CRC32C of the data) and the protobuf of each
/// event. An error names the file, the record index and its byte offset. A last record cut
/// short is not an error: `truncated_tail` is set and the records before it are returned.
pub fn read_event_file(path: &Path) -> Result<EventFileContents> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read event file {}", path.display()))?;
    let mut out = EventFileContents::default();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let index = out.records;
        let rest = &bytes[offset..];
        let fail = |what: String| anyhow!("{}: record {index} at byte offset {offset}: {what}", path.display());
        if rest.len() < 12 {
            out.truncated_tail = true;
            break;
        }
        let len_bytes = &rest[..8];
        let stored = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        let computed = masked_crc32c(len_bytes);
        if stored != computed {
            return Err(fail(format!("length CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap());
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(16))
            .ok_or_else(|| fail(format!("record length {len} is impossible")))?;
        if rest.len() < total {
            out.truncated_tail = true;
            break;
        }
        let data = &rest[12..total - 4];
        let stored = u32::from_le_bytes(rest[total - 4..total].try_into().unwrap());
        let computed = masked_crc32c(data);
        if stored != computed {
            return Err(fail(format!("data CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")));
        }
        decode_event(data, &mut out).map_err(|e| fail(format!("bad Event protobuf: {e:#}")))?;
        out.records += 1;
        offset += total;
    }
    Ok(out)
}

/// Decode one `Event` (wall_time=1 double, step=2 int64, file_version=3 string, summary=5,
/// session_log=7) into `out`.
fn decode_event(data: &[u8], out: &mut EventFileContents) -> Result<()> {
    let mut step = 0i64;
    let mut summaries = Vec::new();
    let mut session_status = None;
    for field in Fields(data) {
        match field? {
            (1, Wire::Fixed64) => {}
            (2, Wire::Varint(v)) => step = v as i64,
            (3, Wire::Bytes(b)) => out.file_version = Some(utf8(b, "file_version")?),
            (5, Wire::Bytes(b)) => summaries.push(b),
            (7, Wire::Bytes(b)) => {
                for field in Fields(b) {
                    if let (1, Wire::Varint(v)) = field? {
                        session_status = Some(v);
                    }
                }
            }
            (1 | 2 | 3 | 5 | 7, _) => bail!("wrong wire type for a field of Event"),
            _ => {}
        }
    }
    if session_status == Some(SessionLog_SessionStatus::START as u64) {
        out.session_starts.push(step);
    }
    for summary in summaries {
        for field in Fields(summary) {
            match field? {
                (1, Wire::Bytes(value)) => decode_value(value, step, out)?,
                (1, _) => bail!("wrong wire type for Summary.value"),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Decode one `Summary.Value`: tag=1, simple_value=2 (float), metadata=9 (plugin_data=1 →
/// plugin_name=1), tensor=8 (dtype=1, string_val=8).
fn decode_value(data: &[u8], step: i64, out: &mut EventFileContents) -> Result<()> {
    let mut tag = String::new();
    let mut simple = None;
    let mut plugin = String::new();
    let mut strings: Option<(u64, Vec<String>)> = None;
    for field in Fields(data) {
        match field? {
            (1, Wire::Bytes(b)) => tag = utf8(b, "tag")?,
            (2, Wire::Fixed32(v)) => simple = Some(f32::from_bits(v)),
            (9, Wire::Bytes(b)) => {
                for field in Fields(b) {
                    if let (1, Wire::Bytes(pd)) = field? {
                        for field in Fields(pd) {
                            if let (1, Wire::Bytes(name)) = field? {
                                plugin = utf8(name, "plugin_name")?;
                            }
                        }
                    }
                }
            }
            (8, Wire::Bytes(b)) => {
                let (mut dtype, mut vals) = (0, Vec::new());
                for field in Fields(b) {
                    match field? {
                        (1, Wire::Varint(v)) => dtype = v,
                        (8, Wire::Bytes(s)) => vals.push(utf8(s, "string_val")?),
                        _ => {}
                    }
                }
                strings = Some((dtype, vals));
            }
            (1 | 2 | 8 | 9, _) => bail!("wrong wire type for a field of Summary.Value"),
            _ => {}
        }
    }
    if let Some(v) = simple {
        out.scalars.push((tag, step, v));
    } else if let Some((dtype, vals)) = strings {
        if plugin == TEXT_PLUGIN && dtype == DataType::DT_STRING as u64 {
            out.texts.push((tag, step, vals.join("\n")));
        }
    }
    Ok(())
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{what} is not UTF-8"))
}

/// A protobuf field's payload, by wire type.
enum Wire<'a> {
    Varint(u64),
    /// (its value is not needed: only `Event.wall_time` has this type)
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterator over the (field number, payload) pairs of one protobuf message.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(v);
            }
        }
        bail!("bad varint")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("field runs past the end of its message");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u64, Wire<'a>)> {
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?)?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            t => bail!("unsupported wire type {t}"),
        };
        Ok((key >> 3, wire))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Wire<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let item = self.field();
        if item.is_err() {
            self.0 = &[]; // stop after the first error
        }
        Some(item)
    }
}

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), as TFRecord framing uses it.

const CRC32C_TABLE: [u32; 256] = crc32c_table();

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC32C (Castagnoli polynomial, reflected) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC32C that TFRecord framing stores: rotate right by 15, add 0xa282ead8.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().contains("tfevents"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // Against tensorboard-rs's own table, which is what writes the files.
        for data in [&b""[..], b"a", b"123456789", &[0u8; 8], &[0xffu8; 37]] {
            assert_eq!(masked_crc32c(data), tensorboard_rs::masked_crc32c::masked_crc32c(data));
        }
    }

    #[test]
    fn write_then_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tb");
        let mut board = Board::open(&dir, None).unwrap();
        board.text("config", "# run\nlr = 3e-4 — ünïcode", 0);
        for step in 1..=5 {
            board.scalar("train/loss", 1.0 / step as f64, step);
        }
        board.scalar("train/lr", 3e-4, 5);
        board.flush();
        // After flush the file already holds everything (the writer thread has caught up).
        let files = event_files(&dir);
        assert_eq!(files.len(), 1);
        assert_eq!(read_event_file(&files[0]).unwrap().records, 9);
        drop(board);

        let got = read_event_file(&files[0]).unwrap();
        assert_eq!(got.records, 9); // file_version + START + text + 6 scalars
        assert!(!got.truncated_tail);
        assert_eq!(got.file_version.as_deref(), Some(FILE_VERSION));
        assert_eq!(got.session_starts, vec![0]);
        let mut want: Vec<(String, i64, f32)> =
            (1..=5).map(|s| ("train/loss".to_string(), s, (1.0 / s as f64) as f32)).collect();
        want.push(("train/lr".to_string(), 5, 3e-4f64 as f32));
        assert_eq!(got.scalars, want);
        assert_eq!(got.texts, vec![("config".to_string(), 0, "# run\nlr = 3e-4 — ünïcode".to_string())]);
    }

    #[test]
    fn resume_writes_start_event_after_the_checkpoint_step() {
        let tmp = tempfile::tempdir().unwrap();
        drop(Board::open(tmp.path(), None).unwrap());
        let mut board = Board::open(tmp.path(), Some(40)).unwrap();
        board.scalar("loss", 2.0, 41);
        drop(board);
        let files = event_files(tmp.path());
        assert_eq!(files.len(), 2, "the second writer must not overwrite the first file");
        let second = read_event_file(&files[1]).unwrap();
        assert_eq!(second.session_starts, vec![41]);
        assert_eq!(second.scalars, vec![("loss".to_string(), 41, 2.0)]);
    }

    #[test]
    fn corruption_and_truncation_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let mut board = Board::open(tmp.path(), None).unwrap();
        for step in 0..10 {
            board.scalar("x", step as f64, step);
        }
        drop(board);
        let file = event_files(tmp.path()).remove(0);
        let bytes = std::fs::read(&file).unwrap();
        // Start offsets of the 12 records (file_version, START, 10 scalars), and the end.
        let mut starts = vec![0usize];
        while *starts.last().unwrap() < bytes.len() {
            let at = *starts.last().unwrap();
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            starts.push(at + 16 + len);
        }
        assert_eq!(starts.len(), 13);
        assert_eq!(starts[12], bytes.len());
        let (first_len, second_len) = (starts[1], starts[2] - starts[1]);
        let last_len = starts[12] - starts[11];

        // The last record cut short (a writer killed mid-write): the prefix is readable.
        for cut in [1, 4, 5, last_len - 12, last_len - 1] {
            std::fs::write(&file, &bytes[..bytes.len() - cut]).unwrap();
            let got = read_event_file(&file).unwrap();
            assert!(got.truncated_tail, "cut {cut}");
            assert_eq!(got.records, 11, "cut {cut}"); // file_version + START + 9 scalars
            assert_eq!(got.scalars.len(), 9);
        }

        // A flipped data byte in record 1.
        let mut bad = bytes.clone();
        bad[first_len + 14] ^= 0x40;
        std::fs::write(&file, &bad).unwrap();
        let err = format!("{:#}", read_event_file(&file).unwrap_err());
        assert!(err.contains(&format!("record 1 at byte offset {first_len}")), "{err}");
        assert!(err.contains("data CRC mismatch"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");

        // A flipped length byte in record 2.
        let mut bad = bytes.clone();
        bad[first_len + second_len] ^= 0x01;
        std::fs::write(&file, &bad).unwrap();
        let err = format!("{:#}", read_event_file(&file).unwrap_err());
        assert!(err.contains("record 2 at byte offset"), "{err}");
        assert!(err.contains("length CRC mismatch"), "{err}");
    }

    #[test]
    fn open_reports_an_unusable_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let dir = file.join("tb");
        let err = format!("{:#}", Board::open(&dir, None).err().unwrap());
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }
}
