//! Run configuration: a TOML file with sections `[model]`, `[lors]`, `[train]`, `[data]`,
//! overridable with `--set section.key=value`. Unknown keys and wrong types are errors that
//! name the key. The resolved config is saved as `RUN_DIR/config.toml` and next to every
//! checkpoint, so `generate` needs nothing but the run directory.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The seven projection types of a Llama block, in a fixed order.
pub const PROJ_TYPES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// Whether a projection type belongs to attention (else to the FFN).
pub fn is_attn(proj: &str) -> bool {
    matches!(proj, "q" | "k" | "v" | "o")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub lors: LorsConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub data: DataConfig,
}

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
    /// (out, in) of a projection type's weight.
    pub fn proj_shape(&self, proj: &str) -> (usize, usize) {
        let d = self.d_model;
        let kv = self.kv_heads() * self.head_dim();
        match proj {
            "q" | "o" => (d, d),
            "k" | "v" => (kv, d),
            "gate" | "up" => (self.ffn_hidden, d),
            "down" => (d, self.ffn_hidden),
            other => unreachable!("unknown projection type {other}"),
        }
    }
}

/// How the stacked layers share their projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every layer owns every projection (a plain Llama).
    Vanilla,
    /// ALBERT-style: one base per group, no private term.
    Shared,
    /// LORS: one base per group plus a private rank-r residual `B_l A_l` per layer.
    Lors,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LorsConfig {
    /// "vanilla" | "shared" | "lors".
    pub mode: Mode,
    /// Rank r of the private residual `B_l (out×r) · A_l (r×in)`.
    pub rank: usize,
    /// Rank for attention projections (q, k, v, o); overrides `rank`.
    pub attn_rank: Option<usize>,
    /// Rank for FFN projections (gate, up, down); overrides `rank`.
    pub ffn_rank: Option<usize>,
    /// Per-layer attention ranks (one per layer); overrides `attn_rank` and `rank`.
    /// The LORS DeiT config gives deeper layers more attention rank.
    pub attn_rank_schedule: Option<Vec<usize>>,
    /// Per-layer FFN ranks (one per layer); overrides `ffn_rank` and `rank`.
    /// The LORS DeiT config gives shallower layers more FFN rank.
    pub ffn_rank_schedule: Option<Vec<usize>>,
    /// Number of groups of consecutive layers that each own a shared base (1 = all layers).
    pub groups: usize,
    /// Projection types that are shared; the others stay private per layer.
    pub targets: Vec<String>,
    /// Initialisation of the private factors: "paper" (A Kaiming-uniform U(±1/√in), B zeros:
    /// every layer starts equal to its shared base) or "small" (A and B both N(0, 0.02²), the
    /// model's own init scale, so layers differ from step 0 and both factors get gradients).
    pub init: PrivateInit,
    /// Scale the residual by alpha / r, as LoRA does (W_l = W + (alpha/r)·B_l A_l); unset = no
    /// scaling, as in the paper.
    pub alpha: Option<f64>,
    /// Learning-rate multiplier for the private factors A and B (1 = the paper).
    pub private_lr_mult: f64,
    /// Learning-rate multiplier for B alone (LoRA+ gives B a larger one); unset = private_lr_mult.
    pub private_b_lr_mult: Option<f64>,
    /// AdamW weight decay of A and B; unset = train.weight_decay (the paper decays every matrix).
    pub private_weight_decay: Option<f64>,
}

/// How the private LORS factors start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrivateInit {
    /// A Kaiming-uniform (PyTorch Linear default), B zeros: the LORS paper's code.
    #[default]
    Paper,
    /// A and B both N(0, 0.02²).
    Small,
}

/// Learning-rate multiplier and weight decay of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamOptions {
    pub lr_mult: f64,
    pub weight_decay: f64,
}

impl Default for LorsConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Lors,
            rank: 16,
            attn_rank: None,
            ffn_rank: None,
            attn_rank_schedule: None,
            ffn_rank_schedule: None,
            groups: 1,
            targets: PROJ_TYPES.iter().map(|s| s.to_string()).collect(),
            init: PrivateInit::Paper,
            alpha: None,
            private_lr_mult: 1.0,
            private_b_lr_mult: None,
            private_weight_decay: None,
        }
    }
}

impl LorsConfig {
    /// Whether projection `proj` uses a shared base (in shared or lors mode).
    pub fn is_shared(&self, proj: &str) -> bool {
        self.mode != Mode::Vanilla && self.targets.iter().any(|t| t == proj)
    }
    /// Rank of the private residual of `proj` at `layer` (0 when there is none).
    pub fn rank_for(&self, proj: &str, layer: usize) -> usize {
        if self.mode != Mode::Lors || !self.is_shared(proj) {
            return 0;
        }
        let (schedule, typed) = if is_attn(proj) {
            (&self.attn_rank_schedule, self.attn_rank)
        } else {
            (&self.ffn_rank_schedule, self.ffn_rank)
        };
        match schedule {
            Some(s) => s[layer],
            None => typed.unwrap_or(self.rank),
        }
    }
    /// Multiplier applied to B·A: alpha / r when `alpha` is set, else 1.
    pub fn residual_scale(&self, rank: usize) -> f64 {
        match self.alpha {
            Some(a) if rank > 0 => a / rank as f64,
            _ => 1.0,
        }
    }

    /// Optimizer options of the parameter `name` (as the model names them): private LORS
    /// factors (`*.lors_a`, `*.lors_b`) get the private multipliers and decay; other matrices
    /// get the global decay; vectors (norm gains) are never decayed.
    pub fn param_options(&self, name: &str, rank: usize, weight_decay: f64) -> ParamOptions {
        let wd = if rank >= 2 { weight_decay } else { 0.0 };
        if name.ends_with(".lors_a") {
            ParamOptions { lr_mult: self.private_lr_mult, weight_decay: self.private_weight_decay.unwrap_or(wd) }
        } else if name.ends_with(".lors_b") {
            ParamOptions {
                lr_mult: self.private_b_lr_mult.unwrap_or(self.private_lr_mult),
                weight_decay: self.private_weight_decay.unwrap_or(wd),
            }
        } else {
            ParamOptions { lr_mult: 1.0, weight_decay: wd }
        }
    }

    /// The group (index of the shared base) that `layer` belongs to: groups of consecutive
    /// layers, as equal as possible, earlier groups one larger when L % groups != 0.
    pub fn group_of(&self, layer: usize, n_layers: usize) -> usize {
        let g = self.groups.max(1);
        let (base, extra) = (n_layers / g, n_layers % g);
        // The first `extra` groups hold base+1 layers.
        let big = extra * (base + 1);
        if layer < big {
            layer / (base + 1)
        } else {
            extra + (layer - big) / base.max(1)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (each window holds seq_len + 1 tokens).
    pub seq_len: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Peak learning rate (after warmup).
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay, on tensors of rank >= 2 only.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 = off.
    pub grad_clip: f64,
    /// Evaluate every this many steps (and at the end).
    pub eval_interval: usize,
    /// Fixed validation batches per evaluation.
    pub eval_batches: usize,
    /// Checkpoint every this many steps (and at the end); 0 = only at the end.
    pub ckpt_interval: usize,
    /// Seed for initialisation and batch sampling.
    pub seed: u64,
    /// Matmul precision: "f32", or "bf16" (mixed precision: weights, optimizer state, norms,
    /// softmax and the loss stay f32; every matmul runs in bf16). bf16 is meant for CUDA; on
    /// the CPU candle widens bf16 matmuls to f32, so it only rounds (useful for tests).
    pub dtype: String,
    /// Let f32 matmuls use TF32 tensor cores on CUDA (no effect on the CPU).
    pub tf32: bool,
    /// Peak dense TFLOP/s of the device for MFU; unset = from the GPU's name (H100/H200 bf16:
    /// 989), no MFU on the CPU.
    pub peak_tflops: Option<f64>,
    /// Print a log line every this many steps.
    pub log_interval: usize,
    /// Checkpoints to keep (older ones are deleted); 0 = keep all.
    pub keep_checkpoints: usize,
    /// Consecutive steps with a non-finite loss or gradient norm (each skipped) before
    /// training stops with an error.
    pub max_bad_steps: usize,
}

impl TrainConfig {
    /// The dtype the matmuls run in (`dtype`: "bf16" = mixed precision, else f32).
    pub fn matmul_dtype(&self) -> candle_core::DType {
        if self.dtype == "bf16" {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            seq_len: 128,
            grad_accum: 1,
            max_steps: 1000,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 100,
            eval_batches: 8,
            ckpt_interval: 0,
            seed: 1337,
            dtype: "f32".into(),
            tf32: false,
            peak_tflops: None,
            log_interval: 10,
            keep_checkpoints: 3,
            max_bad_steps: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Prepared data directory (from `lors-lm prepare`); `--data` overrides it.
    pub dir: String,
}

impl Config {
    /// A model that trains in seconds: for tests and smoke runs.
    pub fn tiny() -> Self {
        Config {
            model: ModelConfig {
                vocab_size: 0,
                d_model: 32,
                n_layers: 3,
                n_heads: 4,
                n_kv_heads: 2,
                ffn_hidden: 64,
                max_seq_len: 32,
                ..ModelConfig::default()
            },
            lors: LorsConfig { rank: 4, ..LorsConfig::default() },
            train: TrainConfig {
                batch_size: 4,
                seq_len: 16,
                max_steps: 40,
                warmup_steps: 5,
                eval_interval: 20,
                eval_batches: 2,
                log_interval: 10,
                ..TrainConfig::default()
            },
            data: DataConfig::default(),
        }
    }

    /// Parse a TOML text with `--set section.key=value` overrides applied, then validate.
    pub fn from_toml_str(text: &str, sets: &[String], origin: &str) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(text).with_context(|| format!("{origin} is not valid TOML"))?;
        for set in sets {
            apply_set(&mut value, set)?;
        }
        let cfg: Config = Config::deserialize(toml::Value::Table(value))
            .map_err(|e| anyhow::anyhow!("{origin}: {}", e.to_string().trim()))?;
        cfg.validate().with_context(|| format!("invalid config {origin}"))?;
        Ok(cfg)
    }

    /// Read a config file (with overrides).
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {} (pass --config FILE)", path.display()))?;
        Self::from_toml_str(&text, sets, &path.display().to_string())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Range checks that the types cannot express. Vocabulary 0 is allowed here (resolved
    /// from the data later).
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let l = &self.lors;
        let t = &self.train;
        ensure(m.d_model > 0, "model.d_model must be > 0")?;
        ensure(m.n_layers > 0, "model.n_layers must be > 0")?;
        ensure(m.n_heads > 0, "model.n_heads must be > 0")?;
        ensure(m.ffn_hidden > 0, "model.ffn_hidden must be > 0")?;
        ensure(
            m.d_model.is_multiple_of(m.n_heads),
            &format!("model.d_model ({}) must be divisible by model.n_heads ({})", m.d_model, m.n_heads),
        )?;
        ensure(m.head_dim().is_multiple_of(2), "model.d_model / model.n_heads must be even (RoPE rotates pairs)")?;
        ensure(
            m.n_heads.is_multiple_of(m.kv_heads()),
            &format!("model.n_heads ({}) must be divisible by model.n_kv_heads ({})", m.n_heads, m.kv_heads()),
        )?;
        ensure(m.max_seq_len > 0, "model.max_seq_len must be > 0")?;
        ensure(m.rope_theta > 0.0, "model.rope_theta must be > 0")?;
        ensure(m.norm_eps > 0.0, "model.norm_eps must be > 0")?;
        ensure(l.groups >= 1, "lors.groups must be >= 1")?;
        ensure(l.private_lr_mult > 0.0, "lors.private_lr_mult must be > 0")?;
        ensure(l.private_b_lr_mult.is_none_or(|m| m > 0.0), "lors.private_b_lr_mult must be > 0")?;
        ensure(l.private_weight_decay.is_none_or(|w| w >= 0.0), "lors.private_weight_decay must be >= 0")?;
        ensure(l.alpha.is_none_or(|a| a > 0.0), "lors.alpha must be > 0 (leave it out for no scaling)")?;
        ensure(
            l.groups <= m.n_layers,
            &format!("lors.groups ({}) cannot exceed model.n_layers ({})", l.groups, m.n_layers),
        )?;
        for tgt in &l.targets {
            ensure(
                PROJ_TYPES.contains(&tgt.as_str()),
                &format!("lors.targets: unknown projection type {tgt:?} (use {PROJ_TYPES:?})"),
            )?;
        }
        for (key, sched) in
            [("lors.attn_rank_schedule", &l.attn_rank_schedule), ("lors.ffn_rank_schedule", &l.ffn_rank_schedule)]
        {
            if let Some(s) = sched {
                ensure(
                    s.len() == m.n_layers,
                    &format!("{key} has {} entries; it needs one per layer ({})", s.len(), m.n_layers),
                )?;
            }
        }
        if l.mode == Mode::Lors {
            for layer in 0..m.n_layers {
                for p in PROJ_TYPES {
                    if !l.is_shared(p) {
                        continue;
                    }
                    let r = l.rank_for(p, layer);
                    let (out, inp) = m.proj_shape(p);
                    ensure(
                        r >= 1,
                        &format!("rank of {p} at layer {layer} is 0: lors mode needs rank >= 1 (use mode = \"shared\" for no private term)"),
                    )?;
                    ensure(
                        r < out.min(inp),
                        &format!("rank {r} of {p} at layer {layer} must be < min(out, in) = {} (a full-rank residual shares nothing)", out.min(inp)),
                    )?;
                }
            }
        }
        ensure(t.batch_size > 0, "train.batch_size must be > 0")?;
        ensure(t.seq_len > 0, "train.seq_len must be > 0")?;
        ensure(
            t.seq_len <= m.max_seq_len,
            &format!("train.seq_len ({}) exceeds model.max_seq_len ({})", t.seq_len, m.max_seq_len),
        )?;
        ensure(t.grad_accum > 0, "train.grad_accum must be > 0")?;
        ensure(t.max_steps > 0, "train.max_steps must be > 0")?;
        ensure(t.lr > 0.0, "train.lr must be > 0")?;
        ensure(t.min_lr >= 0.0 && t.min_lr <= t.lr, "train.min_lr must be in [0, train.lr]")?;
        ensure(
            t.warmup_steps <= t.max_steps,
            &format!("train.warmup_steps ({}) exceeds train.max_steps ({})", t.warmup_steps, t.max_steps),
        )?;
        ensure(t.weight_decay >= 0.0, "train.weight_decay must be >= 0")?;
        ensure((0.0..1.0).contains(&t.beta1), "train.beta1 must be in [0, 1)")?;
        ensure((0.0..1.0).contains(&t.beta2), "train.beta2 must be in [0, 1)")?;
        ensure(t.eps > 0.0, "train.eps must be > 0")?;
        ensure(t.grad_clip >= 0.0, "train.grad_clip must be >= 0 (0 = off)")?;
        ensure(t.eval_interval > 0, "train.eval_interval must be > 0")?;
        ensure(t.eval_batches > 0, "train.eval_batches must be > 0")?;
        ensure(t.log_interval > 0, "train.log_interval must be > 0")?;
        ensure(t.dtype == "f32" || t.dtype == "bf16", &format!("train.dtype {:?}: use \"f32\" or \"bf16\"", t.dtype))?;
        ensure(t.peak_tflops.is_none_or(|p| p > 0.0), "train.peak_tflops must be > 0")?;
        Ok(())
    }
}

fn ensure(cond: bool, msg: &str) -> Result<()> {
    if !cond {
        bail!("{msg}");
    }
    Ok(())
}

/// Apply one `section.key=value` override. The value is parsed as a TOML value (so numbers,
/// booleans and arrays keep their types); a bare word is taken as a string.
fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, raw) = set.split_once('=').with_context(|| format!("--set {set:?}: expected section.key=value"))?;
    let (section, field) =
        key.trim().split_once('.').with_context(|| format!("--set {set:?}: key must be section.key, e.g. train.lr"))?;
    let raw = raw.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")).map(|mut t| t.remove("v")) {
        Ok(Some(v)) => v,
        _ => toml::Value::String(raw.to_string()),
    };
    let sec = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let sec = sec.as_table_mut().with_context(|| format!("--set {set:?}: {section} is not a section"))?;
    sec.insert(field.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_consecutive_and_balanced() {
        let l = LorsConfig { groups: 2, ..Default::default() };
        let g: Vec<_> = (0..5).map(|i| l.group_of(i, 5)).collect();
        assert_eq!(g, vec![0, 0, 0, 1, 1]);
        let l = LorsConfig { groups: 3, ..Default::default() };
        let g: Vec<_> = (0..6).map(|i| l.group_of(i, 6)).collect();
        assert_eq!(g, vec![0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn set_overrides_keep_types_and_unknown_keys_fail() {
        let sets = vec!["train.lr=0.01".to_string(), "lors.mode=shared".to_string()];
        let c = Config::from_toml_str("[model]\nd_model = 64\n", &sets, "test").unwrap();
        assert_eq!(c.train.lr, 0.01);
        assert_eq!(c.lors.mode, Mode::Shared);
        let err = Config::from_toml_str("[model]\nd_modle = 64\n", &[], "test").unwrap_err();
        assert!(format!("{err:#}").contains("d_modle"), "{err:#}");
        let err = Config::from_toml_str("", &["train.lr=\"fast\"".into()], "test").unwrap_err();
        assert!(format!("{err:#}").contains("lr") || format!("{err:#}").contains("float"), "{err:#}");
    }

    #[test]
    fn schedules_override_ranks() {
        let l = LorsConfig { rank: 8, ffn_rank: Some(4), attn_rank_schedule: Some(vec![2, 6]), ..Default::default() };
        assert_eq!(l.rank_for("q", 0), 2);
        assert_eq!(l.rank_for("o", 1), 6);
        assert_eq!(l.rank_for("up", 1), 4);
        let v = LorsConfig { mode: Mode::Shared, ..Default::default() };
        assert_eq!(v.rank_for("q", 0), 0);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (set, needle) in [
            ("model.n_heads=3", "divisible"),
            ("lors.rank=0", "rank"),
            ("train.seq_len=1000", "max_seq_len"),
            ("train.lr=-1", "train.lr"),
            ("train.warmup_steps=100000", "warmup"),
        ] {
            let err = Config::from_toml_str("", &[set.into()], "t").unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{set}: {err:#}");
        }
    }
}
