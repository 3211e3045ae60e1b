//! SwiGLU, `silu(gate) ⊙ up`: on separate gate and up tensors ([`swiglu`]), or on one packed
//! [gate | up] projection ([`swiglu_packed`]); both backward passes give dgate and dup from
//! one pass.

use super::{assume_written, data, rows_per_task, uninit_output, Real};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `silu(gate) ⊙ up`, both of the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!("swiglu: gate {:?} and up {:?} differ in shape", gate.dims(), up.dims());
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).fast_exp()).recip()
}

fn swiglu_fwd<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = data::<T>(s1, l1, "swiglu")?;
    let u = data::<T>(s2, l2, "swiglu")?;
    let mut out = uninit_output(g.len());
    out.par_chunks_mut(16384).zip(g.par_chunks(16384).zip(u.par_chunks(16384))).for_each(|(o, (g, u))| {
        swiglu_slice(o, g, u);
    });
    // SAFETY: out, g and u have the same length and the same chunks, and swiglu_slice writes
    // all of each chunk.
    let out = unsafe { assume_written(out) };
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

avx2_dispatch!(
    /// o = silu(g) ⊙ u, all three of the same length (o written in full).
    fn swiglu_slice<T: Real>(o: &mut [MaybeUninit<T>], g: &[T], u: &[T]) => swiglu_slice_body
);

#[inline(always)]
fn swiglu_slice_body<T: Real>(o: &mut [MaybeUninit<T>], g: &[T], u: &[T]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        o.write(g * sigmoid(g) * u);
    }
}

avx2_dispatch!(
    /// With s = σ(g): dgate = dy·u·s·(1 + g·(1 − s)), dup = dy·g·s (dg and du written in full,
    /// all five slices of the same length).
    fn swiglu_bwd_slice<T: Real>(dg: &mut [MaybeUninit<T>], du: &mut [MaybeUninit<T>], g: &[T], u: &[T], dy: &[T]) => swiglu_bwd_slice_body
);

#[inline(always)]
fn swiglu_bwd_slice_body<T: Real>(dg: &mut [MaybeUninit<T>], du: &mut [MaybeUninit<T>], g: &[T], u: &[T], dy: &[T]) {
    for i in 0..g.len() {
        let s = sigmoid(g[i]);
        dg[i].write(dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s)));
        du[i].write(dy[i] * g[i] * s);
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(s1, self.name(), swiglu_fwd(s1, l1, s2, l2))
    }
    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Packed [dgate ; dup] from one pass.
        let packed = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluBwd)?;
        let n = gate.elem_count();
        let dg = packed.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = packed.narrow(0, n, n)?.reshape(gate.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

/// Packed [dgate ; dup] (see `swiglu_bwd_slice`).
struct SwiGluBwd;

fn swiglu_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let g = data::<T>(s1, l1, "swiglu backward")?;
    let u = data::<T>(s2, l2, "swiglu backward")?;
    let dy = data::<T>(s3, l3, "swiglu backward")?;
    let n = g.len();
    let mut out = uninit_output(2 * n);
    let (dg, du) = out.split_at_mut(n);
    const C: usize = 16384;
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .zip(g.par_chunks(C).zip(u.par_chunks(C)).zip(dy.par_chunks(C)))
        .for_each(|((dg, du), ((g, u), dy))| swiglu_bwd_slice(dg, du, g, u, dy));
    // SAFETY: dg, du, g, u and dy all have n elements in the same chunks, and swiglu_bwd_slice
    // writes all of each dg and du chunk.
    let out = unsafe { assume_written(out) };
    Ok((T::to_cpu_storage_owned(out), Shape::from(2 * n)))
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }
    cpu_fwd3!(self, swiglu_bwd());
}

/// `silu(gate) ⊙ up` from one packed projection gu (..., 2F) whose rows are [gate | up]
/// → (..., F). The backward pass returns the packed gradient [dgate | dup] (..., 2F), so the
/// gate and up projections run as one matmul with nothing split or concatenated.
pub fn swiglu_packed(gu: &Tensor) -> Result<Tensor> {
    let w = gu.dims().last().copied().unwrap_or(0);
    if w == 0 || w % 2 != 0 {
        bail!("swiglu_packed: the last dim of {:?} must be 2·ffn_hidden, [gate | up]", gu.dims());
    }
    gu.contiguous()?.apply_op1(SwiGluPacked)
}

struct SwiGluPacked;

fn swiglu_packed_fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "swiglu_packed")?;
    let mut dims = l.dims().to_vec();
    let f = dims[dims.len() - 1] / 2;
    let mut out = uninit_output(x.len() / 2);
    out.par_chunks_mut(f)
        .zip(x.par_chunks(2 * f))
        .with_min_len(rows_per_task(f))
        .for_each(|(o, row)| swiglu_slice(o, &row[..f], &row[f..]));
    // SAFETY: out has a row of f per row of 2f in x, and swiglu_slice writes all of it.
    let out = unsafe { assume_written(out) };
    *dims.last_mut().expect("checked non-empty") = f;
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "fused-swiglu-packed"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(s, self.name(), swiglu_packed_fwd(s, l))
    }
    fn bwd(&self, gu: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gu.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluPackedBwd)?))
    }
}

/// [dgate | dup] (..., 2F) from gu (..., 2F) and dy (..., F).
struct SwiGluPackedBwd;

fn swiglu_packed_bwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s1, l1, "swiglu_packed backward")?;
    let dy = data::<T>(s2, l2, "swiglu_packed backward")?;
    let f = l1.dims()[l1.dims().len() - 1] / 2;
    let mut out = uninit_output(x.len());
    out.par_chunks_mut(2 * f).zip(x.par_chunks(2 * f).zip(dy.par_chunks(f))).with_min_len(rows_per_task(f)).for_each(
        |(o, (row, dy))| {
            let (dg, du) = o.split_at_mut(f);
            swiglu_bwd_slice(dg, du, &row[..f], &row[f..], dy);
        },
    );
    // SAFETY: out has x's rows of 2f, and swiglu_bwd_slice writes both halves of each.
    let out = unsafe { assume_written(out) };
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for SwiGluPackedBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-packed-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(s1, self.name(), swiglu_packed_bwd(s1, l1, s2, l2))
    }
}
