//! A model → one GGUF file that llama.cpp runs with no other file: the `llama`
//! architecture's metadata, the tokenizer, the merged weights (q and k permuted for
//! llama.cpp's RoPE layout), written by candle's `gguf_file::write`.

use super::{gguf_name, permute_rope, tokenizer::tokenizer_metadata};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// The weight type of an exported GGUF (norms always stay f32, as llama.cpp wants them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    /// 8-bit blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
}

impl GgufDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            other => bail!("--dtype {other}: a GGUF export is f32, f16 or q8_0"),
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }
}

/// What a GGUF export says about the model besides its weights.
pub struct GgufInfo<'a> {
    /// `general.name`.
    pub name: &'a str,
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// The `general.*` and `llama.*` metadata of `model`.
fn model_metadata(model: &Model, name: &str, dtype: GgufDtype) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value::{String as S, F32, U32};
    let m = &model.cfg;
    let u = |x: usize| U32(x as u32);
    // llama.cpp checks each key's type: u32 for sizes, f32 for the RoPE base and epsilon.
    vec![
        ("general.architecture".to_string(), S("llama".into())),
        ("general.name".into(), S(name.into())),
        ("general.file_type".into(), U32(dtype.file_type())),
        ("general.quantization_version".into(), U32(2)),
        ("llama.context_length".into(), u(m.max_seq_len)),
        ("llama.embedding_length".into(), u(m.d_model)),
        ("llama.block_count".into(), u(m.n_layers)),
        ("llama.feed_forward_length".into(), u(m.ffn_hidden)),
        ("llama.attention.head_count".into(), u(m.n_heads)),
        ("llama.attention.head_count_kv".into(), u(m.kv_heads())),
        ("llama.rope.freq_base".into(), F32(m.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), F32(m.norm_eps as f32)),
        ("llama.rope.dimension_count".into(), u(m.head_dim())),
        ("llama.vocab_size".into(), u(m.vocab_size)),
    ]
}

/// GGUF tensors by name, in the order they are written.
type NamedTensors = Vec<(String, QTensor)>;

/// Every weight as a GGUF tensor: llama.cpp's names, q/k permuted, matrices in `dtype`
/// (q8_0 needs rows of a multiple of 32 values; other matrices fall back to f16, as
/// llama.cpp's converter does), norms in f32. Also returns the names that fell back.
fn tensors(model: &Model, dtype: GgufDtype) -> Result<(NamedTensors, Vec<String>)> {
    let m = &model.cfg;
    let (mut out, mut fell_back) = (vec![], vec![]);
    for (ours, t) in model.merged_tensors()? {
        let name = gguf_name(&ours)?;
        let mut t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        if ours.ends_with(".q.weight") {
            t = permute_rope(&t, m.n_heads)?;
        } else if ours.ends_with(".k.weight") {
            t = permute_rope(&t, m.kv_heads())?;
        }
        let mut ggml = if t.rank() == 1 { GgmlDType::F32 } else { dtype.ggml() };
        if !t.dims()[t.rank() - 1].is_multiple_of(ggml.block_size()) {
            fell_back.push(name.clone());
            ggml = GgmlDType::F16;
        }
        let q = QTensor::quantize(&t, ggml).with_context(|| format!("cannot convert {name} to {ggml:?}"))?;
        out.push((name, q));
    }
    Ok((out, fell_back))
}

/// Write `model` (LORS terms merged) with its tokenizer as a GGUF file at `path`, through a
/// temporary file renamed into place (nothing is left behind on an error). Returns the file
/// size and the tensors that were written in f16 instead of q8_0.
pub fn write_gguf(model: &Model, info: &GgufInfo, dtype: GgufDtype, path: &Path) -> Result<(u64, Vec<String>)> {
    let mut metadata = model_metadata(model, info.name, dtype);
    metadata.extend(tokenizer_metadata(info.tokenizer, model.cfg.vocab_size, info.bos, info.eos)?);
    let (tensors, fell_back) = tensors(model, dtype)?;
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let written = (|| -> Result<()> {
        let file = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &meta, &ts).with_context(|| format!("cannot write {}", tmp.display()))?;
        let file = w.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
        file.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((fs::metadata(path)?.len(), fell_back))
}
