//! The architecture's sizes: the `[model]` section of a run config, named after Hugging Face's
//! `LlamaConfig` where they can be. Every other file of the model reads it: `llama.rs` builds
//! the layers from it, `lors.rs` shapes each projection and checks its ranks against it.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Llama architecture hyper-parameters (names follow the HF `LlamaConfig` where they can).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size; 0 = take it from the prepared data's meta.json.
    pub vocab_size: usize,
    /// Width of the residual stream (hidden_size).
    pub d_model: usize,
    /// Number of transformer blocks (num_hidden_layers).
    pub n_layers: usize,
    /// Attention heads (num_attention_heads); head_dim = d_model / n_heads.
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; 0 = same as n_heads.
    pub n_kv_heads: usize,
    /// SwiGLU hidden width (intermediate_size).
    pub ffn_hidden: usize,
    /// Longest sequence the model is used with (max_position_embeddings).
    pub max_seq_len: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Tie the LM head to the token embedding.
    pub tie_embeddings: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 0,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 0,
            ffn_hidden: 344,
            max_seq_len: 256,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
        }
    }
}

/// Bounds on a config's dimensions (`ModelConfig::validate`).
pub const MAX_LAYERS: usize = 1 << 16;
pub const MAX_WIDTH: usize = 1 << 24;
pub const MAX_POSITIONS: usize = 1 << 26;

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        if self.n_kv_heads == 0 {
            self.n_heads
        } else {
            self.n_kv_heads
        }
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Range checks that the types cannot express (vocabulary 0 is allowed: resolved later).
    /// Every dimension is also bounded (far above any published model) so that a damaged or
    /// hostile config can never drive a loop or an allocation of astronomical size.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, msg: String| if ok { Ok(()) } else { bail!("{msg}") };
        for (key, value, limit) in [
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("d_model", self.d_model, MAX_WIDTH),
            ("n_heads", self.n_heads, MAX_WIDTH),
            ("n_kv_heads", self.n_kv_heads, MAX_WIDTH),
            ("ffn_hidden", self.ffn_hidden, MAX_WIDTH),
            ("vocab_size", self.vocab_size, MAX_WIDTH),
            ("max_seq_len", self.max_seq_len, MAX_POSITIONS),
        ] {
            check(
                value <= limit,
                format!("model.{key} = {value} exceeds the limit of {limit}: the config is damaged"),
            )?;
        }
        check(self.d_model > 0, "model.d_model must be > 0".into())?;
        check(self.n_layers > 0, "model.n_layers must be > 0".into())?;
        check(self.n_heads > 0, "model.n_heads must be > 0".into())?;
        check(self.ffn_hidden > 0, "model.ffn_hidden must be > 0".into())?;
        check(
            self.d_model.is_multiple_of(self.n_heads),
            format!("model.d_model ({}) must be divisible by model.n_heads ({})", self.d_model, self.n_heads),
        )?;
        check(
            self.head_dim().is_multiple_of(2),
            "model.d_model / model.n_heads must be even (RoPE rotates pairs)".into(),
        )?;
        check(
            self.n_heads.is_multiple_of(self.kv_heads()),
            format!("model.n_heads ({}) must be divisible by model.n_kv_heads ({})", self.n_heads, self.kv_heads()),
        )?;
        check(self.max_seq_len > 0, "model.max_seq_len must be > 0".into())?;
        check(self.rope_theta > 0.0, "model.rope_theta must be > 0".into())?;
        check(self.norm_eps > 0.0, "model.norm_eps must be > 0".into())
    }
}
