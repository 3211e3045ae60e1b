//! The LM head and cross-entropy as one op: logits `x wᵀ`, per-row loss, and in the backward
//! pass dx and dw from the kept logits, overwritten with their gradient.

use super::cross_entropy::{ce_row_grad_in_place, ce_row_loss};
use super::matmul::{matmul_bands, Mat};
use super::{assume_written, cpu_data, data, uninit_output, Real};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Per-row cross-entropy of the logits `x wᵀ` (x (N, d), w (V, d): the LM head) against
/// targets (N,) u32 → (N,). The forward pass keeps the logits for the backward pass, which
/// overwrites them with `softmax − onehot` and multiplies that into dx and dw: no second
/// (N, V) buffer is allocated, and candle's autograd never sees the logits or their gradient.
/// The op's graph supports one backward pass (it consumes the kept logits).
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let (v, dw) = w.dims2()?;
    if d != dw {
        bail!("linear_cross_entropy: x {:?} and head {:?} differ in width", x.dims(), w.dims());
    }
    let targets: Vec<u32> = targets.to_dtype(DType::U32)?.to_vec1()?;
    if targets.len() != n {
        bail!("linear_cross_entropy: {n} rows but {} targets", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("linear_cross_entropy: target {t} out of range for {v} classes");
    }
    let op = LinearCrossEntropy { targets: Arc::new(targets), logits: Mutex::new(None) };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

struct LinearCrossEntropy {
    targets: Arc<Vec<u32>>,
    /// The forward pass's (N, V) logits, for the backward pass.
    logits: Mutex<Option<CpuStorage>>,
}

fn lce_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    targets: &[u32],
) -> Result<(CpuStorage, CpuStorage)> {
    let (x, w) = (data::<T>(xs, xl, "linear_cross_entropy")?, data::<T>(ws, wl, "linear_cross_entropy")?);
    let (n, d) = xl.shape().dims2()?;
    let v = wl.dims()[0];
    let mut logits = uninit_output(n * v);
    matmul_bands(&mut logits, v, Mat::at(x, 0, n, d, d), Mat::at(w, 0, v, d, d).t());
    // SAFETY: matmul_bands wrote all n rows of v (ld = v).
    let logits = unsafe { assume_written(logits) };
    let loss: Vec<T> =
        logits.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| ce_row_loss(row, t as usize)).collect();
    Ok((T::to_cpu_storage_owned(loss), T::to_cpu_storage_owned(logits)))
}

/// dx and dw from the kept logits (overwritten with their gradient), the per-row losses
/// (`lse = loss + logit[t]`) and the upstream gradient g (N,).
fn lce_bwd<T: Real>(
    x: &[T],
    w: &[T],
    logits: &mut [T],
    loss: &[T],
    g: &[T],
    targets: &[u32],
    (n, d, v): (usize, usize, usize),
) -> (Vec<T>, Vec<T>) {
    logits
        .par_chunks_mut(v)
        .enumerate()
        .for_each(|(r, row)| ce_row_grad_in_place(row, loss[r], g[r], targets[r] as usize));
    let dl = Mat::at(logits, 0, n, v, v);
    let mut dx = uninit_output(n * d);
    matmul_bands(&mut dx, d, dl, Mat::at(w, 0, v, d, d));
    let mut dw = uninit_output(v * d);
    matmul_bands(&mut dw, d, dl.t(), Mat::at(x, 0, n, d, d));
    // SAFETY: the two matmul_bands wrote all n (dx) and v (dw) rows of d (ld = d).
    unsafe { (assume_written(dx), assume_written(dw)) }
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (loss, logits) = float_dispatch!(s1, self.name(), lce_fwd(s1, l1, s2, l2, &self.targets))?;
        *self.logits.lock().map_err(|_| candle_core::Error::Msg("linear_cross_entropy: poisoned lock".into()))? =
            Some(logits);
        Ok((loss, Shape::from(l1.dims()[0])))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let taken = self
            .logits
            .lock()
            .map_err(|_| candle_core::Error::Msg("linear_cross_entropy: poisoned lock".into()))?
            .take();
        let Some(mut logits) = taken else {
            bail!("linear_cross_entropy: backward without a forward pass (the op supports one backward pass)")
        };
        let (n, d) = x.dims2()?;
        let v = w.dims()[0];
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let CpuStorage::$variant(lg) = &mut logits else { bail!("linear_cross_entropy: logits dtype changed") };
                let ((xs, xl), (ws, wl)) = (x.storage_and_layout(), w.storage_and_layout());
                let ((ls, ll), (gs, gl)) = (loss.storage_and_layout(), grad.storage_and_layout());
                let (xd, wd) = (cpu_data::<$t>(&xs, xl)?, cpu_data::<$t>(&ws, wl)?);
                let (ld, gd) = (cpu_data::<$t>(&ls, ll)?, cpu_data::<$t>(&gs, gl)?);
                let (dx, dw) = lce_bwd(xd, wd, lg, ld, gd, &self.targets, (n, d, v));
                (Tensor::from_vec(dx, (n, d), x.device())?, Tensor::from_vec(dw, (v, d), w.device())?)
            }};
        }
        let (dx, dw) = match x.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            other => bail!("linear_cross_entropy: dtype {other:?} is not supported (f32 or f64)"),
        };
        Ok((Some(dx), Some(dw)))
    }
}
