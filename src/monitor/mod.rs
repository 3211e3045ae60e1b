//! What a training run reports, and where: `metrics.jsonl` (one JSON line per step and per
//! eval), TensorBoard event files (`tensorboard.rs`), the console (`console.rs`: a progress
//! bar on a terminal, plain lines otherwise) and `samples.txt`. [`Monitor`] fans each step and
//! each evaluation out to all of them, so the training loop stays a few lines.
//! `plot.rs` draws the PNG charts of `lors-lm sweep`.

pub mod console;
pub mod plot;
pub mod tensorboard;

use crate::model::Proj;
use anyhow::{Context, Result};
use console::Console;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use tensorboard::Board;

/// The numbers of one optimizer step that get reported.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Tokens of this step.
    pub tokens: usize,
    pub ms: f64,
    /// With distillation: the step's cross-entropy and KL(teacher ‖ student).
    pub ce: Option<f64>,
    pub kl: Option<f64>,
    /// Data-parallel training: the step's time in the gradient all-reduce.
    pub allreduce_ms: Option<f64>,
}

/// Where a run's reports go.
pub struct Paths {
    pub metrics: PathBuf,
    pub tensorboard: PathBuf,
    pub samples: PathBuf,
}

pub struct Monitor {
    /// None: a monitor that reports nothing (`silent`).
    metrics: Option<fs::File>,
    metrics_path: PathBuf,
    board: Board,
    console: Console,
    samples_path: PathBuf,
    log_interval: usize,
    max_steps: usize,
    /// (training FLOPs per token, peak FLOP/s of the device): MFU is logged when known.
    mfu: Option<(f64, f64)>,
    first_step: usize,
}

impl Monitor {
    /// Open the reports of a run that continues after `start_step` (0 for a new run):
    /// metrics lines of later steps (written by a process that stopped before its next
    /// checkpoint) are dropped, and TensorBoard is told to drop its points after it too.
    pub fn open(paths: Paths, start_step: usize, quiet: bool, log_interval: usize, max_steps: usize) -> Result<Self> {
        truncate_metrics(&paths.metrics, start_step)?;
        let metrics = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.metrics)
            .with_context(|| format!("cannot open {}", paths.metrics.display()))?;
        let mut board = Board::open(&paths.tensorboard, (start_step > 0).then_some(start_step))?;
        if start_step == 0 {
            board.layout(&tensorboard::training_layout());
        }
        Ok(Self {
            metrics: Some(metrics),
            metrics_path: paths.metrics,
            board,
            console: Console::new(quiet),
            samples_path: paths.samples,
            log_interval,
            max_steps,
            mfu: None,
            first_step: start_step + 1,
        })
    }

    /// A monitor that writes and prints nothing: a data-parallel rank other than 0 (rank 0
    /// reports for the run).
    pub fn silent(paths: Paths, log_interval: usize, max_steps: usize) -> Self {
        Self {
            metrics: None,
            metrics_path: paths.metrics,
            board: Board::off(&paths.tensorboard),
            console: Console::off(),
            samples_path: paths.samples,
            log_interval,
            max_steps,
            mfu: None,
            first_step: 1,
        }
    }

    /// Log model FLOP utilisation: `flops_per_token` × tokens/s against `peak_flops` (FLOP/s).
    pub fn set_mfu(&mut self, flops_per_token: f64, peak_flops: f64) {
        self.mfu = Some((flops_per_token, peak_flops));
    }

    /// A line on the console (above the progress bar; nothing with --quiet).
    pub fn line(&self, s: &str) {
        self.console.line(s);
    }

    /// A line printed even with --quiet.
    pub fn summary(&self, s: &str) {
        self.console.summary(s);
    }

    /// A scalar at `step`, to TensorBoard only.
    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) {
        self.board.scalar(tag, value, step);
    }

    /// Start the progress bar for steps `start+1 ..= max_steps`.
    pub fn start(&mut self, start: usize) {
        self.console.start_progress(start, self.max_steps);
    }

    /// Report one step: metrics line, TensorBoard, progress bar, and a console line every
    /// `log_interval` steps (and at the first and last).
    pub fn step(&mut self, r: &StepReport) -> Result<()> {
        let tok_s = r.tokens as f64 / (r.ms / 1e3);
        let mfu = self.mfu.map(|(flops, peak)| flops * tok_s / peak);
        let mut line = serde_json::json!({"step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens_seen, "ms": r.ms, "tokens_per_sec": tok_s});
        if let Some(m) = mfu {
            line["mfu"] = m.into();
            self.board.scalar("train/mfu", m, r.step);
        }
        for (key, v) in [("ce", r.ce), ("kl", r.kl), ("allreduce_ms", r.allreduce_ms)] {
            if let Some(v) = v {
                line[key] = v.into();
                self.board.scalar(&format!("train/{key}"), v, r.step);
            }
        }
        self.log(line)?;
        for (tag, v) in [
            ("train/loss", r.loss),
            ("train/lr", r.lr),
            ("train/grad_norm", r.grad_norm),
            ("train/tokens_per_sec", tok_s),
            ("train/step_ms", r.ms),
        ] {
            self.board.scalar(tag, v, r.step);
        }
        self.console.progress(r.step, r.loss, tok_s);
        if r.step.is_multiple_of(self.log_interval) || r.step == self.max_steps || r.step == self.first_step {
            if let Some(rss) = rss_mb() {
                self.board.scalar("sys/rss_mb", rss, r.step);
            }
            self.console.line(&format!(
                "step {:>6}/{} | loss {:.4} | lr {:.2e} | grad {:.3} | {tok_s:>8.0} tok/s | {:>7.1} ms{}",
                r.step,
                self.max_steps,
                r.loss,
                r.lr,
                r.grad_norm,
                r.ms,
                mfu.map_or(String::new(), |m| format!(" | mfu {:.1}%", 100.0 * m))
            ));
        }
        Ok(())
    }

    /// Report an evaluation: validation loss, each layer's `‖B A‖ / ‖W_shared‖`, a sample.
    /// Flushes TensorBoard.
    pub fn eval(
        &mut self,
        step: usize,
        tokens_seen: u64,
        val_loss: f64,
        ratios: &[(usize, Proj, f32)],
        sample: Option<&str>,
    ) -> Result<()> {
        self.log(
            serde_json::json!({"step": step, "val_loss": val_loss, "val_ppl": val_loss.exp(), "tokens": tokens_seen}),
        )?;
        self.console.line(&format!("eval  {step:>6} | val loss {val_loss:.4} | val ppl {:.2}", val_loss.exp()));
        self.board.scalar("val/loss", val_loss, step);
        self.board.scalar("val/ppl", val_loss.exp(), step);
        for (layer, proj, ratio) in ratios {
            self.board.scalar(&format!("lors/{proj}/layer_{layer:02}"), *ratio as f64, step);
        }
        if let Some(text) = sample.filter(|_| self.metrics.is_some()) {
            self.board.text("samples", text, step);
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.samples_path)
                .with_context(|| format!("cannot open {}", self.samples_path.display()))?;
            writeln!(f, "--- step {step}\n{text}")?;
            let first_line: String = text.chars().take(100).map(|c| if c == '\n' { ' ' } else { c }).collect();
            self.console.line(&format!("sample    {first_line}"));
        }
        self.board.flush();
        Ok(())
    }

    /// Append a record to metrics.jsonl (it needs a "step": a resume drops later steps' lines).
    pub fn record(&mut self, line: serde_json::Value) -> Result<()> {
        self.log(line)
    }

    /// Report that all `ranks` of a data-parallel run hold the weights with this checksum.
    pub fn weights_check(&mut self, step: usize, checksum: u64, ranks: usize) -> Result<()> {
        self.log(serde_json::json!({"step": step, "weights_checksum": format!("{checksum:016x}"), "ranks": ranks}))?;
        self.console.line(&format!("ranks {step:>6} | all {ranks} hold identical weights (checksum {checksum:016x})"));
        Ok(())
    }

    /// Flush metrics.jsonl (before a checkpoint, so it never lags behind one).
    pub fn flush(&mut self) -> Result<()> {
        let Some(metrics) = self.metrics.as_mut() else { return Ok(()) };
        metrics.flush().with_context(|| format!("cannot write {}", self.metrics_path.display()))
    }

    /// Flush everything and end the progress bar.
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.board.flush();
        self.console.finish();
        Ok(())
    }

    pub fn metrics_path(&self) -> &Path {
        &self.metrics_path
    }

    pub fn tensorboard_dir(&self) -> &Path {
        self.board.dir()
    }

    /// Append one JSON line to metrics.jsonl.
    fn log(&mut self, line: serde_json::Value) -> Result<()> {
        let Some(metrics) = self.metrics.as_mut() else { return Ok(()) };
        writeln!(metrics, "{line}").with_context(|| {
            format!(
                "cannot append to {} (disk full or not writable?); checkpoints already written are intact",
                self.metrics_path.display()
            )
        })
    }
}

/// Keep only metrics lines of steps <= `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(path, kept).with_context(|| format!("cannot write {}", path.display()))
}

/// Resident memory of this process in MiB (Linux; None elsewhere).
pub fn rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

/// Peak resident memory of this process in MiB (Linux; None elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Reset the peak-RSS counter (Linux), so `peak_rss_mb` measures from here.
pub fn reset_peak_rss() {
    let _ = fs::write("/proc/self/clear_refs", "5");
}

fn proc_status_mb(key: &str) -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
