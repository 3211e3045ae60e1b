//! Run configuration: a TOML file with sections `[model]`, `[lors]`, `[train]`, `[data]`,
//! overridable with `--set section.key=value`. Unknown keys and wrong types are errors that
//! name the key. The resolved config is saved as `RUN_DIR/config.toml` and next to every
//! checkpoint, so `generate` needs nothing but the run directory.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::model::config::ModelConfig;
pub use crate::model::lors::{LorsConfig, Mode, ParamOptions, PrivateInit, Proj};

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
    /// Learning rate after warmup: "cosine" (down to min_lr at max_steps) or "wsd"
    /// (warmup-stable-decay: held at lr, then linear down to min_lr over the last
    /// `decay_frac` of the steps; train/schedule.rs).
    pub schedule: Schedule,
    /// With schedule = "wsd": the fraction of max_steps, at the end, over which lr decays.
    pub decay_frac: f64,
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
    /// Knowledge distillation: the teacher model (a run directory, a Hugging Face Llama
    /// directory or hf:OWNER/NAME; `--teacher` sets it); "" = none.
    pub teacher: String,
    /// Weight α of the distillation term: loss = (1−α)·CE + α·T²·KL(teacher ‖ student).
    pub distill_alpha: f64,
    /// Temperature T that softens both distributions in the KL term.
    pub distill_temperature: f64,
    /// Where the initial weights came from (`--init-from`; recorded for provenance).
    pub init_from: String,
}

impl TrainConfig {
    /// Steps over which a wsd schedule decays: `decay_frac` of `max_steps`, at least 1.
    pub fn decay_steps(&self) -> usize {
        ((self.decay_frac * self.max_steps as f64).round() as usize).clamp(1, self.max_steps.max(1))
    }

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
            schedule: Schedule::Cosine,
            decay_frac: 0.2,
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
            teacher: String::new(),
            distill_alpha: 0.0,
            distill_temperature: 1.0,
            init_from: String::new(),
        }
    }
}

/// The shape of the learning rate after warmup (`train.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine from lr down to min_lr at max_steps.
    #[default]
    Cosine,
    /// Warmup-stable-decay: lr held, then linear down to min_lr over the last decay_frac.
    Wsd,
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

    /// This config with `--set section.key=value` overrides applied (and validated).
    pub fn with_sets(&self, sets: &[String], origin: &str) -> Result<Self> {
        Self::from_toml_str(&self.to_toml()?, sets, origin)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The keys whose values differ between two configs, as `section.key (ours vs theirs)`.
    pub fn differences(&self, other: &Config) -> Result<Vec<String>> {
        let table = |c: &Config| -> Result<toml::Table> { Ok(toml::Table::try_from(c)?) };
        let (ours, theirs) = (table(self)?, table(other)?);
        let mut out = vec![];
        let empty = toml::Table::new();
        let mut sections: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
        sections.sort();
        sections.dedup();
        for section in sections {
            let (a, b) = (section_of(&ours, section, &empty), section_of(&theirs, section, &empty));
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let show = |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
                if a.get(key) != b.get(key) {
                    out.push(format!("{section}.{key} ({} vs {})", show(a.get(key)), show(b.get(key))));
                }
            }
        }
        Ok(out)
    }

    /// Range checks that the types cannot express. Vocabulary 0 is allowed here (resolved
    /// from the data later).
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let l = &self.lors;
        let t = &self.train;
        m.validate()?;
        l.validate(m)?;
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
        ensure(t.decay_frac > 0.0 && t.decay_frac <= 1.0, "train.decay_frac must be in (0, 1]")?;
        if t.schedule == Schedule::Wsd {
            let decay = t.decay_steps();
            ensure(
                t.warmup_steps <= t.max_steps - decay,
                &format!(
                    "train.warmup_steps ({}) runs into the decay (the last {decay} of train.max_steps = {}): lower one of them or train.decay_frac",
                    t.warmup_steps, t.max_steps
                ),
            )?;
        }
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
        ensure((0.0..=1.0).contains(&t.distill_alpha), "train.distill_alpha must be in [0, 1]")?;
        ensure(t.distill_temperature > 0.0, "train.distill_temperature must be > 0")?;
        ensure(
            t.distill_alpha == 0.0 || !t.teacher.is_empty(),
            "train.distill_alpha > 0 needs a teacher: pass --teacher RUN_DIR|HF_DIR (or set train.teacher)",
        )?;
        Ok(())
    }
}

/// A section of a serialized config (an empty table when absent or not a table).
fn section_of<'a>(t: &'a toml::Table, name: &str, empty: &'a toml::Table) -> &'a toml::Table {
    t.get(name).and_then(toml::Value::as_table).unwrap_or(empty)
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
