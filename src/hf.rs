//! The Hugging Face Llama format, both ways.
//!
//! * `lors-lm export --format hf-llama`: a trained run → a plain `LlamaForCausalLM` directory
//!   (LORS weights merged, `W_l = W_shared + B_l A_l`) that transformers, llama.cpp's
//!   converters and candle's own llama load without any lors-lm code.
//! * `load_hf_dir`: a local HF Llama directory (or `hf:OWNER/NAME` through hf-hub's cache) →
//!   a vanilla lors-lm model, so `generate --hf` runs models lors-lm did not train.

use crate::checkpoint;
use crate::config::{Config, LorsConfig, Mode, ModelConfig};
use crate::model::{name_from_hf, Model};
use crate::store::ParamStore;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Run directory written by `lors-lm train`.
    #[arg(long, value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// Checkpoint step to export [default: the latest].
    #[arg(long, value_name = "STEP")]
    pub checkpoint: Option<usize>,
    /// Output format (only hf-llama: a Hugging Face LlamaForCausalLM directory).
    #[arg(long, default_value = "hf-llama", value_parser = ["hf-llama"])]
    pub format: String,
    /// Output directory (refused if it exists and is not empty, unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Weight dtype in model.safetensors.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// Write into a non-empty --out (files of the same name are replaced).
    #[arg(long)]
    pub force: bool,
}

fn parse_dtype(s: &str) -> Result<(DType, &'static str)> {
    Ok(match s {
        "f32" => (DType::F32, "float32"),
        "bf16" => (DType::BF16, "bfloat16"),
        "f16" => (DType::F16, "float16"),
        other => bail!("--dtype {other}: use f32, bf16 or f16"),
    })
}

/// The HF `config.json` of a model config.
pub fn hf_config(m: &ModelConfig, torch_dtype: &str, bos: Option<u32>, eos: Option<u32>) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": null,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos,
        "eos_token_id": eos,
    })
}

/// Write the merged model, as `model.safetensors` with `{"format": "pt"}` metadata (which
/// transformers requires), in `dtype`.
pub fn write_safetensors(model: &Model, path: &Path, dtype: DType) -> Result<u64> {
    let tensors = model
        .hf_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)?;
    Ok(fs::metadata(path)?.len())
}

pub fn run_export(args: &ExportArgs) -> Result<()> {
    let (dtype, torch_dtype) = parse_dtype(&args.dtype)?;
    if args.out.exists() {
        let non_empty = fs::read_dir(&args.out)
            .with_context(|| format!("--out {} exists but is not a readable directory", args.out.display()))?
            .next()
            .is_some();
        if non_empty && !args.force {
            bail!(
                "--out {} is not empty: pass --force to write into it, or choose another directory",
                args.out.display()
            );
        }
    }
    let loaded = checkpoint::load_run(&args.run, args.checkpoint, &Device::Cpu)?;
    fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let m = &loaded.cfg.model;
    let (bos, eos) = (loaded.meta.as_ref().and_then(|x| x.bos_id), loaded.meta.as_ref().and_then(|x| x.eos_id));
    let size = write_safetensors(&loaded.model, &args.out.join("model.safetensors"), dtype)?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        fs::write(args.out.join(name), serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("cannot write {}", args.out.join(name).display()))
    };
    write_json("config.json", &hf_config(m, torch_dtype, bos, eos))?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": bos, "eos_token_id": eos, "do_sample": true, "temperature": 0.8, "top_k": 50}),
    )?;
    fs::copy(args.run.join("tokenizer.json"), args.out.join("tokenizer.json"))
        .with_context(|| format!("cannot copy {}", args.run.join("tokenizer.json").display()))?;
    println!(
        "exported step {} of {} ({:?} stack, merged) to {} as {}: model.safetensors {:.2} MB, config.json, generation_config.json, tokenizer.json",
        loaded.step,
        args.run.display(),
        loaded.cfg.lors.mode,
        args.out.display(),
        args.dtype,
        size as f64 / 1e6
    );
    Ok(())
}

/// A vanilla model config from an HF Llama `config.json`, refusing what we do not implement.
pub fn config_from_hf(v: &Value, origin: &Path) -> Result<Config> {
    let get = |k: &str| -> Result<&Value> {
        v.get(k).with_context(|| format!("{}: config.json has no {k:?}", origin.display()))
    };
    let int = |k: &str| -> Result<usize> {
        get(k)?.as_u64().map(|x| x as usize).with_context(|| format!("{}: {k} is not an integer", origin.display()))
    };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "llama" {
        bail!("{}: model_type {model_type:?} is not \"llama\"; only Llama checkpoints load", origin.display());
    }
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            bail!("{}: hidden_act {act:?} is not supported (only silu)", origin.display());
        }
    }
    if v.get("rope_scaling").is_some_and(|x| !x.is_null()) {
        bail!("{}: rope_scaling is not supported", origin.display());
    }
    for k in ["attention_bias", "mlp_bias"] {
        if v.get(k).and_then(Value::as_bool) == Some(true) {
            bail!("{}: {k} = true is not supported (lors-lm models have no biases)", origin.display());
        }
    }
    let n_heads = int("num_attention_heads")?;
    let d = int("hidden_size")?;
    if let Some(hd) = v.get("head_dim").and_then(Value::as_u64) {
        if hd as usize * n_heads != d {
            bail!("{}: head_dim {hd} × {n_heads} heads != hidden_size {d} is not supported", origin.display());
        }
    }
    let model = ModelConfig {
        vocab_size: int("vocab_size")?,
        d_model: d,
        n_layers: int("num_hidden_layers")?,
        n_heads,
        n_kv_heads: v.get("num_key_value_heads").and_then(Value::as_u64).map_or(n_heads, |x| x as usize),
        ffn_hidden: int("intermediate_size")?,
        max_seq_len: int("max_position_embeddings")?,
        rope_theta: v.get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0),
        norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
        tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
    };
    let mut cfg =
        Config { model, lors: LorsConfig { mode: Mode::Vanilla, ..LorsConfig::default() }, ..Config::default() };
    cfg.train.seq_len = cfg.train.seq_len.min(cfg.model.max_seq_len);
    cfg.validate().with_context(|| format!("{}: unsupported model config", origin.display()))?;
    Ok(cfg)
}

/// Tensors of an HF directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
fn load_hf_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else {
        let index = dir.join("model.safetensors.index.json");
        let text = fs::read_to_string(&index).with_context(|| {
            format!("{} has neither model.safetensors nor model.safetensors.index.json", dir.display())
        })?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
        let mut shards: Vec<String> = v["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?
            .values()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    };
    let mut out = HashMap::new();
    for f in files {
        let t = candle_core::safetensors::load(&f, device)
            .with_context(|| format!("cannot read {}: truncated or not safetensors", f.display()))?;
        out.extend(t);
    }
    Ok(out)
}

/// A vanilla model (in f32) and its tokenizer from a local HF Llama directory.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<(Config, Model, tokenizers::Tokenizer, Value)> {
    let cfg_path = dir.join("config.json");
    let text = fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {} (--hf expects a Hugging Face Llama directory)", cfg_path.display()))?;
    let hf: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", cfg_path.display()))?;
    let cfg = config_from_hf(&hf, &cfg_path)?;
    let mut tensors = HashMap::new();
    for (name, t) in load_hf_tensors(dir, device)? {
        if let Some(ours) = name_from_hf(&name) {
            if ours == "lm_head.weight" && cfg.model.tie_embeddings {
                continue; // a tied head stored anyway
            }
            tensors.insert(ours, t);
        }
    }
    let mut store = ParamStore::from_tensors(tensors, DType::F32, device);
    let model =
        Model::new(&cfg, &mut store).with_context(|| format!("cannot load the weights in {}", dir.display()))?;
    let tok = crate::data::load_tokenizer(&dir.join("tokenizer.json"))?;
    Ok((cfg, model, tok, hf))
}

/// Resolve `--hf`: a local directory, or `hf:OWNER/NAME` fetched through hf-hub's cache.
pub fn resolve_hf(spec: &str) -> Result<PathBuf> {
    let Some(repo) = spec.strip_prefix("hf:") else {
        let p = PathBuf::from(spec);
        if !p.is_dir() {
            bail!("--hf {spec}: no such directory (or use hf:OWNER/NAME for the Hub)");
        }
        return Ok(p);
    };
    let (owner, name) = repo
        .split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty())
        .with_context(|| format!("--hf {spec}: expected hf:OWNER/NAME"))?;
    let config = crate::data::fetch_hub_file(owner, name, None, "config.json")?.0;
    let dir = config.parent().context("hub cache path without a parent")?.to_path_buf();
    crate::data::fetch_hub_file(owner, name, None, "tokenizer.json")?;
    if crate::data::fetch_hub_file(owner, name, None, "model.safetensors").is_err() {
        let index = crate::data::fetch_hub_file(owner, name, None, "model.safetensors.index.json")?.0;
        let v: Value = serde_json::from_str(&fs::read_to_string(&index)?)?;
        let mut shards: Vec<&str> =
            v["weight_map"].as_object().into_iter().flat_map(|m| m.values()).filter_map(Value::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            crate::data::fetch_hub_file(owner, name, None, s)?;
        }
    }
    Ok(dir)
}

/// Size in bytes of the merged f32 export of `model` (serialised in memory).
pub fn merged_size_bytes(model: &Model) -> Result<usize> {
    let tensors = model.hf_tensors()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?.len())
}
