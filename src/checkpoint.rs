//! Run directories and checkpoints.
//!
//! ```text
//! RUN_DIR/config.toml                 resolved config of the run
//! RUN_DIR/tokenizer.json, data_meta.json   copied from the prepared data
//! RUN_DIR/metrics.jsonl               one JSON line per step (train) or eval
//! RUN_DIR/checkpoints/<step>/         model.safetensors  (unique parameters only:
//!                                     shared bases + private factors, never merged weights)
//!                                     optimizer.safetensors, state.json, config.toml
//! RUN_DIR/checkpoints/latest          the step of the newest complete checkpoint
//! ```
//! A checkpoint is written into a temporary directory, every file fsynced, then renamed into
//! place; `latest` is replaced (temp file + rename) last. A reader never sees half a checkpoint.

use crate::config::Config;
use crate::model::Model;
use crate::store::ParamStore;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Training state stored beside the weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Batch-sampling RNG state after `step` steps.
    pub data_rng: u64,
    /// Optimizer update count.
    pub opt_t: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Last validation loss, if any.
    pub val_loss: Option<f64>,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Steps of all complete checkpoints, ascending.
pub fn list_checkpoints(run: &Path) -> Result<Vec<usize>> {
    let dir = checkpoints_dir(run);
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut steps = vec![];
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        if let Some(step) = entry.file_name().to_str().and_then(|s| s.parse::<usize>().ok()) {
            if entry.path().join("state.json").is_file() {
                steps.push(step);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// The step named by `checkpoints/latest`.
pub fn latest_step(run: &Path) -> Result<Option<usize>> {
    let p = checkpoints_dir(run).join("latest");
    if !p.is_file() {
        return Ok(None);
    }
    let s = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let step = s
        .trim()
        .parse::<usize>()
        .with_context(|| format!("{} does not hold a step number: the run directory is damaged", p.display()))?;
    Ok(Some(step))
}

/// Resolve `--checkpoint STEP` (or the latest) to a checkpoint directory, with clear errors.
pub fn resolve(run: &Path, step: Option<usize>) -> Result<(usize, PathBuf)> {
    if !run.is_dir() {
        bail!("run directory {} does not exist (pass --run RUN_DIR of a `lors-lm train` run)", run.display());
    }
    let steps = list_checkpoints(run)?;
    let step = match step {
        Some(s) => s,
        None => match latest_step(run)? {
            Some(s) => s,
            None => *steps.last().with_context(|| {
                format!("{} holds no checkpoint yet: train first (checkpoints are written every train.ckpt_interval steps and at the end)", run.display())
            })?,
        },
    };
    if !steps.contains(&step) {
        bail!("{} has no checkpoint for step {step}; available: {steps:?}", run.display());
    }
    Ok((step, checkpoints_dir(run).join(step.to_string())))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path).with_context(|| format!("cannot write {}", path.display()))?;
    fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// Atomically write a checkpoint for `state.step`, point `latest` at it, and keep only the
/// newest `keep` checkpoints (0 = keep all).
pub fn save(
    run: &Path,
    cfg: &Config,
    params: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let final_dir = dir.join(state.step.to_string());
    let tmp = dir.join(format!(".tmp-{}", state.step));
    let write_all = || -> Result<()> {
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        save_tensors(&tmp.join("model.safetensors"), params)?;
        save_tensors(&tmp.join("optimizer.safetensors"), optimizer)?;
        write_synced(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        write_synced(&tmp.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        Ok(())
    };
    if let Err(e) = write_all() {
        let _ = fs::remove_dir_all(&tmp); // do not leave a partial checkpoint filling the disk
        let previous = latest_step(run).ok().flatten().map_or("none".to_string(), |s| format!("step {s}"));
        return Err(e.context(format!(
            "cannot write the checkpoint of step {} into {} (disk full or not writable?); the previous checkpoint ({previous}) is intact",
            state.step,
            dir.display()
        )));
    }
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)?;
    }
    fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    let latest_tmp = dir.join(".latest.tmp");
    write_synced(&latest_tmp, state.step.to_string().as_bytes())?;
    fs::rename(&latest_tmp, dir.join("latest"))?;
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    if keep > 0 {
        let steps = list_checkpoints(run)?;
        for old in steps.iter().take(steps.len().saturating_sub(keep)) {
            fs::remove_dir_all(dir.join(old.to_string()))?;
        }
    }
    Ok(final_dir)
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        bail!("checkpoint file {} is missing", path.display());
    }
    candle_core::safetensors::load(path, device).with_context(|| {
        format!("cannot read {}: the file is truncated or corrupt (use another --checkpoint)", path.display())
    })
}

pub fn load_state(ckpt: &Path) -> Result<TrainState> {
    let p = ckpt.join("state.json");
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))
}

/// Parameters of a checkpoint, as named tensors.
pub fn load_params(ckpt: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_tensors(&ckpt.join("model.safetensors"), device)
}

pub fn load_optimizer(ckpt: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_tensors(&ckpt.join("optimizer.safetensors"), device)
}

/// Build a model from a checkpoint for `cfg`, naming the first mismatching tensor.
pub fn load_model(cfg: &Config, ckpt: &Path, device: &Device) -> Result<(Model, ParamStore)> {
    let tensors = load_params(ckpt, device)?;
    let mut store = ParamStore::from_tensors(tensors, DType::F32, device);
    let model =
        Model::new(cfg, &mut store).with_context(|| format!("cannot load {} into the run's config", ckpt.display()))?;
    Ok((model, store))
}

/// Everything `generate` (and later eval/export) needs from a run directory.
pub struct LoadedRun {
    pub cfg: Config,
    pub step: usize,
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub meta: Option<crate::data::Meta>,
}

pub fn load_run(run: &Path, step: Option<usize>, device: &Device) -> Result<LoadedRun> {
    let (step, ckpt) = resolve(run, step)?;
    let cfg_path = ckpt.join("config.toml");
    let cfg = Config::load(&cfg_path, &[])?;
    let (model, _) = load_model(&cfg, &ckpt, device)?;
    let tokenizer = crate::data::load_tokenizer(&run.join("tokenizer.json"))?;
    let meta_path = run.join("data_meta.json");
    let meta = if meta_path.is_file() {
        Some(
            serde_json::from_str(&fs::read_to_string(&meta_path)?)
                .with_context(|| format!("{} is corrupt", meta_path.display()))?,
        )
    } else {
        None
    };
    Ok(LoadedRun { cfg, step, model, tokenizer, meta })
}
