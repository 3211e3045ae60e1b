//! TensorBoard event files written through `lors_lm::monitor::tensorboard`: framing and content
//! checked by our own reader (tests/common/tb_reader.rs), and by TensorBoard's own loaders and
//! custom-scalars plugin (through scripts/tb_read.py, with the Python of `LORS_LM_TB_PYTHON`,
//! else `.venv-tb` from scripts/setup_tb_venv.sh: those tests fail without it).

mod common;

use common::tb_reader::{crc32c, masked_crc32c, read_event_file, EventFileContents};
use common::{bin, repo, tb_python};
use lors_lm::model::Proj;
use lors_lm::monitor::tensorboard::{training_layout, Board, Category};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Set in the child process of `sigkill_mid_write` to the directory it writes to.
const CHILD_DIR_ENV: &str = "LORS_LM_TB_CHILD_DIR";

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().contains("tfevents"))
        .collect();
    files.sort(); // TensorBoard's order
    files
}

/// Every file in `dir` read and validated, in TensorBoard's order.
fn read_all(dir: &Path) -> Vec<EventFileContents> {
    event_files(dir).iter().map(|f| read_event_file(f).unwrap_or_else(|e| panic!("{e:#}"))).collect()
}

/// TensorBoard's view of `dir` (scripts/tb_read.py output): through the classic
/// `EventAccumulator`, or with `plugin` through the `plugin_event_accumulator` that
/// `tensorboard --load_fast=false` serves from.
fn tensorboard_view(python: &Path, dir: &Path, plugin: bool) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tb_read.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(dir)
        .args(plugin.then_some("--plugin"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "{} {} failed: {}",
        python.display(),
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// TensorBoard's (step, value) points of scalar `tag`.
fn tb_scalars(view: &Value, tag: &str) -> Vec<(i64, f64)> {
    view["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar tag {tag} in {view}"))
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// Loss-like values that f32 stores exactly, so comparisons can be exact.
fn value(run: u32, step: usize) -> f64 {
    f64::from(run) * 100.0 + step as f64 + 0.25
}

/// A run's worth of events: `loss` and `lr` at steps 1..=30, one text at step 0.
fn write_run(dir: &Path) {
    let mut board = Board::open(dir, None).unwrap();
    board.text("config", "| key | value |\n|---|---|\n| lr | 3e-4 |\nünïcode ✓", 0);
    for step in 1..=30 {
        board.scalar("train/loss", value(1, step), step);
        board.scalar("train/lr", 3e-4 * step as f64, step);
    }
    // No flush: dropping the Board must write what is queued.
}

#[test]
fn events_are_framed_and_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run/tb"); // created by open
    write_run(&dir);
    let files = read_all(&dir);
    assert_eq!(files.len(), 1);
    let got = &files[0];
    assert!(!got.truncated_tail);
    assert_eq!(got.records, 1 + 1 + 1 + 60); // file_version, START, text, scalars
    assert_eq!(got.file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(got.session_starts, vec![0]);
    let loss: Vec<(i64, f32)> = got.scalars.iter().filter(|s| s.0 == "train/loss").map(|s| (s.1, s.2)).collect();
    let want: Vec<(i64, f32)> = (1..=30).map(|s| (s as i64, value(1, s) as f32)).collect();
    assert_eq!(loss, want);
    let lr: Vec<(i64, f32)> = got.scalars.iter().filter(|s| s.0 == "train/lr").map(|s| (s.1, s.2)).collect();
    assert_eq!(lr.len(), 30);
    assert!(lr.iter().all(|&(s, v)| v == (3e-4 * s as f64) as f32));
    assert_eq!(
        got.texts,
        vec![("config".to_string(), 0, "| key | value |\n|---|---|\n| lr | 3e-4 |\nünïcode ✓".to_string())]
    );
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

/// `flush` returns once the file holds every queued event: a process killed afterwards keeps
/// them.
#[test]
fn flush_waits_until_the_file_holds_every_event() {
    let tmp = tempfile::tempdir().unwrap();
    let mut board = Board::open(tmp.path(), None).unwrap();
    board.text("config", "# run", 0);
    for step in 1..=5 {
        board.scalar("train/loss", value(1, step), step);
    }
    board.flush();
    let files = event_files(tmp.path());
    assert_eq!(files.len(), 1);
    let got = read_event_file(&files[0]).unwrap();
    assert!(!got.truncated_tail);
    assert_eq!(got.records, 8); // file_version + START + text + 5 scalars
    assert_eq!(got.scalars.len(), 5);
    drop(board);
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
fn tensorboard_reads_scalars_and_text() {
    let python = tb_python();
    let tmp = tempfile::tempdir().unwrap();
    write_run(tmp.path());
    let want_text = serde_json::json!([[0, "| key | value |\n|---|---|\n| lr | 3e-4 |\nünïcode ✓"]]);
    let want_loss: Vec<(i64, f64)> = (1..=30).map(|s| (s as i64, value(1, s))).collect();
    for plugin in [false, true] {
        let view = tensorboard_view(&python, tmp.path(), plugin);
        assert_eq!(tb_scalars(&view, "train/loss"), want_loss, "plugin: {plugin}");
        let lr = tb_scalars(&view, "train/lr");
        assert_eq!(lr.len(), 30);
        for (s, v) in lr {
            assert_eq!(v as f32, (3e-4 * s as f64) as f32);
        }
        assert_eq!(view["text_plugin_tags"], serde_json::json!(["config"]));
        assert_eq!(view["texts"]["config"], want_text, "plugin: {plugin}");
        if !plugin {
            // The classic accumulator keeps text summaries as tensors.
            assert_eq!(view["tensor_tags"], serde_json::json!(["config"]));
        }
    }
}

// ------------------------------------------------------------ the custom-scalars layout

const LAYOUT_TAG: &str = "custom_scalars__config__";

/// A layout as [[category title, [[chart title, [tag regex, ...]], ...]], ...].
fn layout_json(categories: &[Category]) -> Value {
    let charts = |c: &Category| c.charts.iter().map(|ch| json!([ch.title, ch.tags])).collect::<Vec<_>>();
    Value::Array(categories.iter().map(|c| json!([c.title, charts(c)])).collect())
}

/// The same from TensorBoard's JSON of a `tensorboard.Layout` proto.
fn tb_layout_json(layout: &Value) -> Value {
    let categories = layout["category"].as_array().unwrap_or_else(|| panic!("no categories in {layout}"));
    let charts = |c: &Value| -> Vec<Value> {
        c["chart"].as_array().unwrap().iter().map(|ch| json!([ch["title"], ch["multiline"]["tag"]])).collect()
    };
    Value::Array(categories.iter().map(|c| json!([c["title"], charts(c)])).collect())
}

/// Custom-scalars layouts in one file (as our reader sees them): the steps they were written at.
fn layout_steps(file: &EventFileContents) -> Vec<i64> {
    file.tensors
        .iter()
        .filter(|(plugin, tag, _)| plugin == "custom_scalars" && tag == LAYOUT_TAG)
        .map(|t| t.2)
        .collect()
}

/// The tags TensorBoard's custom-scalars plugin plots for each chart of `layout`: the losses in
/// one chart, and for each LORS projection type the lines of layers 0..`layers`.
fn assert_layout_plots(custom_scalars: &Value, layers: usize) {
    let layout = training_layout();
    assert_eq!(tb_layout_json(&custom_scalars["layout"]), layout_json(&layout));
    let tags = &custom_scalars["tags"];
    let loss = &layout[0].charts[0].tags;
    assert_eq!([&tags[&loss[0]], &tags[&loss[1]]], [&json!(["train/loss"]), &json!(["val/loss"])], "{tags}");
    for chart in &layout[0].charts {
        assert!(chart.tags.iter().all(|t| tags[t].as_array().is_some_and(|a| a.len() == 1)), "{tags}");
    }
    assert_eq!(layout[1].charts.len(), Proj::ALL.len());
    for (chart, p) in layout[1].charts.iter().zip(Proj::ALL) {
        let want: Vec<String> = (0..layers).map(|l| format!("lors/{p}/layer_{l:02}")).collect();
        assert_eq!(tags[&chart.tags[0]], json!(want), "{}", chart.title);
    }
}

#[test]
fn tensorboard_reads_the_custom_scalars_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let mut board = Board::open(tmp.path(), None).unwrap();
    board.layout(&training_layout());
    for step in 1..=3 {
        for tag in TRAIN_TAGS.iter().chain(&["val/loss", "val/ppl", "train/mfu"]) {
            board.scalar(tag, value(1, step), step);
        }
        for layer in 0..2 {
            for p in Proj::ALL {
                board.scalar(&format!("lors/{p}/layer_{layer:02}"), value(1, step), step);
            }
        }
    }
    drop(board);
    let files = read_all(tmp.path());
    assert_eq!(layout_steps(&files[0]), vec![0]);
    assert_eq!(files[0].tensors.len(), 1);

    let python = tb_python();
    let classic = tensorboard_view(&python, tmp.path(), false);
    let layouts = classic["layouts"].as_array().unwrap();
    assert_eq!(layouts.len(), 1, "{classic}");
    assert_eq!(layouts[0][0], 0);
    assert_eq!(tb_layout_json(&layouts[0][1]), layout_json(&training_layout()));
    let plugin = tensorboard_view(&python, tmp.path(), true);
    assert_layout_plots(&plugin["custom_scalars"], 2);
}

/// Steps 1..=10 in a first process, then a second process: resumed from the checkpoint at
/// step 6 (`resume`) writing 7..=12, or a fresh run in the same directory writing 7..=12.
fn write_two_processes(dir: &Path, resume: bool) {
    let mut first = Board::open(dir, None).unwrap();
    for step in 1..=10 {
        first.scalar("loss", value(1, step), step);
    }
    first.text("note", "first process", 10);
    drop(first);
    let mut second = Board::open(dir, resume.then_some(6)).unwrap();
    for step in 7..=12 {
        second.scalar("loss", value(2, step), step);
    }
    second.text("note", "second process", 12);
}

#[test]
fn resume_purges_the_earlier_process_after_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    write_two_processes(tmp.path(), true);

    // Our reader: two files, each starting with a START event (the second at step 7).
    let files = read_all(tmp.path());
    assert_eq!(files.len(), 2, "the second writer must not overwrite the first file");
    assert_eq!(files[0].session_starts, vec![0]);
    assert_eq!(files[1].session_starts, vec![7]);
    assert_eq!(files[0].scalars.len(), 10);
    assert_eq!(files[1].scalars.len(), 6);

    let python = tb_python();
    let want: Vec<(i64, f64)> = (1..=12).map(|s| (s as i64, value(if s <= 6 { 1 } else { 2 }, s))).collect();
    let classic = tensorboard_view(&python, tmp.path(), false);
    assert_eq!(tb_scalars(&classic, "loss"), want);
    // The classic EventAccumulator purges scalars, histograms, images and audio only, not
    // tensors: the first process's text at step 10 stays there.
    assert_eq!(classic["texts"]["note"], serde_json::json!([[10, "first process"], [12, "second process"]]));
    let plugin = tensorboard_view(&python, tmp.path(), true);
    assert_eq!(tb_scalars(&plugin, "loss"), want);
    assert_eq!(plugin["texts"]["note"], serde_json::json!([[12, "second process"]]));
}

#[test]
fn fresh_run_in_a_used_directory_supersedes_the_old_events() {
    let python = tb_python();
    let tmp = tempfile::tempdir().unwrap();
    write_two_processes(tmp.path(), false);
    let want: Vec<(i64, f64)> = (7..=12).map(|s| (s as i64, value(2, s))).collect();
    for plugin in [false, true] {
        let view = tensorboard_view(&python, tmp.path(), plugin);
        assert_eq!(tb_scalars(&view, "loss"), want, "plugin: {plugin}");
    }
}

/// Control: without START events (tensorboard-rs alone) TensorBoard keeps both processes'
/// steps 7..=10, out of order. This is what `Board::open`'s START event prevents.
#[test]
fn without_start_events_tensorboard_duplicates_steps() {
    let python = tb_python();
    let tmp = tempfile::tempdir().unwrap();
    let mut first = tensorboard_rs::summary_writer::SummaryWriter::new(tmp.path());
    for step in 1..=10 {
        first.add_scalar("loss", value(1, step) as f32, step);
    }
    drop(first);
    std::thread::sleep(Duration::from_millis(1100)); // file names have 1 s resolution
    let mut second = tensorboard_rs::summary_writer::SummaryWriter::new(tmp.path());
    for step in 7..=12 {
        second.add_scalar("loss", value(2, step) as f32, step);
    }
    drop(second);
    assert_eq!(event_files(tmp.path()).len(), 2);
    let mut duplicated: Vec<i64> = (1..=10).collect();
    duplicated.extend(7..=12);
    for plugin in [false, true] {
        let view = tensorboard_view(&python, tmp.path(), plugin);
        let steps: Vec<i64> = tb_scalars(&view, "loss").iter().map(|p| p.0).collect();
        assert_eq!(steps, duplicated, "plugin: {plugin}");
    }
}

/// Child side of `sigkill_mid_write` (this test binary re-run as a separate process):
/// writes `x` at steps 1..=1000, flushing every 10 steps and printing "flushed <step>".
#[test]
#[ignore = "helper: run as a child process by sigkill_mid_write"]
fn sigkill_child_writer() {
    let dir = std::env::var_os(CHILD_DIR_ENV).expect("run by sigkill_mid_write, which sets LORS_LM_TB_CHILD_DIR");
    let mut board = Board::open(Path::new(&dir), None).unwrap();
    for step in 1..=1000 {
        board.scalar("x", value(1, step), step);
        if step % 10 == 0 {
            board.flush();
            println!("\nflushed {step}");
            std::io::Write::flush(&mut std::io::stdout()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A writer killed with SIGKILL: every complete record is valid, and everything flushed
/// (steps 1..=20) is there, for our reader and for TensorBoard.
#[test]
fn sigkill_mid_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigkill_child_writer", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_DIR_ENV, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "flushed 20" {
                let _ = tx.send(());
                return;
            }
        }
    });
    let flushed = rx.recv_timeout(Duration::from_secs(120));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    if flushed.is_err() {
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        panic!("the child never reported 'flushed 20'; its stderr:\n{stderr}");
    }

    let files = read_all(tmp.path());
    assert_eq!(files.len(), 1);
    let got = &files[0];
    let steps: Vec<i64> = got.scalars.iter().map(|s| s.1).collect();
    assert!(steps.len() >= 20, "only {} scalars survived", steps.len());
    assert_eq!(steps, (1..=steps.len() as i64).collect::<Vec<_>>());
    assert!(got.scalars.iter().all(|s| s.2 == value(1, s.1 as usize) as f32));
    assert_eq!(got.records, 2 + steps.len()); // file_version, START, scalars
    assert_eq!(got.session_starts, vec![0]);
    println!("killed after step {} (truncated tail: {})", steps.len(), got.truncated_tail);

    let python = tb_python();
    for plugin in [false, true] {
        let view = tensorboard_view(&python, tmp.path(), plugin);
        let tb_steps: Vec<i64> = tb_scalars(&view, "x").iter().map(|p| p.0).collect();
        assert_eq!(tb_steps, steps, "plugin: {plugin}");
    }
}

// ------------------------------------------------------------ a real `lors-lm train` run

/// A tiny prepared corpus with a tokenizer (so eval writes text samples too).
fn prepared_corpus(dir: &Path) -> PathBuf {
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money. ";
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text.repeat(60)).unwrap();
    let data = dir.join("data");
    let out = bin()
        .args(["prepare", "--vocab-size", "300", "--input"])
        .arg(&corpus)
        .arg("--out")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    data
}

fn train_cmd(data: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["train", "--config"])
        .arg(repo("configs/tiny.toml"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(run)
        .args(extra);
    c
}

const TRAIN_TAGS: [&str; 5] = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/step_ms"];

#[test]
fn a_training_run_logs_every_tag_at_its_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_corpus(tmp.path());
    let run = tmp.path().join("run");
    let out = train_cmd(
        &data,
        &run,
        &["--quiet", "--set", "train.max_steps=30", "--set", "train.eval_interval=10", "--set", "train.log_interval=5"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tb = run.join("tb");
    // Our reader: every record framed correctly.
    let files = read_all(&tb);
    assert_eq!(files.len(), 1);
    assert!(!files[0].truncated_tail);
    let steps_of =
        |tag: &str| -> Vec<i64> { files[0].scalars.iter().filter(|(t, _, _)| t == tag).map(|(_, s, _)| *s).collect() };
    let every: Vec<i64> = (1..=30).collect();
    for tag in TRAIN_TAGS {
        assert_eq!(steps_of(tag), every, "{tag}");
    }
    assert_eq!(steps_of("val/loss"), vec![10, 20, 30]);
    assert_eq!(steps_of("sys/rss_mb"), vec![1, 5, 10, 15, 20, 25, 30]);
    // TensorBoard itself.
    let python = tb_python();
    let view = tensorboard_view(&python, &tb, false);
    for tag in TRAIN_TAGS {
        let pts = tb_scalars(&view, tag);
        assert_eq!(pts.iter().map(|p| p.0).collect::<Vec<_>>(), every, "{tag}");
    }
    for tag in ["val/loss", "val/ppl"] {
        assert_eq!(tb_scalars(&view, tag).iter().map(|p| p.0).collect::<Vec<_>>(), vec![10, 20, 30], "{tag}");
    }
    let val = tb_scalars(&view, "val/loss");
    let ppl = tb_scalars(&view, "val/ppl");
    assert!((ppl[2].1 - val[2].1.exp()).abs() < 1e-3 * ppl[2].1);
    for tag in ["model/params_unique", "model/params_vanilla_equivalent"] {
        assert_eq!(tb_scalars(&view, tag).len(), 1, "{tag}");
    }
    assert!(tb_scalars(&view, "model/params_unique")[0].1 < tb_scalars(&view, "model/params_vanilla_equivalent")[0].1);
    assert_eq!(tb_scalars(&view, "sys/rss_mb").len(), 7);
    // LORS diagnostics: every projection type of every layer, at every eval.
    for layer in 0..3 {
        for p in ["q", "k", "v", "o", "gate", "up", "down"] {
            let pts = tb_scalars(&view, &format!("lors/{p}/layer_{layer:02}"));
            assert_eq!(pts.iter().map(|p| p.0).collect::<Vec<_>>(), vec![10, 20, 30]);
            assert!(pts[2].1 > 0.0, "B A should have moved off zero");
        }
    }
    let samples = view["texts"]["samples"].as_array().unwrap_or_else(|| panic!("no samples text in {view}"));
    assert_eq!(samples.len(), 3);
    // The Custom Scalars tab: one layout, whose every chart plots the run's tags.
    assert_eq!(layout_steps(&files[0]), vec![0]);
    let plugin = tensorboard_view(&python, &tb, true);
    assert_layout_plots(&plugin["custom_scalars"], 3);
}

#[test]
fn a_resumed_training_run_does_not_repeat_steps_in_tensorboard() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_corpus(tmp.path());
    let run = tmp.path().join("run");
    let args =
        ["--quiet", "--set", "train.max_steps=20", "--set", "train.eval_interval=5", "--set", "train.ckpt_interval=8"];
    // Stop at 12: the last checkpoint is 12 but events exist up to 12; then a second process
    // resumes from 12 and continues to 20.
    let out = train_cmd(&data, &run, &args).args(["--stop-at", "12"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Simulate a crash after the checkpoint: remove checkpoint 12 so resume starts at 8 and
    // steps 9..=12 are logged twice (once per process).
    std::fs::remove_dir_all(run.join("checkpoints/12")).unwrap();
    std::fs::write(run.join("checkpoints/latest"), "8").unwrap();
    let out = bin().args(["train", "--quiet", "--resume", "--out"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files = read_all(&run.join("tb"));
    assert_eq!(files.len(), 2);
    // The layout is written by the fresh run only, and outlives the resume.
    assert_eq!((layout_steps(&files[0]), layout_steps(&files[1])), (vec![0], vec![]));
    let python = tb_python();
    for plugin in [false, true] {
        let view = tensorboard_view(&python, &run.join("tb"), plugin);
        let steps: Vec<i64> = tb_scalars(&view, "train/loss").iter().map(|p| p.0).collect();
        assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "plugin={plugin}");
        let val: Vec<i64> = tb_scalars(&view, "val/loss").iter().map(|p| p.0).collect();
        assert_eq!(val, vec![5, 10, 15, 20], "plugin={plugin}");
        assert_eq!(view["layouts"].as_array().map(Vec::len), Some(1), "plugin={plugin}");
    }
    let plugin = tensorboard_view(&python, &run.join("tb"), true);
    assert_eq!(tb_layout_json(&plugin["custom_scalars"]["layout"]), layout_json(&training_layout()));
}

#[test]
fn sigkill_mid_training_leaves_a_readable_event_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared_corpus(tmp.path());
    let run = tmp.path().join("run");
    let mut child = train_cmd(
        &data,
        &run,
        &[
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.eval_interval=10",
            "--set",
            "train.log_interval=1000",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The events are flushed right after the eval line's sample is printed.
            if line.starts_with("sample") && tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = 0;
    while seen < 2 {
        rx.recv_timeout(Duration::from_secs(120)).expect("no eval within 120 s");
        seen += 1;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let files = read_all(&run.join("tb"));
    let val: Vec<i64> = files[0].scalars.iter().filter(|(t, _, _)| t == "val/loss").map(|(_, s, _)| *s).collect();
    assert!(val.len() >= 2 && val[..2] == [10, 20], "val/loss steps after kill: {val:?}");
    let loss_steps = files[0].scalars.iter().filter(|(t, _, _)| t == "train/loss").count();
    assert!(loss_steps >= 20);
    let python = tb_python();
    let view = tensorboard_view(&python, &run.join("tb"), false);
    assert!(tb_scalars(&view, "train/loss").len() >= 20);
}
