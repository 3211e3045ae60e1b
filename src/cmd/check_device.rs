//! `lors-lm check-device`: the same weights must give the same logits and the same loss after
//! one optimizer step on the CPU (f32, the reference) and on `--device` with the config's
//! `train.dtype`, within that dtype's tolerance. Parameters are always drawn on the CPU from
//! the seed, so both models start bit-identical; the batch is random tokens.

use crate::config::Config;
use crate::model::Model;
use crate::rng::Rng;
use crate::train::{Source, Trainer};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct CheckDeviceArgs {
    /// TOML config ([model], [lors], train.{batch_size, seq_len, dtype, tf32, lr, seed}).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config key (repeatable), e.g. --set train.dtype="bf16".
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Device to check against the CPU: cuda, cuda:N (or cpu, to check a dtype on the CPU).
    #[arg(long)]
    pub device: String,
    /// Vocabulary size when the config says 0.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Largest tolerated relative error for a matmul precision.
pub fn tolerance(dtype: &str, tf32: bool) -> f64 {
    match (dtype, tf32) {
        ("bf16", _) => 3e-2, // 8-bit mantissa: ~0.4 % per rounding, accumulated over layers
        (_, true) => 1e-2,   // TF32: 10-bit mantissa
        _ => 1e-4,           // f32 vs f32: summation order only
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub device: String,
    pub dtype: String,
    pub logits_rel_err: f64,
    pub loss_cpu: f64,
    pub loss_device: f64,
    pub loss_after_step_cpu: f64,
    pub loss_after_step_device: f64,
    pub tolerance: f64,
    pub ok: bool,
}

/// Logits, loss, then loss after one training step (`Trainer::step_on`, no warmup), on
/// `device` with the config's matmul dtype.
fn run_on(cfg: &Config, device: &Device, x: &Tensor, y: &Tensor) -> Result<(Tensor, f64, f64)> {
    let mut cfg = cfg.clone();
    cfg.train.warmup_steps = 0; // the first step at the full learning rate
    let vocab = cfg.model.vocab_size;
    let mut trainer = Trainer::new(cfg, Source::Random { vocab }, device)?;
    let (x, y) = (x.to_device(device)?, y.to_device(device)?);
    let logits = trainer.model().forward(&x)?;
    let l0 = Model::loss(&logits, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    trainer.step_on(&[(x.clone(), y.clone())])?;
    let l1 = trainer.model().forward_loss(&x, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, l0, l1))
}

pub fn check(cfg: &Config, device: &Device, device_name: &str) -> Result<CheckResult> {
    let (b, t) = (cfg.train.batch_size, cfg.train.seq_len);
    let mut rng = Rng::new(7);
    let ids: Vec<u32> = (0..b * (t + 1)).map(|_| rng.below(cfg.model.vocab_size as u64) as u32).collect();
    let all = Tensor::from_vec(ids, (b, t + 1), &Device::Cpu)?;
    let (x, y) = (all.narrow(1, 0, t)?, all.narrow(1, 1, t)?);
    // The reference: f32 on the CPU, TF32 off.
    let mut reference = cfg.clone();
    (reference.train.dtype, reference.train.tf32) = ("f32".into(), false);
    let (ref_logits, ref_l0, ref_l1) = run_on(&reference, &Device::Cpu, &x, &y)?;
    let (dev_logits, dev_l0, dev_l1) = run_on(cfg, device, &x, &y)?;
    let scale = ref_logits.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let diff = (&dev_logits - &ref_logits)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let logits_rel_err = diff / scale.max(f64::MIN_POSITIVE);
    let tol = tolerance(&cfg.train.dtype, cfg.train.tf32);
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(f64::MIN_POSITIVE);
    let ok = logits_rel_err <= tol && rel(dev_l0, ref_l0) <= tol && rel(dev_l1, ref_l1) <= tol && dev_l1.is_finite();
    Ok(CheckResult {
        device: device_name.to_string(),
        dtype: cfg.train.dtype.clone(),
        logits_rel_err,
        loss_cpu: ref_l0,
        loss_device: dev_l0,
        loss_after_step_cpu: ref_l1,
        loss_after_step_device: dev_l1,
        tolerance: tol,
        ok,
    })
}

pub fn run(args: &CheckDeviceArgs) -> Result<()> {
    let mut cfg = Config::load(&args.config, &args.sets)?;
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = args.vocab_size;
    }
    let device = crate::device::parse_device(&args.device)?;
    let name = crate::device::gpu_name(&device).unwrap_or_else(|| args.device.clone());
    let r = check(&cfg, &device, &name)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("device {} vs cpu f32 reference, matmuls in {} (tf32 {})", r.device, r.dtype, cfg.train.tf32);
        println!("  logits: max |Δ| / max |logit| = {:.2e}", r.logits_rel_err);
        println!("  loss:              cpu {:.6}  device {:.6}", r.loss_cpu, r.loss_device);
        println!("  loss after 1 step: cpu {:.6}  device {:.6}", r.loss_after_step_cpu, r.loss_after_step_device);
        println!("  tolerance (relative) {:.0e}: {}", r.tolerance, if r.ok { "OK" } else { "FAILED" });
    }
    if !r.ok {
        bail!("{} disagrees with the CPU beyond the {} tolerance {:.0e}", r.device, r.dtype, r.tolerance);
    }
    Ok(())
}
