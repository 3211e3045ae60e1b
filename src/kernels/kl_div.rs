//! KL divergence of softened distributions, for distillation: per row of student logits z
//! and teacher logits t (a constant), at temperature T,
//!
//! ```text
//! p = softmax(t / T), q = softmax(z / T)
//! KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) = Σ_v p_v ((t_v − z_v) / T − lse_t + lse_z)
//! ∂KL/∂z_v  = (q_v − p_v) / T
//! ```
//! with `lse` the log-sum-exp of the row over T. Replaces two log-softmaxes, an exp, a
//! subtraction, a product and a sum over (N, V) (and as many tensors again in the backward
//! pass) by one read of each row.

use super::reduce::{max8, sum8_by};
use super::{assume_written, data, uninit_output, Real};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Per-row KL(softmax(teacher / T) ‖ softmax(student / T)) of logits (N, V) → (N,).
/// Differentiable in the student's logits only (the teacher is a constant).
pub fn kl_div(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n, v) = student.dims2()?;
    if teacher.dims2()? != (n, v) {
        bail!("kl_div: student logits {:?} but teacher logits {:?}", student.dims(), teacher.dims());
    }
    if teacher.dtype() != student.dtype() {
        bail!("kl_div: student {:?} but teacher {:?}", student.dtype(), teacher.dtype());
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("kl_div: the temperature must be positive (got {temperature})");
    }
    student.contiguous()?.apply_op2(&teacher.detach().contiguous()?, KlDiv { temperature })
}

#[derive(Clone, Copy)]
struct KlDiv {
    temperature: f64,
}

/// log Σ exp(x / T) over a row, as `m + ln Σ exp(x/T − m)` with m the row's maximum over T.
fn lse<T: Real>(row: &[T], inv_t: T) -> T {
    let m = max8(row) * inv_t;
    m + sum8_by(row, |x| (x * inv_t - m).fast_exp()).ln()
}

/// KL of one row: Σ p_v ((t_v − z_v)/T − lse_t + lse_z), eight running sums.
fn kl_row<T: Real>(z: &[T], t: &[T], inv_t: T) -> T {
    let (lz, lt) = (lse(z, inv_t), lse(t, inv_t));
    let term = |zv: T, tv: T| (tv * inv_t - lt).fast_exp() * ((tv - zv) * inv_t - lt + lz);
    let mut acc = [T::zero(); 8];
    let (mut cz, mut ct) = (z.chunks_exact(8), t.chunks_exact(8));
    for (a, b) in (&mut cz).zip(&mut ct) {
        for k in 0..8 {
            acc[k] += term(a[k], b[k]);
        }
    }
    let rest = cz.remainder().iter().zip(ct.remainder()).fold(T::zero(), |s, (&a, &b)| s + term(a, b));
    acc.iter().fold(rest, |s, &a| s + a)
}

/// `g · (q − p) / T` for one row into `out`.
fn kl_row_grad<T: Real>(out: &mut [MaybeUninit<T>], z: &[T], t: &[T], g: T, inv_t: T) {
    let (lz, lt) = (lse(z, inv_t), lse(t, inv_t));
    let scale = g * inv_t;
    for ((o, &zv), &tv) in out.iter_mut().zip(z).zip(t) {
        o.write(scale * ((zv * inv_t - lz).fast_exp() - (tv * inv_t - lt).fast_exp()));
    }
}

fn kl_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    temp: f64,
) -> Result<(CpuStorage, Shape)> {
    let (z, t) = (data::<T>(s1, l1, "kl_div")?, data::<T>(s2, l2, "kl_div")?);
    let v = l1.dims()[1];
    let inv_t = T::from_f64(1.0 / temp);
    let out: Vec<T> = z.par_chunks(v).zip(t.par_chunks(v)).map(|(zr, tr)| kl_row(zr, tr, inv_t)).collect();
    let n = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
}

impl CustomOp2 for KlDiv {
    fn name(&self) -> &'static str {
        "fused-kl-div"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(s1, self.name(), kl_fwd(s1, l1, s2, l2, self.temperature))
    }
    fn bwd(&self, z: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = z.apply_op3_no_bwd(t, &grad.contiguous()?, &KlDivBwd { temperature: self.temperature })?;
        Ok((Some(g), None))
    }
}

/// d z = g_i · (softmax(z_i / T) − softmax(t_i / T)) / T.
struct KlDivBwd {
    temperature: f64,
}

fn kl_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    temp: f64,
) -> Result<(CpuStorage, Shape)> {
    let (z, t) = (data::<T>(s1, l1, "kl_div backward")?, data::<T>(s2, l2, "kl_div backward")?);
    let g = data::<T>(s3, l3, "kl_div backward")?;
    let v = l1.dims()[1];
    let inv_t = T::from_f64(1.0 / temp);
    let mut out = uninit_output(z.len());
    out.par_chunks_mut(v).zip(z.par_chunks(v).zip(t.par_chunks(v))).enumerate().for_each(|(i, (o, (zr, tr)))| {
        kl_row_grad(o, zr, tr, g[i], inv_t);
    });
    // SAFETY: out has the rows of z, and kl_row_grad writes every element of each row.
    let out = unsafe { assume_written(out) };
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp3 for KlDivBwd {
    fn name(&self) -> &'static str {
        "fused-kl-div-bwd"
    }
    cpu_fwd3!(self, kl_bwd(self.temperature));
}
