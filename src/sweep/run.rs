//! Training one configuration × seed of a sweep (through `train::session`, with the resolved
//! config), evaluating it on the whole validation split, and reading back what finished runs
//! left behind.

use crate::config::Config;
use crate::infer::perplexity::eval_tokens;
use crate::sweep::plan::Resolved;
use crate::train::run_dir::load_model;
use crate::train::{session, RunDir, SessionOptions};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What a finished run leaves in `result.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub seed: u64,
    /// Mean loss over the whole validation split (`lors-lm eval` definition).
    pub val_loss: f64,
    pub val_tokens: usize,
    pub steps: usize,
    pub tokens: u64,
    /// Sum of the training steps' times (evaluation and checkpoints excluded).
    pub step_time_s: f64,
    pub tokens_per_sec: f64,
    /// Wall time of this invocation's training and evaluation (less than the run's whole
    /// time if it was resumed).
    pub wall_s: f64,
    pub resumed: bool,
    /// The commit the training binary was built from (with a note if the tree had changes).
    #[serde(default)]
    pub commit: String,
}

impl RunResult {
    /// The result a finished run saved in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<RunResult>> {
        let p = dir.join("result.json");
        if !p.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let res = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt: delete it and run the sweep again", p.display()))?;
        Ok(Some(res))
    }
}

/// The whole validation split and the device, loaded once for every run's final evaluation.
pub struct FinalEval {
    pub tokens: Vec<u32>,
    pub device: Device,
}

/// Train (or resume, or keep) one run and evaluate it on the whole validation split.
pub fn train_one(r: &Resolved, seed: u64, dir: &Path, data_dir: &Path, ev: &FinalEval) -> Result<RunResult> {
    let mut cfg = r.cfg.clone();
    cfg.train.seed = seed;
    // One log line per evaluation keeps a long sweep's console readable.
    cfg.train.log_interval = cfg.train.eval_interval.max(1);
    let run = RunDir::at(dir);
    let mut resume = false;
    if run.config_path().is_file() {
        let old = Config::load(&run.config_path(), &[])?;
        if old != cfg {
            bail!(
                "{} holds a run of a different config (the plan changed?): delete that directory or pass another --out; nothing was overwritten",
                dir.display()
            );
        }
        if let Some(res) = RunResult::read(dir)? {
            eprintln!("already finished: kept");
            return Ok(res);
        }
        resume = run.latest_step()?.is_some();
    }
    let start = Instant::now();
    let opts = SessionOptions { resume, force: !resume, ..Default::default() };
    let summary = session::train(cfg.clone(), data_dir, &run, &ev.device, &opts)?;
    if summary.final_step < cfg.train.max_steps {
        bail!(
            "{} stopped at step {} of {}: run the sweep again to resume it",
            dir.display(),
            summary.final_step,
            cfg.train.max_steps
        );
    }
    // The whole validation split, windows of train.seq_len (see `lors-lm eval`).
    let (model, _) = load_model(&cfg, &run.checkpoint(None)?, &ev.device)?;
    let eval = eval_tokens(&model.merged()?, &ev.tokens, cfg.train.seq_len, 16, &ev.device)?;
    let (steps, tokens_seen, step_ms) = step_totals(&read_metrics(&run.metrics_path())?);
    let res = RunResult {
        name: r.name.clone(),
        seed,
        val_loss: eval.loss,
        val_tokens: eval.tokens,
        steps,
        tokens: tokens_seen,
        step_time_s: step_ms / 1e3,
        tokens_per_sec: tokens_seen as f64 / (step_ms / 1e3).max(1e-9),
        wall_s: start.elapsed().as_secs_f64(),
        resumed: resume,
        commit: git_commit(),
    };
    let result_path = dir.join("result.json");
    let text = serde_json::to_string_pretty(&res)?;
    crate::files::write_atomic(&result_path, |w| w.write_all(text.as_bytes()))?;
    Ok(res)
}

/// The JSON lines of a run's metrics.jsonl.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("{} is corrupt", path.display()))).collect()
}

/// Training-step lines (those with a step time).
fn step_lines(metrics: &[serde_json::Value]) -> impl Iterator<Item = &serde_json::Value> {
    metrics.iter().filter(|v| v.get("ms").and_then(|m| m.as_f64()).is_some())
}

/// (last step, tokens seen, sum of step ms).
fn step_totals(metrics: &[serde_json::Value]) -> (usize, u64, f64) {
    step_lines(metrics).fold((0, 0, 0.0), |(_, _, ms), v| {
        (
            v["step"].as_u64().unwrap_or(0) as usize,
            v["tokens"].as_u64().unwrap_or(0),
            ms + v["ms"].as_f64().unwrap_or(0.0),
        )
    })
}

/// Median training-step time in ms: robust to a machine that was briefly busy with something
/// else (or a sweep paused and continued).
pub fn median_step_ms(metrics: &[serde_json::Value], path: &Path) -> Result<f64> {
    let mut ms: Vec<f64> = step_lines(metrics).filter_map(|v| v["ms"].as_f64()).collect();
    if ms.is_empty() {
        bail!("{} has no training steps", path.display());
    }
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    Ok(if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 })
}

/// (tokens, val_loss) of the periodic evaluations.
pub fn val_curve(metrics: &[serde_json::Value]) -> Vec<(f64, f64)> {
    metrics.iter().filter_map(|v| Some((v.get("tokens")?.as_f64()?, v.get("val_loss")?.as_f64()?))).collect()
}

/// The commit this binary was built from (recorded by build.rs).
pub fn git_commit() -> String {
    env!("LORS_LM_GIT_COMMIT").to_string()
}
