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
//! Layout: [`Board::layout`] writes a custom-scalars layout (TensorBoard's "Custom Scalars"
//! tab): categories of charts, each plotting every tag that matches one of its regexes, e.g.
//! train and val loss in one chart and one chart per LORS projection with a line per layer
//! ([`training_layout`]); the per-tag cards of the Scalars tab stay as they are.
//!
//! Tests validate the files with an independent reader (tests/common/tb_reader.rs) and with
//! TensorBoard's own loaders (tests/tensorboard_files.rs).

use crate::model::Proj;
use anyhow::{anyhow, Context, Result};
use protobuf::{Message, RepeatedField};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
use tensorboard_proto::layout;
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
/// TensorBoard's custom-scalars plugin reads its layout (a serialized `tensorboard.Layout`, as
/// a string tensor) from the summary with this tag (tensorboard/plugins/custom_scalar/metadata.py).
const CUSTOM_SCALARS_PLUGIN: &str = "custom_scalars";
const LAYOUT_TAG: &str = "custom_scalars__config__";
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

    /// A board that writes nothing (the reports of a data-parallel rank other than 0).
    pub fn off(dir: &Path) -> Board {
        Board { dir: dir.to_path_buf(), writer: None, name_secs: (0, 0), file: None, queued_bytes: 0 }
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
        self.string_tensor(TEXT_PLUGIN, tag, text.as_bytes().to_vec(), step);
    }

    /// The layout of TensorBoard's "Custom Scalars" tab, at step 0: write it once per fresh run
    /// (the plugin reads one layout per run directory; a resume's START event, at a later step,
    /// keeps it, and a fresh run in the same directory replaces it along with the old points).
    pub fn layout(&mut self, categories: &[Category]) {
        let mut proto = layout::Layout::new();
        for c in categories {
            let mut category = layout::Category::new();
            category.set_title(c.title.clone());
            for ch in &c.charts {
                let mut lines = layout::MultilineChartContent::new();
                lines.set_tag(RepeatedField::from_vec(ch.tags.clone()));
                let mut chart = layout::Chart::new();
                chart.set_title(ch.title.clone());
                chart.set_multiline(lines);
                category.mut_chart().push(chart);
            }
            proto.mut_category().push(category);
        }
        match proto.write_to_bytes() {
            Ok(bytes) => self.string_tensor(CUSTOM_SCALARS_PLUGIN, LAYOUT_TAG, bytes, 0),
            Err(e) => eprintln!("warning: TensorBoard layout not written: {e}"),
        }
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

    /// A rank-0 string tensor summary for `plugin` (its metadata names the plugin that reads it).
    fn string_tensor(&mut self, plugin: &str, tag: &str, bytes: Vec<u8>, step: usize) {
        let mut plugin_data = SummaryMetadata_PluginData::new();
        plugin_data.set_plugin_name(plugin.to_string());
        let mut metadata = SummaryMetadata::new();
        metadata.set_plugin_data(plugin_data);
        let mut tensor = TensorProto::new();
        tensor.set_dtype(DataType::DT_STRING);
        tensor.set_tensor_shape(TensorShapeProto::new()); // rank 0: one string
        tensor.set_string_val(RepeatedField::from_vec(vec![bytes]));
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

/// A chart of the custom-scalars dashboard: one line per tag that one of `tags` matches (Python
/// regexes, matched from the start of the tag, as `re.match` does).
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub tags: Vec<String>,
}

/// A collapsible section of charts on the custom-scalars dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    pub title: String,
    pub charts: Vec<Chart>,
}

/// The custom-scalars layout of a training run, over the tags `Monitor` writes: the training
/// curves first (train and val loss in one chart), then one chart per LORS projection type
/// with a line per layer (`lors/<proj>/layer_NN`, empty for vanilla and shared models).
pub fn training_layout() -> Vec<Category> {
    let chart = |title: &str, tags: &[&str]| Chart {
        title: title.to_string(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    let training = Category {
        title: "training".to_string(),
        charts: vec![
            chart("loss (train, val)", &["train/loss$", "val/loss$"]),
            chart("learning rate", &["train/lr$"]),
            chart("gradient norm (before clipping)", &["train/grad_norm$"]),
            chart("throughput (tokens/s)", &["train/tokens_per_sec$"]),
        ],
    };
    let lors = Category {
        title: "LORS: ‖B_l A_l‖ / ‖W_shared‖ per layer".to_string(),
        charts: Proj::ALL
            .iter()
            .map(|p| {
                let name = p.name();
                chart(&format!("{name} (one line per layer)"), &[&format!(r"lors/{name}/layer_\d+$")])
            })
            .collect(),
    };
    vec![training, lors]
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

#[cfg(test)]
mod tests {
    use super::*;

    // Writing and reading back: tests/tensorboard_files.rs (our own reader and TensorBoard's).

    #[test]
    fn open_reports_an_unusable_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let dir = file.join("tb");
        let err = format!("{:#}", Board::open(&dir, None).err().unwrap());
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }

    #[test]
    fn training_layout_has_the_losses_first_and_a_chart_per_projection() {
        let layout = training_layout();
        assert_eq!(layout[0].charts[0].tags, ["train/loss$", "val/loss$"]);
        let lors: Vec<&str> = layout[1].charts.iter().map(|c| c.tags[0].as_str()).collect();
        assert_eq!(lors.len(), Proj::ALL.len());
        assert_eq!(lors[0], r"lors/q/layer_\d+$");
        assert_eq!(lors[6], r"lors/down/layer_\d+$");
    }
}
