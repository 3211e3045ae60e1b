//! Knowledge distillation (Hinton et al., 2015): the student learns from the data and from a
//! teacher's softened next-token distribution on the same batch,
//!
//! ```text
//! loss = (1 − α)·CE(student, targets) + α·T²·KL(p_teacher^T ‖ p_student^T)
//! p^T = softmax(logits / T)
//! ```
//! each term the mean over positions; T² keeps the gradient of the soft term on the scale of
//! the hard one as T changes. The teacher runs without a graph (merged, detached).

use crate::model::{Model, Ops};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// A teacher and how much to listen to it.
pub struct Distill {
    /// The teacher, merged and detached (no graph is built through it).
    teacher: Model,
    pub alpha: f64,
    pub temperature: f64,
}

/// The distillation loss of one batch, with its two parts as numbers (for logs).
pub struct DistillLoss {
    pub loss: Tensor,
    pub ce: f64,
    pub kl: f64,
}

impl Distill {
    /// `teacher` must predict over the same vocabulary as the student.
    pub fn new(teacher: &Model, student: &Model, alpha: f64, temperature: f64) -> Result<Self> {
        if teacher.cfg.vocab_size != student.cfg.vocab_size {
            bail!(
                "the teacher predicts over {} tokens and the student over {}: they need the same tokenizer",
                teacher.cfg.vocab_size,
                student.cfg.vocab_size
            );
        }
        if !(0.0..=1.0).contains(&alpha) || temperature <= 0.0 {
            bail!("distillation needs α in [0, 1] and T > 0 (got α = {alpha}, T = {temperature})");
        }
        Ok(Self { teacher: teacher.merged()?, alpha, temperature })
    }

    /// The loss of the student on inputs `x` (B, T) with `targets` (B, T).
    pub fn loss(&self, student: &Model, x: &Tensor, targets: &Tensor) -> Result<DistillLoss> {
        let logits = student.forward(x)?; // (B, T, V)
        let ce = Model::loss_with(student.ops(), &logits, targets)?;
        let teacher = self.teacher.forward(x)?.detach(); // (B, T, V)
        let kl = kl_divergence(student.ops(), &teacher, &logits, self.temperature)?;
        let (a, t) = (self.alpha, self.temperature);
        let loss = ((&ce * (1.0 - a))? + (&kl * (a * t * t))?)?;
        let scalar = |x: &Tensor| -> Result<f64> { Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok(DistillLoss { ce: scalar(&ce)?, kl: scalar(&kl)?, loss })
    }
}

/// Mean over positions of KL(softmax(teacher / T) ‖ softmax(student / T)), for logits
/// (B, T, V); differentiable in the student's logits. `ops` picks the fused CPU kernel or
/// the plain candle composition (`Ops` in `model/ops.rs`).
pub fn kl_divergence(ops: Ops, teacher: &Tensor, student: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, t, v) = student.dims3()?;
    ops.kl_divergence(&teacher.reshape((b * t, v))?, &student.reshape((b * t, v))?, temperature)
    // (B·T, V)
}
