//! The model's operations behind one value, [`Ops`]: the model calls `ops.rms_norm(..)`,
//! `ops.attention(..)` and so on, and never asks which implementation runs.
//!
//! * [`Ops::Fused`]: our fused CPU kernels (`crate::kernels`), each a candle custom op with a
//!   hand-written backward pass; CPU, f32/f64 only.
//! * [`Ops::Plain`]: differentiable compositions of basic candle ops; every device and dtype,
//!   and the reference the kernels are tested against. (candle's own fused `softmax_last_dim`,
//!   `rms_norm` and `rope` build no backward op and would silently stop the gradient; see
//!   shared/CANDLE_NOTES.md.)

use crate::kernels;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// Which implementation of the model's operations runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    /// The fused CPU kernels (f32/f64 on the CPU).
    Fused,
    /// Compositions of basic candle ops (anywhere).
    Plain,
}

impl Ops {
    /// The fastest implementation that can run on `t`'s device and dtype.
    pub fn best_for(t: &Tensor) -> Ops {
        if kernels::supported(t) {
            Ops::Fused
        } else {
            Ops::Plain
        }
    }

    /// `self`, checked against where it has to run.
    pub fn check(self, t: &Tensor) -> Result<Ops> {
        if self == Ops::Fused && !kernels::supported(t) {
            bail!("the fused kernels run on the CPU in f32/f64 only (here: {:?}, {:?})", t.device(), t.dtype());
        }
        Ok(self)
    }

    /// RMSNorm `x / sqrt(mean(x²) + eps) * g` over the last dim.
    pub fn rms_norm(self, x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::rms_norm(x, gain, eps)?);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
        let inv = (ms + eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(gain)?)
    }

    /// RoPE ("rotate_half" convention) on x (B, T, H, hd) at positions offset..offset+T, with
    /// tables cos/sin (max_seq_len, hd) → (B, H, T, hd), contiguous.
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor, offset: usize) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::rope_t(x, cos, sin, offset)?);
        }
        let x = x.transpose(1, 2)?.contiguous()?; // (B, T, H, hd) -> (B, H, T, hd)
        let (_, _, t, hd) = x.dims4()?;
        let cos = cos.narrow(0, offset, t)?; // (T, hd)
        let sin = sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?; // (B, H, T, hd/2)
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // rotate_half(x)
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }

    /// Causal attention of q (B, H, T, hd) over k, v (B, Hkv, S, hd), S ≥ T: query i sits at key
    /// position S − T + i and sees keys 0..=S − T + i. Grouped-query when Hkv < H.
    /// Returns (B, T, H·hd). The matmuls of the plain version run in `mm`.
    pub fn attention(self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mm: DType) -> Result<Tensor> {
        let (b, h, t, hd) = q.dims4()?;
        if self == Ops::Fused {
            // One kernel: scores, causal softmax and P·v per head, GQA included.
            return Ok(kernels::attention(q, k, v, scale)?.reshape((b, t, h * hd))?);
            // (B, T, H, hd) -> (B, T, H·hd)
        }
        let (_, hkv, s, _) = k.dims4()?;
        let (k, v) = if h != hkv {
            // GQA: (B, Hkv, S, hd) -> (B, Hkv, rep, S, hd) -> (B, H, S, hd)
            let rep = h / hkv;
            let expand = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?.broadcast_as((b, hkv, rep, s, hd))?.reshape((b, h, s, hd))?)
            };
            (expand(k)?, expand(v)?)
        } else {
            (k.clone(), v.clone())
        };
        let att = (matmul_as(q, &k.t()?, mm)? * scale)?; // (B, H, T, S)
        let att = match causal_mask(t, s, att.dtype(), att.device())? {
            Some(mask) => att.broadcast_add(&mask)?,
            None => att,
        };
        let y = matmul_as(&softmax_last(&att)?, &v, mm)?; // (B, H, T, hd)
        Ok(y.transpose(1, 2)?.reshape((b, t, h * hd))?) // (B, H, T, hd) -> (B, T, H·hd)
    }

    /// Attention on packed projections qkv (B, T, (H + 2·Hkv)·hd) = [q | k | v] of positions
    /// offset..offset+T (no cache): q and k rotated, then causal attention → (B, T, H·hd).
    pub fn attention_qkv(
        self,
        qkv: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        offset: usize,
        (h, hkv): (usize, usize),
        scale: f64,
        mm: DType,
    ) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::attention_qkv(qkv, cos, sin, offset, (h, hkv), scale)?);
        }
        let (q, k, v) = self.split_qkv(qkv, (cos, sin), offset, (h, hkv))?;
        self.attention(&q, &k, &v, scale, mm)
    }

    /// Packed qkv (B, T, (H + 2·Hkv)·hd) → q (B, H, T, hd) and k (B, Hkv, T, hd), both rotated,
    /// and v (B, Hkv, T, hd).
    pub fn split_qkv(
        self,
        qkv: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        offset: usize,
        (h, hkv): (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, width) = qkv.dims3()?;
        let hd = width / (h + 2 * hkv);
        let part = |start: usize, heads: usize| -> Result<Tensor> {
            Ok(qkv.narrow(2, start * hd, heads * hd)?.reshape((b, t, heads, hd))?)
            // (B, T, heads, hd)
        };
        let q = self.rope(&part(0, h)?, cos, sin, offset)?; // (B, H, T, hd)
        let k = self.rope(&part(h, hkv)?, cos, sin, offset)?; // (B, Hkv, T, hd)
        let v = part(h + hkv, hkv)?.transpose(1, 2)?.contiguous()?; // (B, T, Hkv, hd) -> (B, Hkv, T, hd)
        Ok((q, k, v))
    }

    /// SwiGLU on packed [gate | up] (..., 2·F) → silu(gate)·up (..., F).
    pub fn swiglu_packed(self, gu: &Tensor) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::swiglu_packed(gu)?);
        }
        let f = gu.dim(D::Minus1)? / 2;
        let (gate, up) = (gu.narrow(D::Minus1, 0, f)?, gu.narrow(D::Minus1, f, f)?);
        Ok((gate.silu()? * up)?)
    }

    /// The LORS merge `W + s·B A` (out, in) from W (out, in), B (out, r), A (r, in); the fused
    /// version stores no `B A` intermediate.
    pub fn lors_merge(self, w: &Tensor, b: &Tensor, a: &Tensor, scale: f64) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::lors_merge(w, b, a, scale)?);
        }
        let ba = b.matmul(a)?;
        Ok((w + if scale == 1.0 { ba } else { (ba * scale)? })?)
    }

    /// Mean cross-entropy of logits (N, V) against targets (N,) u32.
    pub fn cross_entropy(self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::cross_entropy(logits, targets)?.mean_all()?);
        }
        Ok(candle_nn::loss::cross_entropy(logits, targets)?)
    }

    /// Mean over rows of KL(softmax(teacher / T) ‖ softmax(student / T)) for logits (N, V),
    /// differentiable in the student's logits (the teacher is detached).
    pub fn kl_divergence(self, teacher: &Tensor, student: &Tensor, temperature: f64) -> Result<Tensor> {
        if self == Ops::Fused {
            return Ok(kernels::kl_div(student, teacher, temperature)?.mean_all()?);
        }
        let log_q = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?; // (N, V)
        let log_p = candle_nn::ops::log_softmax(&(teacher.detach() / temperature)?, D::Minus1)?;
        let p = log_p.exp()?;
        Ok((p * (log_p - log_q)?)?.sum(D::Minus1)?.mean_all()?) // Σ_v p (log p − log q), mean over rows
    }

    /// Mean cross-entropy of the LM head `x wᵀ` (x (N, d), w (V, d)) against targets (N,):
    /// the fused version never stores the logits or their gradient.
    pub fn linear_cross_entropy(self, x: &Tensor, w: &Tensor, targets: &Tensor, mm: DType) -> Result<Tensor> {
        if self == Ops::Fused && mm == x.dtype() {
            return Ok(kernels::linear_cross_entropy(x, w, targets)?.mean_all()?);
        }
        self.cross_entropy(&linear_as(x, w, mm)?, targets)
    }
}

/// `x wᵀ` for x (..., in) and w (out, in) → (..., out), computed in `dtype` (a no-op cast
/// when both already have it) and returned in x's dtype: mixed precision whose casts are
/// differentiable, so gradients reach f32 weights.
pub fn linear_as(x: &Tensor, w: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() != dtype || w.dtype() != dtype {
        return Ok(linear_as(&x.to_dtype(dtype)?, &w.to_dtype(dtype)?, dtype)?.to_dtype(x.dtype())?);
    }
    let dims = x.dims();
    let inp = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(w.dim(0)?);
    let y = x.reshape((lead, inp))?.matmul(&w.t()?)?; // (N, in) x (in, out) -> (N, out)
    Ok(y.reshape(shape)?) // (N, out) -> (..., out)
}

/// `a.matmul(b)` computed in `dtype`, returned in a's dtype (mixed precision).
fn matmul_as(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if a.dtype() == dtype {
        return Ok(a.matmul(b)?);
    }
    Ok(a.to_dtype(dtype)?.matmul(&b.to_dtype(dtype)?)?.to_dtype(a.dtype())?)
}

/// Softmax over the last dim. The max is detached: softmax does not depend on it, so its
/// gradient contribution is exactly zero and need not be built.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Additive causal mask (T, S) for T queries at the last T of S key positions: 0 where key
/// j <= S − T + i, −inf after. None when no query can see a later key (T = 1).
fn causal_mask(t: usize, s: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let past = s - t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), device)?.to_dtype(dtype)?))
}
