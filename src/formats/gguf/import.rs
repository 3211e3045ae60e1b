//! A GGUF Llama → a vanilla lors-lm model in f32 and its tokenizer.
//!
//! Everything a file says is checked before anything is allocated from it: the magic, the
//! header (candle's reader bounds every string and array by the file size), the
//! architecture, every tensor's name, shape and type against the metadata, and every
//! tensor's bytes against the file size. A file that fails any check gets an error naming it
//! and what is wrong, never a panic.

use super::tokenizer::{bos_eos, int, tokenizer_from_gguf};
use super::{gguf_name, name_from_gguf, unpermute_rope};
use crate::config::{Config, LorsConfig, Mode, ModelConfig};
use crate::model::{Model, ParamStore, Proj};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The longest context accepted (Llama 3.1's is 131,072; RoPE tables grow with the positions
/// actually used, so this costs nothing up front).
const MAX_CONTEXT: usize = 1 << 20;

/// The tensors of one Llama block: attn_norm, ffn_norm and the 7 projections.
const TENSORS_PER_BLOCK: usize = 9;

/// A model loaded from a GGUF file.
pub struct GgufModel {
    pub cfg: Config,
    pub model: Model,
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// `tokenizer.ggml.add_bos_token`: llama.cpp starts every prompt with BOS.
    pub add_bos: bool,
}

/// Whether `path` names a GGUF file by its extension (it may not exist).
pub fn looks_like_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Whether `path` is a regular file that starts with the GGUF magic.
pub fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file() && File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// Whether `path` is meant as a GGUF file: named `*.gguf` (it may not exist), or a file that
/// starts with the GGUF magic.
pub fn names_gguf(path: &Path) -> bool {
    looks_like_gguf(path) || is_gguf_file(path)
}

/// The header (metadata and tensor infos) of a GGUF file, the reader positioned after it, and
/// the file's size.
fn read_header(path: &Path) -> Result<(Content, BufReader<File>, u64)> {
    let shown = path.display();
    let file = File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let file_size = file.metadata().with_context(|| format!("cannot read {shown}"))?.len();
    if !is_gguf_file(path) {
        bail!("{shown} is not a GGUF file (it does not start with the GGUF magic): pass a .gguf file written by llama.cpp's tools or `lors-lm export --format gguf`");
    }
    let mut reader = BufReader::new(file);
    let mut head = [0u8; 24];
    reader.read_exact(&mut head).with_context(|| format!("{shown}: the GGUF header is truncated"))?;
    reader.seek(SeekFrom::Start(0)).with_context(|| format!("cannot read {shown}"))?;
    let ct = Content::read(&mut reader)
        .map_err(|e| anyhow::anyhow!("{shown}: cannot read the GGUF header: {e} (a truncated or damaged file?)"))?;
    // Content keeps tensors and metadata in maps: an entry named twice would silently replace
    // the first (which one wins is the file's order, not the reader's choice). Refuse it.
    let (n_tensors, n_kv) = header_counts(&head);
    if n_tensors != ct.tensor_infos.len() as u64 {
        bail!(
            "{shown}: the header lists {n_tensors} tensors but only {} distinct names: a tensor name is repeated (the file is damaged)",
            ct.tensor_infos.len()
        );
    }
    if n_kv != ct.metadata.len() as u64 {
        bail!(
            "{shown}: the header lists {n_kv} metadata entries but only {} distinct keys: a key is repeated (the file is damaged)",
            ct.metadata.len()
        );
    }
    Ok((ct, reader, file_size))
}

/// The tensor and metadata counts of a GGUF header's first 24 bytes (magic, version, counts:
/// u32 counts in version 1, u64 after).
fn header_counts(head: &[u8; 24]) -> (u64, u64) {
    let u32_at = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
    match u32_at(4) {
        1 => (u64::from(u32_at(8)), u64::from(u32_at(12))),
        _ => (u64_at(8), u64_at(16)),
    }
}

/// Load a GGUF Llama onto `device`: weights dequantized to f32, q and k brought back from
/// llama.cpp's RoPE layout, the tokenizer rebuilt from the metadata.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel> {
    let shown = path.display();
    let (ct, mut reader, file_size) = read_header(path)?;
    let cfg = config_from_gguf(&ct, path)?;
    check_tensors(&ct, &cfg.model, path, file_size)?;
    let tokenizer = tokenizer_from_gguf(&ct, path)?;
    let n_tokens = ct.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map_or(0, Vec::len);
    if n_tokens > cfg.model.vocab_size {
        bail!("{shown}: the tokenizer has {n_tokens} tokens but token_embd.weight only {} rows", cfg.model.vocab_size);
    }
    let m = &cfg.model;
    let mut tensors = HashMap::new();
    for gguf in ct.tensor_infos.keys() {
        let Some(ours) = name_from_gguf(gguf) else { continue };
        let q = ct
            .tensor(&mut reader, gguf, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{shown}: cannot read tensor {gguf}: {e}"))?;
        let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if ours.ends_with(".q.weight") {
            t = unpermute_rope(&t, m.n_heads)?;
        } else if ours.ends_with(".k.weight") {
            t = unpermute_rope(&t, m.kv_heads())?;
        }
        tensors.insert(ours, t.to_device(device)?);
    }
    let mut store = ParamStore::from_tensors(tensors, DType::F32, device);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)
        .with_context(|| format!("cannot build the model from the weights in {shown}"))?;
    let (bos, eos) = bos_eos(&ct.metadata);
    let add_bos = matches!(ct.metadata.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    Ok(GgufModel { cfg, model, tokenizer, bos, eos, add_bos })
}

/// The tokenizer of a GGUF file alone (only the header is read, not the weights): for
/// `prepare --tokenizer model.gguf`, so that data can be tokenized for a GGUF model.
pub fn load_gguf_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizer_from_gguf(&read_header(path)?.0, path)
}

/// A float metadata value (f32 values are read back as the decimal they were written from:
/// 1e-5 stays 1e-5, not 9.99999974e-6).
fn float(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => format!("{x}").parse().ok(),
        Value::F64(x) => Some(x),
        _ => int(v).map(|x| x as f64),
    }
}

/// The model config a GGUF file's `llama.*` metadata describes, refusing what lors-lm does
/// not implement.
fn config_from_gguf(ct: &Content, origin: &Path) -> Result<Config> {
    let shown = origin.display();
    let meta = &ct.metadata;
    let arch = meta.get("general.architecture").and_then(|v| v.to_string().ok());
    match arch.map(String::as_str) {
        Some("llama") => {}
        Some(other) => {
            bail!("{shown}: general.architecture = {other:?} is not supported: lors-lm loads llama models only")
        }
        None => bail!("{shown}: no general.architecture in the metadata: not a model file?"),
    }
    let get = |k: &str| meta.get(&format!("llama.{k}"));
    let need = |k: &str| -> Result<usize> {
        let v = get(k).with_context(|| format!("{shown}: the metadata has no llama.{k}"))?;
        let n = int(v).with_context(|| {
            format!("{shown}: llama.{k} = {v:?} is not a non-negative integer (per-layer values are not supported)")
        })?;
        usize::try_from(n).with_context(|| format!("{shown}: llama.{k} = {n} is too large"))
    };
    if let Some(n) = get("expert_count").and_then(int).filter(|&n| n > 0) {
        bail!("{shown}: llama.expert_count = {n}: mixture-of-experts models are not supported");
    }
    if let Some(kind) = get("rope.scaling.type").and_then(|v| v.to_string().ok()).filter(|k| *k != "none") {
        bail!("{shown}: llama.rope.scaling.type = {kind:?}: scaled RoPE is not supported (lors-lm implements the default RoPE only)");
    }
    let n_heads = need("attention.head_count")?;
    let d = need("embedding_length")?;
    let n_kv_heads = match get("attention.head_count_kv") {
        Some(_) => need("attention.head_count_kv")?,
        None => n_heads,
    };
    let embd =
        ct.tensor_infos.get("token_embd.weight").with_context(|| format!("{shown}: no token_embd.weight tensor"))?;
    // Each block is 9 tensors (2 norms, 7 projections): bound the count by what the file holds
    // before anything loops or allocates per layer.
    let n_layers = need("block_count")?;
    let room = ct.tensor_infos.len() / TENSORS_PER_BLOCK;
    if n_layers > room {
        bail!(
            "{shown}: llama.block_count = {n_layers} but the file holds {} tensors, room for at most {room} blocks of {TENSORS_PER_BLOCK}: the metadata is damaged",
            ct.tensor_infos.len()
        );
    }
    let model = ModelConfig {
        vocab_size: embd.shape.dims().first().copied().unwrap_or(0),
        d_model: d,
        n_layers,
        n_heads,
        n_kv_heads,
        ffn_hidden: need("feed_forward_length")?,
        max_seq_len: need("context_length")?,
        rope_theta: get("rope.freq_base").and_then(float).unwrap_or(10000.0),
        norm_eps: get("attention.layer_norm_rms_epsilon")
            .and_then(float)
            .with_context(|| format!("{shown}: no llama.attention.layer_norm_rms_epsilon"))?,
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
    };
    if model.max_seq_len > MAX_CONTEXT {
        bail!(
            "{shown}: llama.context_length = {} exceeds the {MAX_CONTEXT} positions lors-lm supports",
            model.max_seq_len
        );
    }
    if let Some(v) = get("vocab_size").and_then(int).filter(|&v| v as usize != model.vocab_size) {
        bail!("{shown}: llama.vocab_size = {v} but token_embd.weight has {} rows", model.vocab_size);
    }
    model.validate().with_context(|| format!("{shown}: unsupported model metadata"))?;
    let hd = model.head_dim();
    for k in ["rope.dimension_count", "attention.key_length", "attention.value_length"] {
        if get(k).is_some() && need(k)? != hd {
            bail!("{shown}: llama.{k} = {} differs from embedding_length / head_count = {hd}: not supported", need(k)?);
        }
    }
    let mut cfg =
        Config { model, lors: LorsConfig { mode: Mode::Vanilla, ..LorsConfig::default() }, ..Config::default() };
    cfg.train.seq_len = cfg.train.seq_len.min(cfg.model.max_seq_len);
    cfg.validate().with_context(|| format!("{shown}: unsupported model config"))?;
    Ok(cfg)
}

/// Every tensor a vanilla model of `m` has, with its shape (PyTorch order: (out, in)).
fn expected_shapes(m: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (m.d_model, m.vocab_size);
    let mut out = vec![("embed.weight".to_string(), vec![v, d]), ("norm.weight".into(), vec![d])];
    if !m.tie_embeddings {
        out.push(("lm_head.weight".into(), vec![v, d]));
    }
    for l in 0..m.n_layers {
        out.push((format!("layers.{l}.attn_norm.weight"), vec![d]));
        out.push((format!("layers.{l}.ffn_norm.weight"), vec![d]));
        for p in Proj::ALL {
            let (rows, cols) = p.shape(m);
            out.push((format!("layers.{l}.{p}.weight"), vec![rows, cols]));
        }
    }
    out
}

/// Names, shapes, types and byte ranges of every tensor, before any is read.
fn check_tensors(ct: &Content, m: &ModelConfig, origin: &Path, file_size: u64) -> Result<()> {
    let shown = origin.display();
    for name in ct.tensor_infos.keys() {
        let known = name_from_gguf(name).filter(|ours| {
            ours.strip_prefix("layers.")
                .and_then(|r| r.split_once('.')?.0.parse::<usize>().ok())
                .is_none_or(|l| l < m.n_layers)
        });
        if known.is_none() {
            bail!("{shown}: tensor {name} is not part of a plain {}-layer Llama (biases, MoE experts and RoPE frequency factors are not supported)", m.n_layers);
        }
    }
    for (ours, dims) in expected_shapes(m) {
        let name = gguf_name(&ours)?;
        let info = ct.tensor_infos.get(&name).with_context(|| format!("{shown}: tensor {name} is missing"))?;
        if info.shape.dims() != dims.as_slice() {
            bail!("{shown}: tensor {name} has shape {:?} but the metadata implies {dims:?}", info.shape.dims());
        }
        let dtype = info.ggml_dtype;
        if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            bail!("{shown}: tensor {name} is stored as {dtype:?}, which candle cannot dequantize: requantize the model (llama-quantize) to q8_0, q4_k or f16");
        }
        let elems = dims.iter().try_fold(1u64, |acc, &x| acc.checked_mul(x as u64));
        let bytes = elems
            .filter(|e| dims.last().is_some_and(|&c| c % dtype.block_size() == 0) && *e > 0)
            .and_then(|e| (e / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64))
            .with_context(|| {
                format!(
                    "{shown}: tensor {name} of shape {dims:?} does not fit {dtype:?} blocks of {}",
                    dtype.block_size()
                )
            })?;
        let end = ct.tensor_data_offset.checked_add(info.offset).and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|e| e > file_size) {
            bail!(
                "{shown}: tensor {name} ({bytes} bytes at offset {}) runs past the end of the file ({file_size} bytes): the file is truncated",
                ct.tensor_data_offset.saturating_add(info.offset)
            );
        }
    }
    Ok(())
}
