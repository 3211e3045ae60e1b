//! The LORS linear layer: `y = x W_lᵀ` with `W_l = W_shared + B_l · A_l`.
//!
//! * `W_shared` (out×in) is one tensor shared by all layers of a group; every layer holds a
//!   clone of the same variable, so its gradient is the sum over those layers.
//! * `B_l` (out×r) and `A_l` (r×in) are private to layer `l`. As in the LORS paper's code,
//!   `A` is Kaiming-uniform (PyTorch's default `Linear` init: U(±1/√in)), `B` is zero, so every
//!   layer starts equal to the shared weight, and there is no α/r scaling. Both are the
//!   defaults of `[lors] init` and `alpha`; `init = "small"` draws A and B from N(0, 0.02²)
//!   and `alpha` scales the residual by α/r (`W_l = W_shared + (α/r)·B_l A_l`).
//! * Vanilla and fully shared (ALBERT-style) stacks are the same type with no private term.
//!
//! ## Merge per step, or factored?
//! Training uses the merged form `x (W + B A)ᵀ`. With N = batch·seq tokens, the factored
//! form `x Wᵀ + (x Aᵀ) Bᵀ` adds 2·N·r·(in+out) multiply-adds to the forward pass and twice
//! that to the backward pass, while merging costs r·in·out forward and 2·r·in·out backward
//! (dA = Bᵀ dW, dB = dW Aᵀ, where dW = dyᵀ x is needed anyway for the shared base).
//! Merging is cheaper whenever N > in·out / (2·(in+out)), i.e. N > d/4 for square weights:
//! always, for training batches. `benches/lors_merge.rs` measures both
//! (`cargo bench --bench lors_merge`); its numbers are in docs/performance.md. For
//! generation the model merges once at load (`merged()`), so decoding costs exactly what a
//! vanilla model's does.

use crate::config::PrivateInit;
use crate::store::{Init, ParamStore};
use anyhow::Result;
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct LorsLinear {
    /// (out, in): the shared base, or a private full weight.
    base: Tensor,
    /// Private residual: A (r, in), B (out, r).
    residual: Option<(Tensor, Tensor)>,
    /// Multiplier of B·A (α/r, or 1 without α).
    scale: f64,
}

/// The private residual of one layer's projection.
#[derive(Debug, Clone, Copy)]
pub struct Private<'a> {
    /// Name prefix of the factors: `{prefix}.lors_a`, `{prefix}.lors_b`.
    pub prefix: &'a str,
    pub rank: usize,
    pub init: PrivateInit,
    /// Multiplier of B·A.
    pub scale: f64,
}

impl LorsLinear {
    /// Build a projection. `base_name` names the (possibly shared) base weight; `residual`
    /// gives the private factors' name prefix and rank when the layer has a LORS residual.
    pub fn new(
        store: &mut ParamStore,
        base_name: &str,
        (out, inp): (usize, usize),
        private: Option<Private>,
    ) -> Result<Self> {
        let base = store.get(base_name, &[out, inp], Init::Normal(0.02))?;
        let Some(p) = private else { return Ok(Self { base, residual: None, scale: 1.0 }) };
        let (a_init, b_init) = match p.init {
            PrivateInit::Paper => (Init::Uniform(1.0 / (inp as f64).sqrt()), Init::Zeros),
            PrivateInit::Small => (Init::Normal(0.02), Init::Normal(0.02)),
        };
        let a = store.get(&format!("{}.lors_a", p.prefix), &[p.rank, inp], a_init)?;
        let b = store.get(&format!("{}.lors_b", p.prefix), &[out, p.rank], b_init)?;
        Ok(Self { base, residual: Some((a, b)), scale: p.scale })
    }

    /// A layer from explicit tensors (tests, benchmarks), without α scaling.
    pub fn from_parts(base: Tensor, residual: Option<(Tensor, Tensor)>) -> Self {
        Self { base, residual, scale: 1.0 }
    }

    /// `t` times the residual scale (no op without α).
    fn scaled(&self, t: Tensor) -> Result<Tensor> {
        Ok(if self.scale == 1.0 { t } else { (t * self.scale)? })
    }

    /// B·A times the residual scale, (out, in).
    fn delta(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.scaled(b.matmul(a)?)
    }

    /// The effective weight `W + s·B A` (s = α/r, or 1), (out, in).
    pub fn weight(&self) -> Result<Tensor> {
        Ok(match &self.residual {
            Some((a, b)) => (&self.base + self.delta(a, b)?)?,
            None => self.base.clone(),
        })
    }

    /// `x (W + B A)ᵀ` for x of shape (..., in) → (..., out), merging first.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight()?)
    }

    /// `forward` with the matmul in `dtype` (bf16 mixed precision): the weight is merged in
    /// its own dtype (f32), both operands are cast, and the output comes back in x's dtype;
    /// the casts are differentiable, so gradients reach the f32 weights.
    /// With `fused` (CPU, f32/f64) the merge `W + s·B A` is one op (`ops::lors_merge`) that
    /// stores no `B A` intermediate.
    pub fn forward_as(&self, x: &Tensor, dtype: DType, fused: bool) -> Result<Tensor> {
        linear_as(x, &self.weight_as(fused)?, dtype)
    }

    /// `weight`, with the merge as one op (`ops::lors_merge`) when `fused` (CPU, f32/f64).
    pub fn weight_as(&self, fused: bool) -> Result<Tensor> {
        match &self.residual {
            Some((a, b)) if fused && crate::ops::supported(&self.base) => {
                Ok(crate::ops::lors_merge(&self.base, b, a, self.scale)?)
            }
            _ => self.weight(),
        }
    }

    /// `x Wᵀ + (x Aᵀ) Bᵀ`: the same map without forming `B A` (for the benchmark and tests).
    pub fn forward_factored(&self, x: &Tensor) -> Result<Tensor> {
        let y = linear(x, &self.base)?;
        Ok(match &self.residual {
            Some((a, b)) => (y + self.scaled(linear(&linear(x, a)?, b)?)?)?,
            None => y,
        })
    }

    /// A plain linear layer holding the merged weight, detached from the graph (generation).
    pub fn merged(&self) -> Result<Self> {
        Ok(Self { base: self.weight()?.detach(), residual: None, scale: 1.0 })
    }

    pub fn rank(&self) -> usize {
        self.residual.as_ref().map_or(0, |(a, _)| a.dims()[0])
    }

    /// ‖s·B A‖_F / ‖W_shared‖_F: how far this layer has moved from its shared base.
    pub fn residual_ratio(&self) -> Result<f32> {
        let Some((a, b)) = &self.residual else { return Ok(0.0) };
        let ba = self.delta(a, b)?.detach();
        let num = ba.sqr()?.sum_all()?.sqrt()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let den = self.base.detach().sqr()?.sum_all()?.sqrt()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        Ok(num / den.max(f32::MIN_POSITIVE))
    }
}

/// `linear` computed in `dtype` (a no-op cast when x already has it), returned in x's dtype.
pub fn linear_as(x: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype && w.dtype() == dtype {
        return linear(x, w);
    }
    Ok(linear(&x.to_dtype(dtype)?, &w.to_dtype(dtype)?)?.to_dtype(x.dtype())?)
}

/// `x wᵀ` for x (..., in) and w (out, in), flattening the leading dims into one matmul.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inp = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let out = w.dims()[0];
    // (N, in) x (in, out) -> (N, out)
    let y = x.reshape((lead, inp))?.matmul(&w.t()?)?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(out);
    Ok(y.reshape(shape)?)
}
