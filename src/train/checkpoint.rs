//! Checkpoints: `CHECKPOINTS/<step>/` holds `model.safetensors` (unique parameters only:
//! shared bases and private factors, never merged weights), `optimizer.safetensors`,
//! `state.json` and `config.toml`; `CHECKPOINTS/latest` names the newest complete one.
//!
//! A checkpoint is written into a temporary directory, every file and the directory itself
//! fsynced, then renamed into place; `latest` is replaced (temp file + rename) last. A reader
//! never sees half a checkpoint, and a failed write leaves the previous ones intact.
//! `RunDir` (run_dir.rs) places the checkpoints directory inside a run.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
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
    /// Data-parallel runs: the batch-sampling RNG states of ranks 1.. (rank 0's is
    /// `data_rng`); empty for a single process. Its length + 1 is the world size that wrote it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_data_rngs: Vec<u64>,
}

/// What a checkpoint holds, to be written.
pub struct Contents<'a> {
    pub cfg: &'a Config,
    /// Model parameters by name (unique parameters only).
    pub params: &'a HashMap<String, Tensor>,
    /// Optimizer moments by name.
    pub optimizer: &'a HashMap<String, Tensor>,
    pub state: &'a TrainState,
}

/// One complete checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: usize,
    pub dir: PathBuf,
}

impl Checkpoint {
    /// The model parameters, by name.
    pub fn params(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_tensors(&self.dir.join("model.safetensors"), device)
    }

    /// The optimizer moments, by name (`m.<param>`, `v.<param>`).
    pub fn optimizer(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_tensors(&self.dir.join("optimizer.safetensors"), device)
    }

    pub fn state(&self) -> Result<TrainState> {
        let p = self.dir.join("state.json");
        let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", p.display()))
    }

    /// The config the checkpoint was written with.
    pub fn config(&self) -> Result<Config> {
        Config::load(&self.dir.join("config.toml"), &[])
    }
}

/// Steps of all complete checkpoints in `dir`, ascending.
pub fn list(dir: &Path) -> Result<Vec<usize>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut steps = vec![];
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
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

/// The step named by `dir/latest`.
pub fn latest(dir: &Path) -> Result<Option<usize>> {
    let p = dir.join("latest");
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

/// fsync a directory, so that the entries created or renamed in it are on disk.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Atomically write the checkpoint of `state.step` into `dir`, point `latest` at it, and keep
/// only the newest `keep` checkpoints (0 = keep all).
pub fn write(dir: &Path, contents: &Contents, keep: usize) -> Result<PathBuf> {
    let Contents { cfg, params, optimizer, state } = *contents;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
        // The files' directory entries too, before the rename publishes them.
        sync_dir(&tmp)
    };
    if let Err(e) = write_all() {
        let _ = fs::remove_dir_all(&tmp); // do not leave a partial checkpoint filling the disk
        let previous = latest(dir).ok().flatten().map_or("none".to_string(), |s| format!("step {s}"));
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
    sync_dir(dir)?;
    if keep > 0 {
        let steps = list(dir)?;
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
    read_safetensors(path, device).with_context(|| {
        format!("cannot read {}: the file is truncated or corrupt (use another --checkpoint)", path.display())
    })
}

/// One tensor's entry in a safetensors header.
#[derive(Deserialize)]
struct TensorEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Reads a safetensors file one tensor at a time, so that loading takes the tensors' memory
/// plus the largest one's bytes, not twice the file (as reading it whole first would: the
/// peak RSS of `generate --weights factored` is what it is for). Each tensor's bytes go
/// through safetensors' `TensorView` (which checks them against dtype and shape) and
/// candle's loader.
fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    if n > file_len.saturating_sub(8) || n > 100 << 20 {
        bail!("the header size {n} does not fit the file of {file_len} bytes");
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
    entries.remove("__metadata__");
    let data_start = 8 + n;
    let mut out = HashMap::with_capacity(entries.len());
    for (name, entry) in entries {
        let e: TensorEntry = serde_json::from_value(entry).with_context(|| format!("tensor {name}"))?;
        let (start, end) = e.data_offsets;
        if end < start || data_start.checked_add(end).is_none_or(|e| e > file_len) {
            bail!("tensor {name}: bytes {start}..{end} do not lie within the file's {file_len} bytes");
        }
        let mut buf = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(data_start + start))?;
        f.read_exact(&mut buf)?;
        let view = safetensors::tensor::TensorView::new(e.dtype, e.shape, &buf)
            .map_err(|err| anyhow::anyhow!("tensor {name}: {err:?}"))?;
        out.insert(name, view.load(device)?);
    }
    Ok(out)
}
