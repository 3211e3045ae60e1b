//! Rotary position embedding (HF rotate_half convention) fused with the head transpose
//! (B, T, H, hd) → (B, H, T, hd); its backward pass is the inverse map, rotating by −θ.

use super::{assume_written, data, rows_per_task, uninit_output, Real};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rotary embedding (HF rotate_half convention) of x (B, T, H, hd) at positions
/// offset..offset+T, returned transposed to (B, H, T, hd) and contiguous: what
/// `x.transpose(1, 2).contiguous()` followed by RoPE gives. `cos`/`sin` are the (max_T, hd)
/// tables with each frequency in both halves.
pub fn rope_t(x: &Tensor, cos: &Tensor, sin: &Tensor, offset: usize) -> Result<Tensor> {
    let (_, t, _, hd) = x.dims4()?;
    if hd % 2 != 0 || cos.dims2()?.1 != hd || offset + t > cos.dims2()?.0 || sin.dims() != cos.dims() {
        bail!("rope_t: x {:?} does not fit the tables {:?} at offset {offset}", x.dims(), cos.dims());
    }
    let (cos, sin) = (cos.narrow(0, offset, t)?.contiguous()?, sin.narrow(0, offset, t)?.contiguous()?);
    x.contiguous()?.apply_op3(&cos, &sin, Rope { inverse: false })
}

/// Forward: (B, T, H, hd) → (B, H, T, hd) rotating by +θ. Inverse (the backward pass):
/// (B, H, T, hd) → (B, T, H, hd) rotating by −θ, which is the transpose of the forward map.
struct Rope {
    inverse: bool,
}

fn rope_kernel<T: Real>(
    s: &CpuStorage,
    l: &Layout,
    cs: &CpuStorage,
    cl: &Layout,
    ss: &CpuStorage,
    sl: &Layout,
    inverse: bool,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "rope")?;
    let cos = data::<T>(cs, cl, "rope")?;
    let sin = data::<T>(ss, sl, "rope")?;
    let (b, d1, d2, hd) = l.shape().dims4()?;
    // Forward: input (B, T, H, hd); inverse: input (B, H, T, hd).
    let (t, h) = if inverse { (d2, d1) } else { (d1, d2) };
    let mut out = uninit_output(x.len());
    // One output row of hd values per (b, d1', d2') of the output layout.
    out.par_chunks_mut(hd).enumerate().with_min_len(rows_per_task(hd)).for_each(|(r, o)| {
        let (bi, rest) = (r / (d1 * d2), r % (d1 * d2));
        // Output index (b, h, t) forward, (b, t, h) inverse; source is the other layout.
        let (hi, ti) = if inverse { (rest % h, rest / h) } else { (rest / t, rest % t) };
        let src = if inverse { ((bi * h + hi) * t + ti) * hd } else { ((bi * t + ti) * h + hi) * hd };
        rotate_row(o, &x[src..src + hd], &cos[ti * hd..ti * hd + hd], &sin[ti * hd..ti * hd + hd], inverse);
    });
    // SAFETY: out has rows of hd (even: checked by `rope_t`), and rotate_row writes all of
    // each row.
    let out = unsafe { assume_written(out) };
    let shape = if inverse { (b, t, h, hd) } else { (b, h, t, hd) };
    Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
}

/// One head row x (hd values, hd even) rotated by +θ (by −θ when `inverse`) into o, which it
/// writes in full; rotate_half convention; c and sn are the position's table rows (each
/// frequency in both halves).
#[inline]
pub(super) fn rotate_row<T: Real>(o: &mut [MaybeUninit<T>], x: &[T], c: &[T], sn: &[T], inverse: bool) {
    let half = x.len() / 2;
    for j in 0..half {
        let (x1, x2) = (x[j], x[j + half]);
        let (c1, c2) = (c[j], c[j + half]);
        let (s1, s2) = if inverse { (-sn[j], -sn[j + half]) } else { (sn[j], sn[j + half]) };
        o[j].write(x1 * c1 - x2 * s1);
        o[j + half].write(x2 * c2 + x1 * s2);
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope-transpose"
    }
    cpu_fwd3!(self, rope_kernel(self.inverse));
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: true })?;
        Ok((Some(dx), None, None))
    }
}
