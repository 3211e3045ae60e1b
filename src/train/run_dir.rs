//! A run directory, and the one place that knows its layout:
//!
//! ```text
//! RUN_DIR/config.toml                      resolved config of the run
//! RUN_DIR/tokenizer.json, data_meta.json   copied from the prepared data
//! RUN_DIR/metrics.jsonl                    one JSON line per step (train) or eval
//! RUN_DIR/samples.txt                      the samples written at every eval
//! RUN_DIR/tb/                              TensorBoard event files
//! RUN_DIR/checkpoints/<step>/, latest      checkpoints (checkpoint.rs)
//! ```
//!
//! Commands check everything they can before they write: `check_new` refuses a directory that
//! holds another run (without `--force`) and touches nothing, so a refused command leaves the
//! run directory byte-identical; `create` then clears and creates.

use crate::config::Config;
use crate::data::Meta;
use crate::model::{Model, ParamStore};
use crate::train::checkpoint::{self, Checkpoint, Contents};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What commands write into a run directory; `--force` replaces these and nothing else.
const OWNED: &[&str] = &[
    "config.toml",
    "tokenizer.json",
    "data_meta.json",
    "metrics.jsonl",
    "samples.txt",
    "tb",
    "checkpoints",
    "compress.json",
    "result.json",
];
/// The temp files of the atomic writes into a run directory (`files::write_atomic`).
const OWNED_TEMP: &[&str] = &[".config.toml.tmp", ".compress.json.tmp", ".result.json.tmp"];

#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

/// Everything `generate`, `eval` and `export` need from a run directory.
pub struct LoadedRun {
    pub cfg: Config,
    pub step: usize,
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub meta: Option<Meta>,
    /// The checkpoint's parameters, by name (unique parameters: shared bases, factors).
    pub params: HashMap<String, Tensor>,
}

impl RunDir {
    /// The run directory at `path` (nothing is checked or created).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { root: path.into() }
    }

    /// An existing run directory (for generate, eval, export, resume).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let run = Self::at(path);
        if !run.root.is_dir() {
            bail!("run directory {} does not exist (pass --run RUN_DIR of a `lors-lm train` run)", run.root.display());
        }
        Ok(run)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn tokenizer_path(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }
    pub fn data_meta_path(&self) -> PathBuf {
        self.root.join("data_meta.json")
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn samples_path(&self) -> PathBuf {
        self.root.join("samples.txt")
    }
    pub fn tb_dir(&self) -> PathBuf {
        self.root.join("tb")
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Whether the directory holds a run (a config or checkpoints).
    pub fn holds_run(&self) -> bool {
        self.config_path().exists() || self.checkpoints_dir().exists()
    }

    /// The entries of the directory that no command writes into a run directory (sorted):
    /// a directory holding any is not a run's, and no command writes a run into it.
    pub fn foreign_entries(&self) -> Result<Vec<String>> {
        if !self.root.is_dir() {
            return Ok(vec![]);
        }
        let listing = fs::read_dir(&self.root).with_context(|| format!("cannot list {}", self.root.display()))?;
        let mut foreign = vec![];
        for entry in listing {
            let name = entry.with_context(|| format!("cannot list {}", self.root.display()))?.file_name();
            let name = name.to_string_lossy();
            if !OWNED.contains(&name.as_ref()) && !OWNED_TEMP.contains(&name.as_ref()) {
                foreign.push(name.into_owned());
            }
        }
        foreign.sort();
        Ok(foreign)
    }

    /// Refuse to start a new run over another one unless `force`, and refuse outright a
    /// directory that holds anything a run does not own (another run's parent, the working
    /// directory, a data directory): `--force` then replaces only a run's own files. Touches
    /// nothing.
    pub fn check_new(&self, force: bool) -> Result<()> {
        if self.root.exists() && !self.root.is_dir() {
            bail!("{} exists and is not a directory: choose another --out", self.root.display());
        }
        let foreign = self.foreign_entries()?;
        if !foreign.is_empty() {
            let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
            bail!(
                "{} is not a run directory: it holds {} entr{} that no run writes ({}{}). A run goes into a new or empty directory (or, with --force, one that holds only a run): choose another --out; nothing was changed",
                self.root.display(),
                foreign.len(),
                if foreign.len() == 1 { "y" } else { "ies" },
                shown.join(", "),
                if foreign.len() > shown.len() { ", ..." } else { "" }
            );
        }
        if self.holds_run() && !force {
            bail!(
                "{} already holds a run: pass --resume to continue it, --force to start over (deletes its checkpoints), or another --out",
                self.root.display()
            );
        }
        Ok(())
    }

    /// Refuse a run directory that is, or contains, a source the command reads (`flag` names
    /// it): starting over there would delete or overwrite it.
    pub fn check_not_source(&self, source: &Path, flag: &str) -> Result<()> {
        if crate::files::is_within(source, &self.root) {
            bail!(
                "{flag} {} lies in the output directory {}: writing there would replace what is read; choose another output directory",
                source.display(),
                self.root.display()
            );
        }
        Ok(())
    }

    /// Make the directory ready for a new run (after `check_new` and every other check passed):
    /// an earlier run's own files (config, checkpoints, logs, samples, reports) are deleted
    /// when `force`, nothing else.
    pub fn create(&self, force: bool) -> Result<()> {
        self.check_new(force)?;
        for name in OWNED.iter().chain(OWNED_TEMP) {
            let p = self.root.join(name);
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
            } else if p.symlink_metadata().is_ok() {
                fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create run directory {}", self.root.display()))
    }

    /// Write the run's resolved config, atomically (temp file, fsync, rename): a crash leaves
    /// the old file or the new one.
    pub fn write_config(&self, cfg: &Config) -> Result<()> {
        let text = cfg.to_toml()?;
        crate::files::write_atomic(&self.config_path(), |w| w.write_all(text.as_bytes()))
    }

    /// Copy the tokenizer and the data's meta.json from a prepared data directory.
    pub fn copy_data_files(&self, data_dir: &Path) -> Result<()> {
        for (src, dst) in [("tokenizer.json", self.tokenizer_path()), ("meta.json", self.data_meta_path())] {
            let s = data_dir.join(src);
            if s.is_file() {
                fs::copy(&s, &dst).with_context(|| format!("cannot copy {} to {}", s.display(), dst.display()))?;
            }
        }
        Ok(())
    }

    /// Steps of all complete checkpoints, ascending.
    pub fn checkpoints(&self) -> Result<Vec<usize>> {
        checkpoint::list(&self.checkpoints_dir())
    }

    /// The step named by `checkpoints/latest`.
    pub fn latest_step(&self) -> Result<Option<usize>> {
        checkpoint::latest(&self.checkpoints_dir())
    }

    /// The checkpoint of `step` (`--checkpoint STEP`), or the latest, with clear errors.
    pub fn checkpoint(&self, step: Option<usize>) -> Result<Checkpoint> {
        if !self.root.is_dir() {
            bail!("run directory {} does not exist (pass --run RUN_DIR of a `lors-lm train` run)", self.root.display());
        }
        let steps = self.checkpoints()?;
        let step = match step {
            Some(s) => s,
            None => match self.latest_step()? {
                Some(s) => s,
                None => *steps.last().with_context(|| {
                    format!("{} holds no checkpoint yet: train first (checkpoints are written every train.ckpt_interval steps and at the end)", self.root.display())
                })?,
            },
        };
        if !steps.contains(&step) {
            bail!("{} has no checkpoint for step {step}; available: {steps:?}", self.root.display());
        }
        Ok(Checkpoint { step, dir: self.checkpoints_dir().join(step.to_string()) })
    }

    /// Write a checkpoint (atomically) and keep the newest `keep` (0 = all).
    pub fn save_checkpoint(&self, contents: &Contents, keep: usize) -> Result<PathBuf> {
        checkpoint::write(&self.checkpoints_dir(), contents, keep)
    }

    /// The model of the checkpoint at `step` (or the latest) with its config and tokenizer.
    pub fn load(&self, step: Option<usize>, device: &Device) -> Result<LoadedRun> {
        let ckpt = self.checkpoint(step)?;
        let cfg = ckpt.config()?;
        let (model, store) = load_model(&cfg, &ckpt, device)?;
        let tokenizer = crate::formats::load_tokenizer(&self.tokenizer_path())?;
        let meta_path = self.data_meta_path();
        let meta = match meta_path.is_file() {
            true => Some(
                serde_json::from_str(&fs::read_to_string(&meta_path)?)
                    .with_context(|| format!("{} is corrupt", meta_path.display()))?,
            ),
            false => None,
        };
        Ok(LoadedRun { cfg, step: ckpt.step, model, tokenizer, meta, params: store.tensors() })
    }
}

/// Build the model of `cfg` from a checkpoint's parameters, naming the first mismatching tensor.
pub fn load_model(cfg: &Config, ckpt: &Checkpoint, device: &Device) -> Result<(Model, ParamStore)> {
    let mut store = ParamStore::from_tensors(ckpt.params(device)?, DType::F32, device);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)
        .with_context(|| format!("cannot load {} into the run's config", ckpt.dir.display()))?;
    Ok((model, store))
}
