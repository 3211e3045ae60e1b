//! Training one configuration × seed of a sweep (through `train::session`, with the resolved
//! config), evaluating it on the whole validation split, timing batch-1 decoding, and reading
//! back what finished runs left behind. A decay branch (`branch_of`, `sweep/branch.rs`) is
//! trained from its source's checkpoint: [`train_chain`] trains a source in segments, stopping
//! at each of its branches' starting steps to hand the checkpoint over.

use crate::config::{Config, Mode};
use crate::infer::generate::generate_batch;
use crate::infer::perplexity::{eval_tokens, ByteLevel};
use crate::model::{Model, ParamCounts, Weights};
use crate::sweep::branch;
use crate::sweep::plan::Resolved;
use crate::train::run_dir::load_model;
use crate::train::{session, RunDir, SessionOptions};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Batch-1 decoding speed of a finished run, measured at its end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeSpeed {
    /// "factored" for shared and LORS models (their unique parameters only), "merged" for
    /// vanilla ones.
    pub weights: String,
    /// Median over 3 rounds of `gen_tokens` tokens after a prompt of `prompt_tokens`.
    pub tokens_per_sec: f64,
    /// The merged form's speed too, for a model that has a factored form.
    #[serde(default)]
    pub merged_tokens_per_sec: Option<f64>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// CPU threads of the measuring process (a sweep with --jobs gives each job fewer).
    pub threads: usize,
    /// Weight bytes one step reads in `weights` form, and how many are distinct.
    pub bytes_read: u64,
    pub bytes_distinct: u64,
}

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
    /// Bits per byte over the validation split (byte-level data only; infer/perplexity.rs).
    #[serde(default)]
    pub val_bpb: Option<f64>,
    /// Training FLOPs of the whole run (`ParamCounts::train_flops` × tokens).
    #[serde(default)]
    pub train_flops: f64,
    /// Batch-1 decoding speed of the trained model.
    #[serde(default)]
    pub decode: Option<DecodeSpeed>,
    /// A decay branch: the run (`name@step`) whose checkpoint it continued. Its steps, tokens,
    /// step time and FLOPs include the source's up to that step: what a run of its own would cost.
    #[serde(default)]
    pub branched_from: Option<String>,
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
    /// The byte count of a byte-level tokenizer's ids (then results carry bits per byte).
    pub bytes: Option<ByteLevel>,
}

/// The config a run of `r` with `seed` trains with.
pub fn run_config(r: &Resolved, seed: u64) -> Config {
    let mut cfg = r.cfg.clone();
    cfg.train.seed = seed;
    // One log line per evaluation keeps a long sweep's console readable.
    cfg.train.log_interval = cfg.train.eval_interval.max(1);
    cfg
}

/// Train (or resume, or keep) one run and evaluate it on the whole validation split.
pub fn train_one(r: &Resolved, seed: u64, dir: &Path, data_dir: &Path, ev: &FinalEval) -> Result<RunResult> {
    let start = Instant::now();
    match train_to(r, seed, dir, data_dir, &ev.device, None)? {
        Trained::Finished(res) => Ok(*res),
        Trained::Reached { resumed } => finish(r, seed, dir, ev, resumed, start),
    }
}

/// What [`train_to`] found or did.
enum Trained {
    /// The run had finished before (its result).
    Finished(Box<RunResult>),
    /// It is at the step asked for now; `resumed`: it continued a checkpoint.
    Reached { resumed: bool },
}

/// Train `r` with `seed` in `dir` up to `stop_at` (checkpointed there) or to the end,
/// resuming what is there; a directory of another config is refused.
fn train_to(
    r: &Resolved,
    seed: u64,
    dir: &Path,
    data_dir: &Path,
    device: &Device,
    stop_at: Option<usize>,
) -> Result<Trained> {
    let cfg = run_config(r, seed);
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
            return Ok(Trained::Finished(Box::new(res)));
        }
        resume = run.latest_step()?.is_some();
    }
    let target = stop_at.unwrap_or(cfg.train.max_steps);
    if run.latest_step()?.is_some_and(|s| s >= target) {
        return Ok(Trained::Reached { resumed: resume });
    }
    let opts = SessionOptions { resume, force: !resume, stop_at, ..Default::default() };
    let summary = session::train(cfg.clone(), data_dir, &run, device, &opts)?;
    if summary.final_step < target {
        bail!("{} stopped at step {} of {target}: run the sweep again to resume it", dir.display(), summary.final_step);
    }
    Ok(Trained::Reached { resumed: resume })
}

/// Evaluate a trained run on the whole validation split, time its decoding, and write its
/// `result.json`.
fn finish(r: &Resolved, seed: u64, dir: &Path, ev: &FinalEval, resumed: bool, start: Instant) -> Result<RunResult> {
    let cfg = run_config(r, seed);
    let run = RunDir::at(dir);
    // The whole validation split, windows of train.seq_len (see `lors-lm eval`).
    let (model, store) = load_model(&cfg, &run.checkpoint(None)?, &ev.device)?;
    drop(store);
    let merged = model.merged()?;
    let eval = eval_tokens(&merged, &ev.tokens, cfg.train.seq_len, 16, &ev.device)?;
    let val_bpb = ev.bytes.as_ref().and_then(|b| b.bits_per_byte(&eval, &ev.tokens));
    let decode = decode_speed(&model, merged, cfg.lors.mode, &ev.tokens).context("timing batch-1 decoding")?;
    let (steps, tokens_seen, step_ms) = step_totals(&read_metrics(&run.metrics_path())?);
    let t = &cfg.train;
    let flops = ParamCounts::train_flops(&cfg.model, &cfg.lors, t.seq_len, t.batch_size * t.seq_len);
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
        resumed,
        commit: git_commit(),
        val_bpb,
        train_flops: flops.total() * tokens_seen as f64,
        decode: Some(decode),
        branched_from: r.branch.as_ref().map(|(from, at)| format!("{from}@{at}")),
    };
    let result_path = dir.join("result.json");
    let text = serde_json::to_string_pretty(&res)?;
    crate::files::write_atomic(&result_path, |w| w.write_all(text.as_bytes()))?;
    Ok(res)
}

/// Train the source run `src` with `seed` and its decay branches (runs whose `branch_of` is
/// `src`): the source in segments, stopping at each branch's starting step, whose checkpoint
/// the branch continues; then the source to its end when `whole`. Resumable at any point: a
/// branch whose directory holds its checkpoint is resumed, a finished one kept.
pub fn train_chain(
    src: &Resolved,
    branches: &[&Resolved],
    whole: bool,
    seed: u64,
    out: &Path,
    data_dir: &Path,
    ev: &FinalEval,
) -> Result<Vec<RunResult>> {
    let dir_of = |r: &Resolved| out.join(&r.name).join(format!("seed{seed}"));
    let mut todo: Vec<&&Resolved> = branches.iter().collect();
    todo.sort_by_key(|b| b.branch.as_ref().map_or(0, |(_, at)| *at));
    let mut results = vec![];
    for b in todo {
        let at = b.branch.as_ref().expect("a branch").1;
        let bdir = dir_of(b);
        let bran = RunDir::at(&bdir);
        if !bran.holds_run() {
            let (src_dir, src_run) = (dir_of(src), RunDir::at(dir_of(src)));
            if !src_run.checkpoints()?.contains(&at) {
                if src_run.latest_step()?.is_some_and(|s| s > at) {
                    bail!(
                        "{} is past step {at}, where its branch {} starts, and holds no checkpoint of it: delete {} to train both again",
                        src_dir.display(),
                        b.name,
                        src_dir.display()
                    );
                }
                eprintln!("--- {} seed {seed}: training to step {at}, where branch {} starts", src.name, b.name);
                train_to(src, seed, &src_dir, data_dir, &ev.device, Some(at))?;
            }
            branch::make(&src_run, at, &bran, &run_config(b, seed))?;
            eprintln!("--- branch {} seed {seed}: continues {} from step {at}", b.name, src.name);
        }
        results.push(train_one(b, seed, &bdir, data_dir, ev)?);
    }
    if whole {
        results.push(train_one(src, seed, &dir_of(src), data_dir, ev)?);
    }
    Ok(results)
}

/// Batch-1 decoding speed of `model` (trainable form) and its `merged` copy: the factored form
/// for shared and LORS models (what serves their unique parameters), merged for vanilla ones;
/// median of 3 rounds of 128 tokens (fewer if the context is short) after 16 prompt tokens.
fn decode_speed(model: &Model, merged: Model, mode: Mode, val: &[u32]) -> Result<DecodeSpeed> {
    let ctx = model.cfg.max_seq_len;
    let prompt = 16.min(ctx / 2).max(1);
    let gen = 128.min(ctx - prompt).max(2);
    let ids: Vec<u32> = val.iter().copied().chain(std::iter::repeat(0)).take(prompt).collect();
    let ids = Tensor::from_vec(ids, (1, prompt), &merged.device())?;
    let time = |m: &Model| -> Result<f64> {
        let mut rounds = vec![];
        for _ in 0..3 {
            let t0 = Instant::now();
            let mut marks = vec![];
            generate_batch(m, &ids, gen, |_| marks.push(t0.elapsed().as_secs_f64()))?;
            rounds.push((gen - 1) as f64 / (marks[marks.len() - 1] - marks[0]).max(1e-9));
        }
        rounds.sort_by(f64::total_cmp);
        Ok(rounds[1])
    };
    let merged_tps = time(&merged)?;
    let w = if mode == Mode::Vanilla { Weights::Merged } else { Weights::Factored };
    let bytes = model.weight_bytes(w);
    let (tps, merged_tokens_per_sec) = match w {
        Weights::Merged => (merged_tps, None),
        Weights::Factored => (time(&model.factored()?)?, Some(merged_tps)),
    };
    Ok(DecodeSpeed {
        weights: w.name().into(),
        tokens_per_sec: tps,
        merged_tokens_per_sec,
        prompt_tokens: prompt,
        gen_tokens: gen,
        threads: candle_core::utils::get_num_threads(),
        bytes_read: bytes.read,
        bytes_distinct: bytes.distinct,
    })
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

/// Mean training loss over the last 5 % of a run's steps (at least 10, or all of a shorter
/// run): each batch's loss as it came, before its update. A resumed run may log a step twice;
/// its last line counts. None without training steps.
pub fn final_train_loss(metrics: &[serde_json::Value]) -> Option<f64> {
    let mut by_step = BTreeMap::new();
    for v in step_lines(metrics) {
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            by_step.insert(step, loss);
        }
    }
    let n = (by_step.len() / 20).max(10).min(by_step.len());
    (n > 0).then(|| by_step.values().rev().take(n).sum::<f64>() / n as f64)
}

/// (tokens, val_loss) of the periodic evaluations.
pub fn val_curve(metrics: &[serde_json::Value]) -> Vec<(f64, f64)> {
    metrics.iter().filter_map(|v| Some((v.get("tokens")?.as_f64()?, v.get("val_loss")?.as_f64()?))).collect()
}

/// The commit this binary was built from (recorded by build.rs).
pub fn git_commit() -> String {
    env!("LORS_LM_GIT_COMMIT").to_string()
}

#[cfg(test)]
mod tests {
    use super::final_train_loss;
    use serde_json::json;

    #[test]
    fn final_train_loss_averages_the_last_steps_and_takes_a_resumed_steps_last_line() {
        // 400 steps of loss = step: the last 5 % is 20 steps (381..=400), mean 390.5; evaluation
        // lines (no step time) do not count.
        let mut m: Vec<_> = (1..=400).map(|s| json!({"step": s, "loss": s as f64, "ms": 1.0})).collect();
        m.push(json!({"step": 400, "val_loss": 9.0}));
        assert_eq!(final_train_loss(&m), Some(390.5));
        // A run resumed at step 395 logs 396..=400 again, with other losses: the later lines count.
        m.extend((396..=400).map(|s| json!({"step": s, "loss": 0.0, "ms": 1.0})));
        assert_eq!(final_train_loss(&m), Some((381..=395).sum::<i32>() as f64 / 20.0));
        // Short runs: at least 10 steps, or all of them.
        let m: Vec<_> = (1..=30).map(|s| json!({"step": s, "loss": s as f64, "ms": 1.0})).collect();
        assert_eq!(final_train_loss(&m), Some(25.5));
        assert_eq!(final_train_loss(&m[..4]), Some(2.5));
        assert_eq!(final_train_loss(&[json!({"step": 1, "val_loss": 2.0})]), None);
    }
}
