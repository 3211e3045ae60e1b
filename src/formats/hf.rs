//! The Hugging Face Llama format, both ways, and the one place that knows its tensor names.
//!
//! * Export (`lors-lm export --format hf-llama`): a model → a plain `LlamaForCausalLM`
//!   directory (LORS weights merged, `W_l = W_shared + B_l A_l`) that transformers, llama.cpp's
//!   converters and candle's own llama load without any lors-lm code.
//! * Import (`load_hf_dir`): a local HF Llama directory (or `hf:OWNER/NAME` through hf-hub's
//!   cache) → a vanilla lors-lm model, so `generate --hf` runs models lors-lm did not train.

use crate::config::{Config, LorsConfig, Mode, ModelConfig};
use crate::model::{Model, ParamStore, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

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

/// The Hugging Face name of one of our vanilla tensor names (`Model::merged_tensors`).
pub fn hf_name(ours: &str) -> Result<String> {
    match ours {
        "embed.weight" => return Ok("model.embed_tokens.weight".into()),
        "norm.weight" => return Ok("model.norm.weight".into()),
        "lm_head.weight" => return Ok("lm_head.weight".into()),
        _ => {}
    }
    let parsed = ours.strip_prefix("layers.").and_then(|r| r.split_once('.')).and_then(|(layer, rest)| {
        let hf = match rest {
            "attn_norm.weight" => "input_layernorm.weight".to_string(),
            "ffn_norm.weight" => "post_attention_layernorm.weight".to_string(),
            _ => {
                let p = Proj::from_name(rest.strip_suffix(".weight")?)?;
                format!("{}.{p}_proj.weight", if p.is_attn() { "self_attn" } else { "mlp" })
            }
        };
        Some(format!("model.layers.{layer}.{hf}"))
    });
    parsed.with_context(|| format!("{ours} has no Hugging Face Llama name"))
}

/// Our parameter name of a vanilla model for a Hugging Face Llama tensor name (None for
/// tensors we do not use, such as old `rotary_emb.inv_freq` buffers).
pub fn name_from_hf(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("embed.weight".into()),
        "model.norm.weight" => return Some("norm.weight".into()),
        "lm_head.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let ours = match rest {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "post_attention_layernorm.weight" => "ffn_norm.weight".to_string(),
        _ => {
            let proj =
                rest.strip_prefix("self_attn.").or_else(|| rest.strip_prefix("mlp."))?.strip_suffix("_proj.weight")?;
            format!("{}.weight", Proj::from_name(proj)?)
        }
    };
    Some(format!("layers.{layer}.{ours}"))
}

/// Every weight of `model` under its Hugging Face name, LORS terms merged, detached.
pub fn hf_tensors(model: &Model) -> Result<Vec<(String, Tensor)>> {
    model.merged_tensors()?.into_iter().map(|(name, t)| Ok((hf_name(&name)?, t))).collect()
}

/// Write the merged model, as `model.safetensors` with `{"format": "pt"}` metadata (which
/// transformers requires), in `dtype`.
pub fn write_safetensors(model: &Model, path: &Path, dtype: DType) -> Result<u64> {
    let tensors = hf_tensors(model)?
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
    let rope_theta = rope_theta(v, origin)?;
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
        rope_theta,
        norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
        tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
    };
    let mut cfg =
        Config { model, lors: LorsConfig { mode: Mode::Vanilla, ..LorsConfig::default() }, ..Config::default() };
    cfg.train.seq_len = cfg.train.seq_len.min(cfg.model.max_seq_len);
    cfg.validate().with_context(|| format!("{}: unsupported model config", origin.display()))?;
    Ok(cfg)
}

/// The RoPE base of an HF config: `rope_theta` (transformers < 5), or inside
/// `rope_parameters` (transformers >= 5); scaled RoPE variants (`rope_type` other than
/// "default", or a `rope_scaling`) are refused.
fn rope_theta(v: &Value, origin: &Path) -> Result<f64> {
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(params) = v.get(key).filter(|x| !x.is_null()) else { continue };
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str);
        match kind {
            None | Some("default") => {}
            Some(other) => bail!(
                "{}: {key}.rope_type {other:?} (scaled RoPE) is not supported: lors-lm implements the default RoPE only",
                origin.display()
            ),
        }
        if key == "rope_scaling" && kind.is_none() {
            bail!(
                "{}: rope_scaling {params} is not supported: lors-lm implements the default RoPE only",
                origin.display()
            );
        }
        if let Some(theta) = params.get("rope_theta") {
            return theta.as_f64().with_context(|| format!("{}: {key}.rope_theta is not a number", origin.display()));
        }
    }
    Ok(v.get("rope_theta").and_then(Value::as_f64).unwrap_or(10000.0))
}

/// The token ids of `key` (`bos_token_id`, `eos_token_id`) in an HF config: a number, a list
/// of numbers (several end-of-sequence tokens), or absent.
pub fn token_ids(v: &Value, key: &str) -> Vec<u32> {
    match v.get(key) {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => vec![],
    }
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
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)
        .with_context(|| format!("cannot load the weights in {}", dir.display()))?;
    let tok = crate::formats::load_tokenizer(&dir.join("tokenizer.json"))?;
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
    let config = crate::formats::fetch_hub_file(owner, name, None, "config.json")?.0;
    let dir = config.parent().context("hub cache path without a parent")?.to_path_buf();
    crate::formats::fetch_hub_file(owner, name, None, "tokenizer.json")?;
    if crate::formats::fetch_hub_file(owner, name, None, "model.safetensors").is_err() {
        let index = crate::formats::fetch_hub_file(owner, name, None, "model.safetensors.index.json")?.0;
        let v: Value = serde_json::from_str(&fs::read_to_string(&index)?)?;
        let mut shards: Vec<&str> =
            v["weight_map"].as_object().into_iter().flat_map(|m| m.values()).filter_map(Value::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            crate::formats::fetch_hub_file(owner, name, None, s)?;
        }
    }
    Ok(dir)
}

/// Size in bytes of the merged f32 export of `model` (serialised in memory).
pub fn merged_size_bytes(model: &Model) -> Result<usize> {
    let tensors = hf_tensors(model)?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small Llama `config.json` with `extra` keys added (or replaced; `null` removes one).
    fn hf_json(extra: Value) -> Value {
        let mut v = json!({
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "vocab_size": 300,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        });
        for (k, x) in extra.as_object().unwrap() {
            match x {
                Value::Null => v.as_object_mut().unwrap().remove(k),
                _ => v.as_object_mut().unwrap().insert(k.clone(), x.clone()),
            };
        }
        v
    }

    fn config(extra: Value) -> Result<Config> {
        config_from_hf(&hf_json(extra), Path::new("dir/config.json"))
    }

    #[test]
    fn rope_theta_from_the_top_level_or_rope_parameters() {
        assert_eq!(config(json!({})).unwrap().model.rope_theta, 10000.0);
        assert_eq!(config(json!({"rope_theta": 250000.0})).unwrap().model.rope_theta, 250000.0);
        assert_eq!(config(json!({"rope_theta": null})).unwrap().model.rope_theta, 10000.0);
        // transformers >= 5: no top-level rope_theta, RoPE in rope_parameters.
        let v5 = json!({"rope_theta": null, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}});
        assert_eq!(config(v5).unwrap().model.rope_theta, 500000.0);
        // rope_parameters wins over a stale top-level value; a null rope_scaling (our exports) is fine.
        let both = json!({"rope_theta": 10000.0, "rope_scaling": null,
                          "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}});
        assert_eq!(config(both).unwrap().model.rope_theta, 500000.0);
        let err = config(json!({"rope_parameters": {"rope_theta": "big", "rope_type": "default"}})).unwrap_err();
        assert!(err.to_string().contains("rope_parameters.rope_theta is not a number"), "{err:#}");
    }

    #[test]
    fn scaled_rope_is_refused_naming_the_key() {
        for key in ["rope_parameters", "rope_scaling"] {
            for kind in ["llama3", "linear", "dynamic", "yarn", "longrope"] {
                let params = json!({"rope_theta": 500000.0, "rope_type": kind, "factor": 8.0});
                let err = config(json!({ key: params })).unwrap_err().to_string();
                assert!(err.contains(&format!("{key}.rope_type \"{kind}\"")), "{key} {kind}: {err}");
                assert!(err.contains("scaled RoPE") && err.starts_with("dir/config.json"), "{err}");
            }
        }
        // The old spelling ("type"), and a rope_scaling without any type, are refused too.
        let err = config(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap_err().to_string();
        assert!(err.contains("rope_scaling.rope_type \"linear\""), "{err}");
        let err = config(json!({"rope_scaling": {"factor": 2.0}})).unwrap_err().to_string();
        assert!(err.contains("rope_scaling {\"factor\":2.0} is not supported"), "{err}");
    }

    #[test]
    fn token_ids_are_a_number_a_list_or_absent() {
        let v = json!({
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "pad_token_id": null,
        });
        assert_eq!(token_ids(&v, "bos_token_id"), vec![128000]);
        assert_eq!(token_ids(&v, "eos_token_id"), vec![128001, 128008, 128009]);
        assert_eq!(token_ids(&v, "pad_token_id"), Vec::<u32>::new());
        assert_eq!(token_ids(&v, "missing"), Vec::<u32>::new());
        // Our own exports write one id or null; both read back.
        let cfg = config(json!({})).unwrap();
        let ours = hf_config(&cfg.model, "float32", Some(0), None);
        assert_eq!(token_ids(&ours, "bos_token_id"), vec![0]);
        assert_eq!(token_ids(&ours, "eos_token_id"), Vec::<u32>::new());
    }
}
