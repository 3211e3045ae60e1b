//! RMSNorm over the last dim, `x / sqrt(mean(x²) + eps) · gain`, and its gradients dx and
//! dgain from one backward op.

use super::reduce::{dot3_8, sum8_by};
use super::{assume_written, data, rows_per_task, uninit_output, Real};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `x / sqrt(mean(x²) + eps) · gain` over the last dim; x (..., d), gain (d).
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if gain.dims() != [d] {
        bail!("rms_norm: gain {:?} does not match the last dim {d} of x", gain.dims());
    }
    x.contiguous()?.apply_op2(&gain.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: T) -> T {
    let ms = sum8_by(row, |x| x * x) / T::from_f64(row.len() as f64);
    (ms + eps).sqrt().recip()
}

avx2_dispatch!(
    /// RMSNorm of the rows of x (each gain.len() long) into o.
    fn rms_fwd_rows<T: Real>(o: &mut [MaybeUninit<T>], x: &[T], gain: &[T], eps: T) => rms_fwd_rows_body
);

#[inline(always)]
fn rms_fwd_rows_body<T: Real>(o: &mut [MaybeUninit<T>], x: &[T], gain: &[T], eps: T) {
    let d = gain.len();
    for (o, row) in o.chunks_mut(d).zip(x.chunks(d)) {
        let inv = inv_rms(row, eps);
        for ((o, &x), &g) in o.iter_mut().zip(row).zip(gain) {
            o.write(x * inv * g);
        }
    }
}

avx2_dispatch!(
    /// RMSNorm's input gradient for rows of x and dy into dx, and their gain gradient summed
    /// into dg.
    fn rms_bwd_rows<T: Real>(dx: &mut [MaybeUninit<T>], x: &[T], dy: &[T], gain: &[T], dg: &mut [T], eps: T) => rms_bwd_rows_body
);

#[inline(always)]
fn rms_bwd_rows_body<T: Real>(dx: &mut [MaybeUninit<T>], x: &[T], dy: &[T], gain: &[T], dg: &mut [T], eps: T) {
    let d = gain.len();
    let df = T::from_f64(d as f64);
    for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let inv = inv_rms(x, eps);
        let c = inv * inv * inv * dot3_8(gain, dy, x) / df;
        for ((((dx, &x), &dy), &g), dg) in dx.iter_mut().zip(x).zip(dy).zip(gain).zip(dg.iter_mut()) {
            dx.write(inv * g * dy - x * c);
            *dg += dy * x * inv;
        }
    }
}

fn rms_fwd<T: Real>(s: &CpuStorage, l: &Layout, gs: &CpuStorage, gl: &Layout, eps: f64) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "rms_norm")?;
    let gain = data::<T>(gs, gl, "rms_norm")?;
    let d = gain.len();
    let eps = T::from_f64(eps);
    let mut out = uninit_output(x.len());
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, x)| rms_fwd_rows(o, x, gain, eps));
    // SAFETY: out has the rows of x (d = gain.len() each), and rms_fwd_rows writes every
    // element of each row.
    let out = unsafe { assume_written(out) };
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(s1, self.name(), rms_fwd(s1, l1, s2, l2, self.eps))
    }
    fn bwd(&self, x: &Tensor, gain: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One op computes both gradients, packed as [dx (all of x) ; dgain (d)].
        let packed = x.apply_op3_no_bwd(gain, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let (n, d) = (x.elem_count(), gain.elem_count());
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dg = packed.narrow(0, n, d)?;
        Ok((Some(dx), Some(dg)))
    }
}

/// With u = g ⊙ dy and inv = 1/rms(x): dx = inv·u − x·inv³·(Σ u⊙x)/d; dgain = Σ_rows dy⊙x·inv.
struct RmsNormBwd {
    eps: f64,
}

#[allow(clippy::too_many_arguments)]
fn rms_bwd<T: Real>(
    s: &CpuStorage,
    l: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    dys: &CpuStorage,
    dyl: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "rms_norm backward")?;
    let gain = data::<T>(gs, gl, "rms_norm backward")?;
    let dy = data::<T>(dys, dyl, "rms_norm backward")?;
    let d = gain.len();
    let eps = T::from_f64(eps);
    let mut out = uninit_output(x.len() + d);
    let (dx, dgain) = out.split_at_mut(x.len());
    let chunk = rows_per_task(d) * d;
    // dx row by row in parallel; each task also sums its rows' dgain (in a zeroed buffer),
    // reduced afterwards.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dx, (x, dy))| {
            let mut dg = vec![T::zero(); d];
            rms_bwd_rows(dx, x, dy, gain, &mut dg, eps);
            dg
        })
        .collect();
    for (j, dgain) in dgain.iter_mut().enumerate() {
        dgain.write(partials.iter().fold(T::zero(), |s, p| s + p[j]));
    }
    // SAFETY: dx has the rows of x, each written in full by rms_bwd_rows, and the loop just
    // above writes every element of dgain.
    let out = unsafe { assume_written(out) };
    let len = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }
    cpu_fwd3!(self, rms_bwd(self.eps));
}
