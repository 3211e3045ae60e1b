//! Cross-entropy of logits against class targets: the per-row loss
//! `logsumexp(x_i) − x_i[t_i]`, and its gradient `g·(softmax − onehot)`.

use super::reduce::{max8, sum8_by};
use super::{assume_written, data, uninit_output, Real};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Per-row cross-entropy `logsumexp(x_i) − x_i[t_i]` of logits (N, V) against targets (N,)
/// u32 → (N,). Differentiable in the logits.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let targets: Vec<u32> = targets.to_dtype(DType::U32)?.to_vec1()?;
    if targets.len() != n {
        bail!("cross_entropy: {n} rows of logits but {} targets", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("cross_entropy: target {t} out of range for {v} classes");
    }
    logits.contiguous()?.apply_op1(CrossEntropy { targets: Arc::new(targets) })
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

/// Cross-entropy of one row of logits against target t: `logsumexp(row) − row[t]`.
pub(super) fn ce_row_loss<T: Real>(row: &[T], t: usize) -> T {
    let max = max8(row);
    max + sum8_by(row, |x| (x - max).fast_exp()).ln() - row[t]
}

/// Gradient of `g · ce_row_loss(row, t)` into `out`: `g · (softmax(row) − onehot(t))`, with
/// logsumexp recovered from the row's loss as `loss + row[t]`.
fn ce_row_grad<T: Real>(out: &mut [MaybeUninit<T>], row: &[T], loss: T, g: T, t: usize) {
    let lse = loss + row[t];
    for (o, &x) in out.iter_mut().zip(row) {
        o.write(g * (x - lse).fast_exp());
    }
    out[t].write(g * (row[t] - lse).fast_exp() - g);
}

/// `ce_row_grad` overwriting the row of logits with its gradient.
pub(super) fn ce_row_grad_in_place<T: Real>(row: &mut [T], loss: T, g: T, t: usize) {
    let lse = loss + row[t];
    row.iter_mut().for_each(|z| *z = g * (*z - lse).fast_exp());
    row[t] -= g;
}

fn ce_fwd<T: Real>(s: &CpuStorage, l: &Layout, targets: &[u32]) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "cross_entropy")?;
    let v = l.dims()[1];
    let loss: Vec<T> = x.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| ce_row_loss(row, t as usize)).collect();
    let n = loss.len();
    Ok((T::to_cpu_storage_owned(loss), Shape::from(n)))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        float_dispatch!(s, self.name(), ce_fwd(s, l, &self.targets))
    }
    fn bwd(&self, logits: &Tensor, loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g =
            logits.apply_op3_no_bwd(loss, &grad.contiguous()?, &CrossEntropyBwd { targets: self.targets.clone() })?;
        Ok(Some(g))
    }
}

/// d logits = g_i · (softmax(x_i) − onehot(t_i)), with logsumexp recovered as `loss + x[t]`.
struct CrossEntropyBwd {
    targets: Arc<Vec<u32>>,
}

fn ce_bwd<T: Real>(
    s: &CpuStorage,
    l: &Layout,
    ls: &CpuStorage,
    ll: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    targets: &[u32],
) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "cross_entropy backward")?;
    let loss = data::<T>(ls, ll, "cross_entropy backward")?;
    let g = data::<T>(gs, gl, "cross_entropy backward")?;
    let v = l.dims()[1];
    let mut out = uninit_output(x.len());
    out.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(i, (o, row))| {
        ce_row_grad(o, row, loss[i], g[i], targets[i] as usize);
    });
    // SAFETY: out has the rows of x, and ce_row_grad writes every element of each row.
    let out = unsafe { assume_written(out) };
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-bwd"
    }
    cpu_fwd3!(self, ce_bwd(&self.targets));
}
