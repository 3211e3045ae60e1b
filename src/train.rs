//! `lors-lm train`: a flat, explicit training loop.
//!
//! for step in start+1 ..= max_steps:
//!     lr = lr_at(step)                              (linear warmup, cosine decay to min_lr)
//!     grad_accum × { random windows → forward → loss / grad_accum → backward → add grads }
//!     clip to train.grad_clip (global norm) → AdamW step
//!     log line; eval on fixed val batches every eval_interval; checkpoint every ckpt_interval

use crate::checkpoint::{self, TrainState};
use crate::config::Config;
use crate::console::Console;
use crate::data::{Meta, TokenFile};
use crate::model::Model;
use crate::optim::AdamW;
use crate::params::ParamCounts;
use crate::rng::Rng;
use crate::store::ParamStore;
use crate::tb::Board;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by the Ctrl-C handler: the loop checkpoints, flushes its logs and stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_ctrlc_handler() {
    // A second Ctrl-C exits at once; set_handler fails only if a handler exists already.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to exit at once)");
    });
}

/// Resident memory of this process in MiB (Linux; None elsewhere).
fn rss_mb() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A short sample from the current weights, for the console and TensorBoard.
fn sample_text(model: &Model, tok: &tokenizers::Tokenizer, prompt: &[u32], seed: u64) -> Result<String> {
    let merged = model.merged()?;
    let mut sampler = crate::generate::Sampler::new(0.8, Some(50), None, seed)?;
    let n = 64.min(model.cfg.max_seq_len.saturating_sub(prompt.len())).max(1);
    let out = crate::generate::generate_tokens(&merged, prompt, n, &mut sampler, None, |_| Ok(()), || {})?;
    let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    tok.decode(&all, true).map_err(|e| anyhow::anyhow!("cannot decode a sample: {e}"))
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// TOML config file (see configs/). With --resume it defaults to RUN_DIR/config.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Prepared data directory from `lors-lm prepare` (overrides data.dir).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Run directory for config, checkpoints and logs [default: runs/<config name>].
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start afresh in an --out that holds another run (its checkpoints and logs are deleted).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Print a log line every N steps (overrides train.log_interval).
    #[arg(long, value_name = "N")]
    pub log_interval: Option<usize>,
    /// Stop after this step, checkpointing it, as if interrupted (continue with --resume).
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<usize>,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
}

/// Learning rate at optimizer step `step` (1-based): linear warmup over `warmup_steps`, then
/// cosine decay from `lr` to `min_lr` at `max_steps`.
pub fn lr_at(step: usize, cfg: &crate::config::TrainConfig) -> f64 {
    let (lr, min_lr, warm, max) = (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps);
    if step <= warm {
        return lr * step as f64 / warm.max(1) as f64;
    }
    if step >= max {
        return min_lr;
    }
    let ratio = (step - warm) as f64 / (max - warm) as f64;
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - min_lr)
}

/// Random windows of `seq_len + 1` tokens: inputs (B, T) and targets shifted by one.
pub fn sample_batch(data: &TokenFile, rng: &mut Rng, b: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let max_start = data.len() - (t + 1);
    let starts: Vec<usize> = (0..b).map(|_| rng.below(max_start as u64 + 1) as usize).collect();
    batch_from_starts(data, &starts, t, device)
}

fn batch_from_starts(data: &TokenFile, starts: &[usize], t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let (mut x, mut y) = (Vec::with_capacity(starts.len() * t), Vec::with_capacity(starts.len() * t));
    for &s in starts {
        let w = data.window(s, t + 1)?;
        x.extend_from_slice(&w[..t]);
        y.extend_from_slice(&w[1..]);
    }
    let b = starts.len();
    Ok((Tensor::from_vec(x, (b, t), device)?, Tensor::from_vec(y, (b, t), device)?))
}

/// Mean loss of `model` over fixed batches, without building a graph (the weights are merged
/// and detached first).
pub fn evaluate(model: &Model, batches: &[(Tensor, Tensor)]) -> Result<f64> {
    let frozen = model.merged()?;
    let mut total = 0.0;
    for (x, y) in batches {
        let loss = frozen.forward_loss(x, y)?;
        total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total / batches.len() as f64)
}

/// Global L2 norm of all gradients, with one host sync.
fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum: Option<Tensor> = None;
    for g in grads {
        let s = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
        sum = Some(match sum {
            Some(acc) => (acc + s)?,
            None => s,
        });
    }
    Ok(sum.map_or(Ok(0.0), |s| s.to_scalar::<f64>())?.sqrt())
}

/// Prepare the run directory: refuse to clobber another run unless --force.
fn init_run_dir(out: &Path, force: bool) -> Result<()> {
    let holds_run = out.join("config.toml").exists() || checkpoint::checkpoints_dir(out).exists();
    if holds_run {
        if !force {
            bail!(
                "{} already holds a run: pass --resume to continue it, --force to start over (deletes its checkpoints), or another --out",
                out.display()
            );
        }
        for sub in ["checkpoints", "tb"] {
            let p = out.join(sub);
            if p.exists() {
                fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
            }
        }
        for f in ["config.toml", "metrics.jsonl", "samples.txt"] {
            let p = out.join(f);
            if p.exists() {
                fs::remove_file(&p)?;
            }
        }
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create run directory {}", out.display()))?;
    Ok(())
}

/// Keep only metrics lines of steps <= `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = fs::read_to_string(path)?;
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
    fs::write(path, kept)?;
    Ok(())
}

pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub final_step: usize,
    pub val_loss: Option<f64>,
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    // --- config and run directory ---
    let out = match (&args.out, &args.config) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => PathBuf::from("runs").join(c.file_stem().unwrap_or_default()),
        (None, None) => bail!("pass --config FILE (or --out RUN_DIR with --resume)"),
    };
    let resume_ckpt = if args.resume {
        let (step, dir) = checkpoint::resolve(&out, None)
            .with_context(|| format!("--resume: nothing to resume in {}", out.display()))?;
        Some((step, dir))
    } else {
        None
    };
    let cfg_path = match (&args.config, &resume_ckpt) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => out.join("config.toml"),
        (None, None) => bail!("pass --config FILE"),
    };
    let mut cfg = Config::load(&cfg_path, &args.sets)?;
    if let Some(n) = args.log_interval {
        if n == 0 {
            bail!("--log-interval must be > 0");
        }
        cfg.train.log_interval = n;
    }
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None if !cfg.data.dir.is_empty() => PathBuf::from(&cfg.data.dir),
        None => bail!("no data: pass --data DIR (from `lors-lm prepare`) or set data.dir in the config"),
    };
    cfg.data.dir = data_dir.to_string_lossy().into_owned();

    // --- data ---
    let meta = Meta::load(&data_dir)?;
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = meta.vocab_size;
    } else if cfg.model.vocab_size != meta.vocab_size {
        bail!(
            "model.vocab_size = {} but the data in {} has a vocabulary of {}: set model.vocab_size = 0 to take it from the data",
            cfg.model.vocab_size,
            data_dir.display(),
            meta.vocab_size
        );
    }
    let train_data = TokenFile::open(&data_dir, "train", &meta)?;
    let val_data = TokenFile::open(&data_dir, "val", &meta)?;
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    for (name, f) in [("train", &train_data), ("val", &val_data)] {
        if f.len() < t + 1 {
            bail!(
                "{name} split in {} has {} tokens, fewer than one window of train.seq_len + 1 = {}: use more text or a shorter seq_len",
                data_dir.display(),
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

    let device = crate::device::parse_device(&args.device)?;
    if resume_ckpt.is_none() {
        init_run_dir(&out, args.force)?;
        for (src, dst) in [("tokenizer.json", "tokenizer.json"), ("meta.json", "data_meta.json")] {
            let s = data_dir.join(src);
            if s.is_file() {
                fs::copy(&s, out.join(dst)).with_context(|| format!("cannot copy {}", s.display()))?;
            }
        }
    }
    fs::write(out.join("config.toml"), cfg.to_toml()?)?;

    // --- model and optimizer ---
    let (model, store) = match &resume_ckpt {
        Some((_, dir)) => checkpoint::load_model(&cfg, dir, &device)?,
        None => {
            let mut store = ParamStore::new_init(cfg.train.seed, DType::F32, &device);
            let model = Model::new(&cfg, &mut store)?;
            (model, store)
        }
    };
    let tc = cfg.train.clone();
    // Mixed precision: variables and optimizer state stay f32; matmuls run in train.dtype.
    let model = model.with_matmul_dtype(tc.matmul_dtype());
    crate::device::set_tf32(tc.tf32);
    let peak = crate::device::peak_tflops(&tc, &device);
    let flops_per_token = ParamCounts::flops_per_token(&cfg);
    let mut opt = AdamW::from_config(store.vars(), &cfg)?;
    let mut state =
        TrainState { step: 0, data_rng: Rng::new(tc.seed).fork(1).state, opt_t: 0, tokens_seen: 0, val_loss: None };
    if let Some((_, dir)) = &resume_ckpt {
        state = checkpoint::load_state(dir)?;
        opt.load_state(checkpoint::load_optimizer(dir, &device)?, state.opt_t)?;
    }
    let metrics_path = out.join("metrics.jsonl");
    truncate_metrics(&metrics_path, state.step)?;
    let mut metrics = fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;

    // Fixed validation batches: the same for every eval and every resume.
    let mut val_rng = Rng::new(tc.seed).fork(2);
    let val_batches = (0..tc.eval_batches)
        .map(|_| sample_batch(&val_data, &mut val_rng, b, t, &device))
        .collect::<Result<Vec<_>>>()?;

    let counts = ParamCounts::from_config(&cfg);
    let mut board = Board::open(&out.join("tb"), resume_ckpt.as_ref().map(|(s, _)| *s))?;
    if resume_ckpt.is_none() {
        board.scalar("model/params_unique", counts.total() as f64, 0);
        board.scalar("model/params_vanilla_equivalent", counts.vanilla_total as f64, 0);
    }
    let tokenizer = match out.join("tokenizer.json") {
        p if p.is_file() => Some(crate::data::load_tokenizer(&p)?),
        _ => None,
    };
    // Samples start from BOS when the tokenizer has one, else from the first val tokens.
    let sample_prompt: Vec<u32> = match meta.bos_id {
        Some(b) => vec![b],
        None => val_data.window(0, 4.min(t))?,
    };
    install_ctrlc_handler();
    let mut console = Console::new(args.quiet);
    console.line(&format!("# resolved config (saved to {})", out.join("config.toml").display()));
    console.line(cfg.to_toml()?.trim_end());
    console.line("");
    console.line(counts.table().trim_end());
    console.line(&format!(
        "data      {} ({} train / {} val tokens, vocab {})",
        data_dir.display(),
        train_data.len(),
        val_data.len(),
        meta.vocab_size
    ));
    let tokens_per_step = b * t * tc.grad_accum;
    console.line(&format!(
        "device    {}, dtype {}, {tokens_per_step} tokens/step ({b} × {t} × {} accum), {} epochs over the train split",
        device_name(&device),
        tc.dtype,
        tc.grad_accum,
        fmt_epochs(tokens_per_step, tc.max_steps, train_data.len())
    ));
    if tc.dtype == "bf16" && device.is_cpu() {
        console.line("note      train.dtype = \"bf16\" on the CPU rounds matmul inputs but runs them in f32 (slower than f32); it is meant for CUDA");
    }
    match &peak {
        Some((p, src)) => console.line(&format!(
            "mfu       {:.3} GFLOP/token (6N + 12·L·d·T) against a peak of {p} TFLOP/s ({src})",
            flops_per_token / 1e9
        )),
        None if !device.is_cpu() => console.line("mfu       not logged: unknown GPU peak; set train.peak_tflops"),
        None => {}
    }
    console.line(&format!("run dir   {}", out.display()));
    if let Some((s, _)) = &resume_ckpt {
        console.line(&format!("resuming  from step {s}"));
    }

    // --- the loop ---
    let mut data_rng = Rng { state: state.data_rng };
    let params = opt.params().to_vec();
    let run_start = Instant::now();
    let mut last_val = state.val_loss;
    let mut last_ckpt: Option<PathBuf> =
        checkpoint::latest_step(&out)?.map(|s| checkpoint::checkpoints_dir(&out).join(s.to_string()));
    let mut bad_steps = 0usize;
    let start_step = state.step;
    let mut end_step = tc.max_steps.max(start_step);
    console.start_progress(start_step, tc.max_steps);
    for step in start_step + 1..=tc.max_steps {
        let t0 = Instant::now();
        let lr = lr_at(step, &tc);
        let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0.0;
        for _ in 0..tc.grad_accum {
            let (x, y) = sample_batch(&train_data, &mut data_rng, b, t, &device)?;
            let loss = model.forward_loss(&x, &y)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let loss = if tc.grad_accum > 1 { (loss / tc.grad_accum as f64)? } else { loss };
            let grads = loss.backward()?;
            for (slot, (name, var)) in acc.iter_mut().zip(&params) {
                let g = grads.get(var.as_tensor()).with_context(|| format!("parameter {name} received no gradient"))?;
                *slot = Some(match slot.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        let loss = loss_sum / tc.grad_accum as f64;
        let mut grads: Vec<Tensor> = acc.into_iter().map(|g| g.expect("filled above")).collect();
        let grad_norm = global_norm(&grads)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            // Skip the update; stop after too many bad steps in a row.
            bad_steps += 1;
            console.summary(&format!(
                "step {step}: non-finite loss {loss} / grad norm {grad_norm}: update skipped ({bad_steps} in a row, limit train.max_bad_steps = {})",
                tc.max_bad_steps
            ));
            if bad_steps > tc.max_bad_steps {
                bail!(
                    "{bad_steps} consecutive steps with a non-finite loss or gradient (last at step {step}): lower train.lr or raise train.warmup_steps; the last checkpoint ({}) is intact",
                    last_ckpt.as_deref().map_or("none yet".into(), |p| p.display().to_string())
                );
            }
        } else {
            bad_steps = 0;
            if tc.grad_clip > 0.0 && grad_norm > tc.grad_clip {
                let scale = tc.grad_clip / (grad_norm + 1e-6);
                grads = grads.iter().map(|g| g * scale).collect::<candle_core::Result<Vec<_>>>()?;
            }
            opt.step(&grads, lr)?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        state.tokens_seen += tokens_per_step as u64;
        let tok_s = tokens_per_step as f64 / (ms / 1e3);
        let mfu = peak.as_ref().map(|(p, _)| flops_per_token * tok_s / (p * 1e12));
        let mut line = serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens_seen, "ms": ms, "tokens_per_sec": tok_s});
        if let Some(m) = mfu {
            line["mfu"] = m.into();
            board.scalar("train/mfu", m, step);
        }
        log_metrics(&mut metrics, &metrics_path, line)?;
        board.scalar("train/loss", loss, step);
        board.scalar("train/lr", lr, step);
        board.scalar("train/grad_norm", grad_norm, step);
        board.scalar("train/tokens_per_sec", tok_s, step);
        board.scalar("train/step_ms", ms, step);
        console.progress(step, loss, tok_s);
        if step.is_multiple_of(tc.log_interval) || step == tc.max_steps || step == start_step + 1 {
            if let Some(rss) = rss_mb() {
                board.scalar("sys/rss_mb", rss, step);
            }
            console.line(&format!(
                "step {step:>6}/{} | loss {loss:.4} | lr {lr:.2e} | grad {grad_norm:.3} | {tok_s:>8.0} tok/s | {ms:>7.1} ms{}",
                tc.max_steps,
                mfu.map_or(String::new(), |m| format!(" | mfu {:.1}%", 100.0 * m))
            ));
        }
        if step.is_multiple_of(tc.eval_interval) || step == tc.max_steps {
            let vl = evaluate(&model, &val_batches)?;
            last_val = Some(vl);
            log_metrics(
                &mut metrics,
                &metrics_path,
                serde_json::json!({"step": step, "val_loss": vl, "val_ppl": vl.exp(), "tokens": state.tokens_seen}),
            )?;
            console.line(&format!("eval  {step:>6} | val loss {vl:.4} | val ppl {:.2}", vl.exp()));
            board.scalar("val/loss", vl, step);
            board.scalar("val/ppl", vl.exp(), step);
            for (layer, proj, ratio) in model.residual_ratios()? {
                board.scalar(&format!("lors/{proj}/layer_{layer:02}"), ratio as f64, step);
            }
            if let Some(tok) = &tokenizer {
                let text = sample_text(&model, tok, &sample_prompt, tc.seed ^ step as u64)?;
                board.text("samples", &text, step);
                let mut f = fs::OpenOptions::new().create(true).append(true).open(out.join("samples.txt"))?;
                writeln!(f, "--- step {step}\n{text}")?;
                let first_line: String = text.chars().take(100).map(|c| if c == '\n' { ' ' } else { c }).collect();
                console.line(&format!("sample    {first_line}"));
            }
            board.flush();
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        let stop_here = args.stop_at == Some(step) || interrupted;
        if (tc.ckpt_interval > 0 && step.is_multiple_of(tc.ckpt_interval)) || step == tc.max_steps || stop_here {
            state.step = step;
            state.data_rng = data_rng.state;
            state.opt_t = opt.t;
            state.val_loss = last_val;
            metrics.flush()?;
            let dir =
                checkpoint::save(&out, &cfg, &store.tensors(), &opt.state_tensors(), &state, tc.keep_checkpoints)?;
            last_ckpt = Some(dir.clone());
            console.line(&format!("saved {}", dir.display()));
        }
        if stop_here {
            let why = if interrupted { "interrupted" } else { "--stop-at" };
            console.summary(&format!("stopped at step {step} ({why}); continue with --resume --out {}", out.display()));
            end_step = step;
            break;
        }
    }
    metrics.flush()?;
    board.flush();
    console.finish();
    let wall = run_start.elapsed().as_secs_f64();
    let done = end_step.saturating_sub(start_step);
    console.summary(&format!(
        "done: {done} steps in {wall:.1}s, mean {:.0} tok/s | final val loss {} | checkpoint {} | metrics {} | tensorboard --logdir {}",
        (done * tokens_per_step) as f64 / wall.max(1e-9),
        last_val.map_or("n/a".into(), |v| format!("{v:.4} (ppl {:.2})", v.exp())),
        last_ckpt.as_deref().unwrap_or(&checkpoint::checkpoints_dir(&out)).display(),
        metrics_path.display(),
        board.dir().display()
    ));
    Ok(TrainSummary { run_dir: out, final_step: end_step, val_loss: last_val })
}

/// Append one JSON line to metrics.jsonl.
fn log_metrics(file: &mut fs::File, path: &Path, line: serde_json::Value) -> Result<()> {
    writeln!(file, "{line}").with_context(|| {
        format!(
            "cannot append to {} (disk full or not writable?); checkpoints already written are intact",
            path.display()
        )
    })
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!(
            "cpu ({} threads, matmul: {})",
            candle_core::utils::get_num_threads(),
            crate::device::cpu_matmul().unwrap_or_else(|e| e.to_string())
        ),
        other => format!("{other:?}"),
    }
}

fn fmt_epochs(tokens_per_step: usize, steps: usize, train_tokens: usize) -> String {
    format!("{:.2}", (tokens_per_step * steps) as f64 / train_tokens.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;

    #[test]
    fn lr_schedule_warms_up_then_decays_to_min() {
        let c = TrainConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 10, max_steps: 110, ..Default::default() };
        assert!((lr_at(1, &c) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, &c) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, &c) - 0.55).abs() < 1e-12); // halfway down the cosine
        assert!((lr_at(110, &c) - 0.1).abs() < 1e-12);
        assert!(lr_at(30, &c) > lr_at(31, &c));
    }
}
