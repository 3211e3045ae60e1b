//! Where a command's model comes from: a lors-lm run directory, a Hugging Face Llama
//! directory, `hf:OWNER/NAME` through the Hugging Face cache, or a GGUF file (`--from`,
//! `--teacher`, `--init-from`).

use crate::config::Config;
use crate::data::Meta;
use crate::formats::{gguf, hf};
use crate::model::Model;
use crate::train::RunDir;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What kind of source a model was loaded from.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A lors-lm run directory, at a checkpoint step.
    Run { dir: PathBuf, step: usize },
    /// A Hugging Face Llama directory (possibly inside the Hub cache).
    Hf { dir: PathBuf },
    /// A GGUF file (llama.cpp's format), dequantized to f32.
    Gguf { path: PathBuf },
}

/// A model ready to use, with what came with it.
pub struct Loaded {
    pub kind: Kind,
    pub cfg: Config,
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    /// The prepared data's meta.json of a run (vocabulary, BOS/EOS ids).
    pub meta: Option<Meta>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// The model's own parameters, by name: a run's unique parameters (shared bases and
    /// factors), a Hugging Face model's weights under our vanilla names.
    pub params: HashMap<String, Tensor>,
}

impl Loaded {
    /// The source as the user would name it again.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Run { dir, step } => format!("{} (run, step {step})", dir.display()),
            Kind::Hf { dir } => format!("{} (Hugging Face Llama)", dir.display()),
            Kind::Gguf { path } => format!("{} (GGUF)", path.display()),
        }
    }
}

/// Load the model named by `spec`: a run directory (its checkpoint `step`, default the
/// latest), a Hugging Face Llama directory, `hf:OWNER/NAME`, or a GGUF file (a path ending in
/// `.gguf`, or any file that starts with the GGUF magic). `flag` names the option in errors.
pub fn load(spec: &str, step: Option<usize>, device: &Device, flag: &str) -> Result<Loaded> {
    let path = Path::new(spec);
    if gguf::names_gguf(path) {
        if step.is_some() {
            bail!("{flag} {spec}: --checkpoint applies to run directories only");
        }
        if !path.is_file() {
            bail!("{flag} {spec}: no such file");
        }
        let g = gguf::load_gguf(path, device)?;
        let params = g.model.merged_tensors()?.into_iter().collect();
        let kind = Kind::Gguf { path: path.to_path_buf() };
        let (cfg, model, tokenizer, bos, eos) = (g.cfg, g.model, g.tokenizer, g.bos, g.eos);
        return Ok(Loaded { kind, cfg, model, tokenizer, meta: None, bos, eos, params });
    }
    if spec.starts_with("hf:") || path.join("config.json").is_file() {
        if step.is_some() {
            bail!("{flag} {spec}: --checkpoint applies to run directories only");
        }
        let dir = hf::resolve_hf(spec)?;
        let (cfg, model, tokenizer, hf_cfg) = hf::load_hf_dir(&dir, device)?;
        let bos = hf::token_ids(&hf_cfg, "bos_token_id").first().copied();
        let eos = hf::token_ids(&hf_cfg, "eos_token_id");
        let params = model.merged_tensors()?.into_iter().collect();
        return Ok(Loaded { kind: Kind::Hf { dir }, cfg, model, tokenizer, meta: None, bos, eos, params });
    }
    if path.is_dir() {
        let run = RunDir::open(path)?;
        if !run.holds_run() {
            bail!("{flag} {spec}: neither a lors-lm run directory (config.toml, checkpoints/) nor a Hugging Face Llama directory (config.json)");
        }
        let loaded = run.load(step, device)?;
        let bos = loaded.meta.as_ref().and_then(|m| m.bos_id);
        let eos = loaded.meta.as_ref().and_then(|m| m.eos_id).into_iter().collect();
        let kind = Kind::Run { dir: path.to_path_buf(), step: loaded.step };
        let (cfg, model, tokenizer, meta, params) =
            (loaded.cfg, loaded.model, loaded.tokenizer, loaded.meta, loaded.params);
        return Ok(Loaded { kind, cfg, model, tokenizer, meta, bos, eos, params });
    }
    if path.is_file() {
        bail!("{flag} {spec}: a file, but not a GGUF file (expected a lors-lm run directory, a Hugging Face Llama directory, hf:OWNER/NAME, or a .gguf file)");
    }
    bail!("{flag} {spec}: no such directory (expected a lors-lm run directory, a Hugging Face Llama directory, hf:OWNER/NAME, or a .gguf file)")
}
