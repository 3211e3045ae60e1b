//! The training loop: flat and explicit.
//!
//! ```text
//! for step in start+1 ..= max_steps:
//!     trainer.step()                                 (trainer.rs)
//!     report it                                      (metrics, TensorBoard, console)
//!     every eval_interval: evaluate on the fixed validation batches, sample, report
//!     every ckpt_interval (and at the end, --stop-at or Ctrl-C): checkpoint
//! ```
//!
//! A data-parallel run (`FitOptions::dist`) adds one hook at each of these points, the
//! [`DataParallel`] trait (implemented by `distributed::Dist`, as the trainer's `GradSync` is
//! by its gradient all-reduce): the ranks agree on stopping after every step, evaluate sharded
//! and compare weight checksums at every eval, and checkpoint through rank 0.

use crate::infer::generate::{generate_tokens, Sampler};
use crate::model::Model;
use crate::monitor::{Monitor, StepReport};
use crate::train::run_dir::RunDir;
use crate::train::trainer::Trainer;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the Ctrl-C handler: the loop checkpoints, flushes its logs and stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ask the loop to stop after the current step, with a checkpoint, as Ctrl-C does (only stores
/// to an atomic flag: callable from a signal handler).
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C finishes the current step, checkpoints and stops; a second Ctrl-C exits at once.
pub fn install_ctrlc_handler() {
    // set_handler fails only if a handler exists already (a second run in this process).
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to exit at once)");
    });
}

/// What a data-parallel run adds to the loop, at each point where its ranks must act
/// together (every rank calls each method at the same step).
pub trait DataParallel {
    /// Ranks in the run.
    fn size(&self) -> usize;
    /// Whether this rank reports (rank 0): it alone samples text at an evaluation.
    fn is_root(&self) -> bool;
    /// The validation loss on `val`, sharded over the ranks (as `Trainer::evaluate` over all
    /// of them in one process); recorded as the run's last validation loss.
    fn evaluate(&self, trainer: &mut Trainer, val: &[(Tensor, Tensor)], step: usize) -> Result<f64>;
    /// The checksum of this rank's weights, after checking that every rank's is the same.
    fn check_weights(&self, trainer: &Trainer, step: usize) -> Result<u64>;
    /// Whether any rank was asked to stop after `step` (`mine`: this one was).
    fn stop(&self, mine: bool, step: usize) -> Result<bool>;
    /// Checkpoint the current step through rank 0; returns the checkpoint's directory.
    fn save(&self, trainer: &mut Trainer, run: &RunDir) -> Result<PathBuf>;
}

/// What `fit` needs besides the trainer.
pub struct FitOptions {
    /// Stop after this step, checkpointing it, as if interrupted.
    pub stop_at: Option<usize>,
    /// Samples at every eval: the tokenizer and the prompt to continue.
    pub sampler: Option<(tokenizers::Tokenizer, Vec<u32>)>,
    /// Data-parallel training: this rank's part in it (None: a single process).
    pub dist: Option<Box<dyn DataParallel>>,
}

pub struct FitSummary {
    /// The last step taken.
    pub final_step: usize,
    /// The last validation loss (on the fixed batches).
    pub val_loss: Option<f64>,
    /// The newest checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// Whether training stopped before train.max_steps (--stop-at or Ctrl-C).
    pub stopped_early: bool,
}

/// Train until `train.max_steps` (or --stop-at, or Ctrl-C), evaluating on `val` and
/// checkpointing into `run` as the config says.
pub fn fit(
    trainer: &mut Trainer,
    run: &RunDir,
    val: &[(Tensor, Tensor)],
    monitor: &mut Monitor,
    opts: &FitOptions,
) -> Result<FitSummary> {
    let tc = trainer.cfg().train.clone();
    let start = trainer.state().step;
    let mut checkpoint = run.latest_step()?.map(|s| run.checkpoints_dir().join(s.to_string()));
    let mut stopped_early = false;
    monitor.start(start);
    for _ in start + 1..=tc.max_steps {
        let s = trainer.step().with_context(|| {
            let last = checkpoint.as_deref().map_or("none yet".into(), |p| p.display().to_string());
            format!("training stopped; the last checkpoint ({last}) is intact")
        })?;
        let step = s.step;
        if s.skipped {
            monitor.summary(&format!(
                "step {step}: non-finite loss {} / grad norm {}: update skipped ({} in a row, limit train.max_bad_steps = {})",
                s.loss, s.grad_norm, s.bad_steps, tc.max_bad_steps
            ));
        }
        let tokens_seen = trainer.state().tokens_seen;
        let (loss, lr, grad_norm, tokens, ms, ce, kl) = (s.loss, s.lr, s.grad_norm, s.tokens, s.ms, s.ce, s.kl);
        let allreduce_ms = opts.dist.as_ref().map(|_| s.sync_ms);
        monitor.step(&StepReport { step, loss, lr, grad_norm, tokens_seen, tokens, ms, ce, kl, allreduce_ms })?;
        if step.is_multiple_of(tc.eval_interval) || step == tc.max_steps {
            let val_loss = match &opts.dist {
                Some(d) => d.evaluate(trainer, val, step)?,
                None => trainer.evaluate(val)?,
            };
            let sample = match (&opts.sampler, opts.dist.as_ref().is_none_or(|d| d.is_root())) {
                (Some((tok, prompt)), true) => Some(sample_text(trainer.model(), tok, prompt, tc.seed ^ step as u64)?),
                _ => None,
            };
            monitor.eval(step, tokens_seen, val_loss, &trainer.model().residual_ratios()?, sample.as_deref())?;
            if let Some(d) = &opts.dist {
                monitor.weights_check(step, d.check_weights(trainer, step)?, d.size())?;
            }
        }
        let interrupted = match (INTERRUPTED.load(Ordering::SeqCst), &opts.dist) {
            (mine, Some(d)) => d.stop(mine, step)?,
            (mine, None) => mine,
        };
        stopped_early = opts.stop_at == Some(step) || interrupted;
        if (tc.ckpt_interval > 0 && step.is_multiple_of(tc.ckpt_interval)) || step == tc.max_steps || stopped_early {
            monitor.flush()?;
            let dir = match &opts.dist {
                Some(d) => d.save(trainer, run)?,
                None => trainer.save(run)?,
            };
            monitor.line(&format!("saved {}", dir.display()));
            checkpoint = Some(dir);
        }
        if stopped_early {
            let why = if interrupted { "interrupted" } else { "--stop-at" };
            monitor.summary(&format!(
                "stopped at step {step} ({why}); continue with --resume --out {}",
                run.path().display()
            ));
            break;
        }
    }
    monitor.finish()?;
    let state = trainer.state();
    Ok(FitSummary { final_step: state.step, val_loss: state.val_loss, checkpoint, stopped_early })
}

/// A short sample from the current weights (64 tokens at temperature 0.8, top-k 50).
fn sample_text(model: &Model, tok: &tokenizers::Tokenizer, prompt: &[u32], seed: u64) -> Result<String> {
    let merged = model.merged()?;
    let mut sampler = Sampler::new(0.8, Some(50), None, seed)?;
    let n = 64.min(model.cfg.max_seq_len.saturating_sub(prompt.len())).max(1);
    let out = generate_tokens(&merged, prompt, n, &mut sampler, &[], |_| Ok(()), || {})?;
    let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    tok.decode(&all, true).map_err(|e| anyhow::anyhow!("cannot decode a sample: {e}"))
}
