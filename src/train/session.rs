//! A training session, from a resolved config to a trained run directory: open and check the
//! data, build (or resume) the trainer, and only then write the run directory, print the
//! header and run the loop. `lors-lm train` and `lors-lm sweep` both come through here.
//!
//! Everything that can be refused is refused before anything is written: a `--resume` whose
//! config does not fit the checkpoint, a run directory that holds another run, data that does
//! not match the config leave the run directory as it was.

use crate::config::Config;
use crate::data::{Meta, TokenFile};
use crate::model::{Model, ParamCounts};
use crate::monitor::{Monitor, Paths};
use crate::train::batches::{validation_batches, Source};
use crate::train::distributed::Dist;
use crate::train::fit::{fit, install_ctrlc_handler, DataParallel, FitOptions, FitSummary};
use crate::train::run_dir::RunDir;
use crate::train::trainer::Trainer;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// How a session starts, treats its run directory and reports.
#[derive(Clone, Default)]
pub struct SessionOptions {
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Start afresh over another run (its checkpoints and logs are deleted).
    pub force: bool,
    /// Print only errors and the final summary.
    pub quiet: bool,
    /// Stop after this step, checkpointing it.
    pub stop_at: Option<usize>,
    /// Start a new run from these weights (named as the model names them) instead of a fresh
    /// initialisation; the optimizer and schedule start afresh.
    pub init_weights: Option<HashMap<String, Tensor>>,
    /// Distil from this teacher (train.distill_alpha, train.distill_temperature).
    pub teacher: Option<Model>,
    /// Data-parallel training: this rank's communicator (`distributed::start`); None for a
    /// single process.
    pub dist: Option<Dist>,
}

/// The prepared data of a run, checked against its config.
pub struct RunData {
    pub meta: Meta,
    pub train: TokenFile,
    pub val: TokenFile,
}

/// Open the prepared data in `dir`, fill in `model.vocab_size` when it is 0 and check that
/// both splits fit the config.
pub fn open_data(dir: &Path, cfg: &mut Config) -> Result<RunData> {
    let meta = Meta::load(dir)?;
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = meta.vocab_size;
    } else if cfg.model.vocab_size != meta.vocab_size {
        bail!(
            "model.vocab_size = {} but the data in {} has a vocabulary of {}: set model.vocab_size = 0 to take it from the data",
            cfg.model.vocab_size,
            dir.display(),
            meta.vocab_size
        );
    }
    cfg.data.dir = dir.to_string_lossy().into_owned();
    let train = TokenFile::open(dir, "train", &meta)?;
    let val = TokenFile::open(dir, "val", &meta)?;
    let t = cfg.train.seq_len;
    for (name, f) in [("train", &train), ("val", &val)] {
        if f.len() < t + 1 {
            bail!(
                "{name} split in {} has {} tokens, fewer than one window of train.seq_len + 1 = {}: use more text or a shorter seq_len",
                dir.display(),
                f.len(),
                t + 1
            );
        }
        if f.max_id() as usize >= cfg.model.vocab_size {
            bail!(
                "{name} split holds token id {} >= vocabulary {}: the data is corrupt or from another tokenizer",
                f.max_id(),
                cfg.model.vocab_size
            );
        }
    }
    Ok(RunData { meta, train, val })
}

/// Train `cfg` on the prepared data in `data_dir` into `run` (see the module docs).
pub fn train(cfg: Config, data_dir: &Path, run: &RunDir, device: &Device, opts: &SessionOptions) -> Result<FitSummary> {
    let prepared = prepare(cfg, data_dir, run, device, opts);
    // Data-parallel ranks go on only together: one rank's refusal stops all of them.
    let Prepared { cfg, meta, val_file, val, train_tokens, mut trainer, resumed } = match &opts.dist {
        Some(d) => d.agree(prepared, "starting the run")?,
        None => prepared?,
    };
    let (dist_lines, dist_record) = match &opts.dist {
        Some(d) => {
            let (lines, record) = d.setup(&mut trainer)?;
            (lines, Some(record))
        }
        None => {
            let saved = trainer.state().rank_data_rngs.len() + 1;
            let note = crate::train::distributed::world_change_note(saved, 1).filter(|_| resumed);
            (note.map(|n| format!("resume    {n}")).into_iter().collect(), None)
        }
    };
    let root = opts.dist.as_ref().is_none_or(Dist::is_root);
    // Everything checked: now write (rank 0 alone in a data-parallel run).
    if root {
        if !resumed {
            run.create(opts.force)?;
            run.copy_data_files(data_dir)?;
        }
        run.write_config(&cfg)?;
    }

    let (start, t) = (trainer.state().step, cfg.train.seq_len);
    let paths = Paths { metrics: run.metrics_path(), tensorboard: run.tb_dir(), samples: run.samples_path() };
    let mut monitor = match root {
        true => Monitor::open(paths, start, opts.quiet, cfg.train.log_interval, cfg.train.max_steps)?,
        false => Monitor::silent(paths, cfg.train.log_interval, cfg.train.max_steps),
    };
    let counts = ParamCounts::new(&cfg.model, &cfg.lors);
    if start == 0 {
        monitor.scalar("model/params_unique", counts.total() as f64, 0);
        monitor.scalar("model/params_vanilla_equivalent", counts.vanilla_total as f64, 0);
    }
    print_header(&monitor, &trainer, &counts, run, &meta, (train_tokens, val_file.len()), &dist_lines);
    if let Some(record) = dist_record {
        for key in ["world_size", "tokens_per_step", "allreduce_bytes_per_step"] {
            monitor.scalar(&format!("dist/{key}"), record[key].as_f64().unwrap_or(0.0), start);
        }
        monitor.record(record)?;
    }
    if let Some((peak, _)) = crate::device::peak_tflops(&cfg.train, device) {
        // tokens/s are the whole run's: against the peak of all its devices.
        let devices = opts.dist.as_ref().map_or(1, Dist::size) as f64;
        monitor.set_mfu(ParamCounts::flops_per_token(&cfg.model, t), peak * 1e12 * devices);
    }
    let sampler = match run.tokenizer_path() {
        p if p.is_file() && root => {
            // Samples start from BOS when the tokenizer has one, else from the first val tokens.
            let prompt = match meta.bos_id {
                Some(bos) => vec![bos],
                None => val_file.window(0, 4.min(t))?,
            };
            Some((crate::formats::load_tokenizer(&p)?, prompt))
        }
        _ => None,
    };
    install_ctrlc_handler();
    let started = Instant::now();
    let dist = opts.dist.clone().map(|d| Box::new(d) as Box<dyn DataParallel>);
    let fit_opts = FitOptions { stop_at: opts.stop_at, sampler, dist };
    let summary = fit(&mut trainer, run, &val, &mut monitor, &fit_opts)?;
    let wall = started.elapsed().as_secs_f64();
    let done = summary.final_step - start;
    monitor.summary(&format!(
        "done: {done} steps in {wall:.1}s, mean {:.0} tok/s | final val loss {} | checkpoint {} | metrics {} | tensorboard --logdir {}",
        (done * trainer.tokens_per_step()) as f64 / wall.max(1e-9),
        summary.val_loss.map_or("n/a".into(), |v| format!("{v:.4} (ppl {:.2})", v.exp())),
        summary.checkpoint.as_deref().unwrap_or(&run.checkpoints_dir()).display(),
        monitor.metrics_path().display(),
        monitor.tensorboard_dir().display()
    ));
    if let Some(d) = opts.dist.as_ref().filter(|d| !d.is_root() && summary.stopped_early) {
        crate::train::distributed::eprint_line(&format!(
            "rank {}: stopped with the other ranks at step {} (rank 0 saved the checkpoint)",
            d.rank(),
            summary.final_step
        ));
    }
    Ok(summary)
}

/// A run ready to train: checked data and run directory, the trainer built or resumed.
struct Prepared {
    cfg: Config,
    meta: Meta,
    val_file: TokenFile,
    /// The fixed validation batches.
    val: Vec<(Tensor, Tensor)>,
    train_tokens: usize,
    trainer: Trainer,
    /// Continues a checkpoint (the run directory exists).
    resumed: bool,
}

/// Every check and the trainer, writing nothing.
fn prepare(mut cfg: Config, data_dir: &Path, run: &RunDir, device: &Device, opts: &SessionOptions) -> Result<Prepared> {
    let data = open_data(data_dir, &mut cfg)?;
    let resume_from = match opts.resume {
        true => Some(
            run.checkpoint(None).with_context(|| format!("--resume: nothing to resume in {}", run.path().display()))?,
        ),
        false => {
            run.check_new(opts.force)?;
            None
        }
    };
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let val = validation_batches(&data.val, cfg.train.seed, cfg.train.eval_batches, b, t, device)?;
    let train_tokens = data.train.len();
    let source = Source::tokens(data.train);
    let mut trainer = match (&resume_from, &opts.init_weights) {
        (Some(ckpt), _) => Trainer::resume(cfg.clone(), ckpt, source, device)?,
        (None, Some(weights)) => Trainer::with_weights(cfg.clone(), weights.clone(), source, device)
            .with_context(|| format!("--init-from {}: its weights do not fit the config", cfg.train.init_from))?,
        (None, None) => Trainer::new(cfg.clone(), source, device)?,
    };
    if let Some(teacher) = &opts.teacher {
        trainer.set_teacher(teacher).with_context(|| format!("--teacher {}", cfg.train.teacher))?;
    }
    let resumed = resume_from.is_some();
    Ok(Prepared { cfg, meta: data.meta, val_file: data.val, val, train_tokens, trainer, resumed })
}

/// The resolved config, parameter table, data, device, data-parallel ranks and run directory.
fn print_header(
    monitor: &Monitor,
    trainer: &Trainer,
    counts: &ParamCounts,
    run: &RunDir,
    meta: &Meta,
    (train_tokens, val_tokens): (usize, usize),
    dist_lines: &[String],
) {
    let (cfg, device, start) = (trainer.cfg(), trainer.device(), trainer.state().step);
    let tc = &cfg.train;
    monitor.line(&format!("# resolved config (saved to {})", run.config_path().display()));
    monitor.line(cfg.to_toml().unwrap_or_default().trim_end());
    monitor.line("");
    monitor.line(counts.table().trim_end());
    monitor.line(&format!(
        "data      {} ({train_tokens} train / {val_tokens} val tokens, vocab {})",
        cfg.data.dir, meta.vocab_size
    ));
    let tokens_per_step = trainer.tokens_per_step();
    monitor.line(&format!(
        "device    {}, dtype {}, {tokens_per_step} tokens/step ({}{} × {} × {} accum), {:.2} epochs over the train split, {:.2} tokens per unique parameter",
        crate::device::describe(device),
        tc.dtype,
        match tokens_per_step / (tc.batch_size * tc.seq_len * tc.grad_accum).max(1) {
            1 => String::new(),
            n => format!("{n} ranks × "),
        },
        tc.batch_size,
        tc.seq_len,
        tc.grad_accum,
        (tokens_per_step * tc.max_steps) as f64 / train_tokens.max(1) as f64,
        (tokens_per_step * tc.max_steps) as f64 / counts.total().max(1) as f64,
    ));
    if tc.dtype == "bf16" && device.is_cpu() {
        monitor.line("note      train.dtype = \"bf16\" on the CPU rounds matmul inputs but runs them in f32 (slower than f32); it is meant for CUDA");
    }
    match crate::device::peak_tflops(tc, device) {
        Some((p, src)) => monitor.line(&format!(
            "mfu       {:.3} GFLOP/token (6N + 12·L·d·T) against a peak of {p} TFLOP/s ({src})",
            ParamCounts::flops_per_token(&cfg.model, tc.seq_len) / 1e9
        )),
        None if !device.is_cpu() => monitor.line("mfu       not logged: unknown GPU peak; set train.peak_tflops"),
        None => {}
    }
    for line in dist_lines {
        monitor.line(line);
    }
    monitor.line(&format!("run dir   {}", run.path().display()));
    if start > 0 {
        monitor.line(&format!("resuming  from step {start}"));
    }
}
