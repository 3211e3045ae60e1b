//! Causal multi-head attention, fused: FlashAttention's idea on a CPU. One task per head
//! computes its scores, masks and normalises them and multiplies by v without storing the
//! (T, S) probabilities; the backward pass recomputes them per head.

use super::matmul::{matmul, matmul_into, Mat};
use super::reduce::{dot8, max8, sum8_by};
use super::{assume_written, cpu_data, data, uninit_output, write_slice, Real};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// (B, H, T, S, hd, Hkv): batch, query heads, queries, keys, head width, kv heads.
pub(super) type AttnDims = (usize, usize, usize, usize, usize, usize);

/// Causal multi-head attention `softmax(scale · q kᵀ + mask) v` for q (B, H, T, hd) and k, v
/// (B, Hkv, S, hd) (H a multiple of Hkv: grouped-query attention), query i at position
/// S − T + i; returns (B, T, H, hd), so that a reshape gives (B, T, H·hd). Neither the scores
/// nor the probabilities are kept: the backward pass recomputes them per head, as
/// FlashAttention does, so no (B, H, T, S) tensor is ever stored.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (bk, hkv, s, hdk) = k.dims4()?;
    if bk != b || hdk != hd || v.dims() != k.dims() || hkv == 0 || h % hkv != 0 || s < t || scale <= 0.0 {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (B, H, T, hd) / (B, Hkv, S >= T, hd)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { scale })
}

struct Attention {
    scale: f64,
}

avx2_dispatch!(
    /// Rows of n scores each: row r becomes `softmax(scale · x)` over its first `visible0 + r`
    /// entries (the keys its query may see), zeros after.
    fn causal_softmax_rows<T: Real>(s: &mut [T], n: usize, visible0: usize, scale: T) => causal_softmax_rows_body
);

#[inline(always)]
fn causal_softmax_rows_body<T: Real>(s: &mut [T], n: usize, visible0: usize, scale: T) {
    for (r, row) in s.chunks_mut(n).enumerate() {
        let visible = visible0 + r;
        let (live, masked) = row.split_at_mut(visible);
        let max = max8(live) * scale;
        for x in live.iter_mut() {
            *x = (*x * scale - max).fast_exp();
        }
        let inv = sum8_by(live, |v| v).recip();
        live.iter_mut().for_each(|x| *x *= inv);
        masked.iter_mut().for_each(|x| *x = T::zero());
    }
}

avx2_dispatch!(
    /// Rows of n probabilities p and their gradients dp, row r with `visible0 + r` visible
    /// keys: dp becomes the scores' gradient `scale · p ⊙ (dp − Σ p ⊙ dp)`, zero after the
    /// visible keys (where p is zero).
    fn softmax_grad_rows<T: Real>(p: &[T], dp: &mut [T], n: usize, visible0: usize, scale: T) => softmax_grad_rows_body
);

#[inline(always)]
fn softmax_grad_rows_body<T: Real>(p: &[T], dp: &mut [T], n: usize, visible0: usize, scale: T) {
    for (r, (prow, drow)) in p.chunks(n).zip(dp.chunks_mut(n)).enumerate() {
        let visible = visible0 + r;
        let (live, masked) = drow.split_at_mut(visible);
        let prow = &prow[..visible];
        let dot = dot8(prow, live);
        for (d, &p) in live.iter_mut().zip(prow) {
            *d = scale * p * (*d - dot);
        }
        masked.iter_mut().for_each(|x| *x = T::zero());
    }
}

/// Query rows per attention block: a block multiplies only against the keys its last row may
/// see, skipping most of the masked upper triangle (with T = S and 4 blocks, 3/8 of the
/// score and P·v multiply-adds).
const QBLOCK: usize = 64;

/// (first row, rows, keys visible to the block's last row) of each query block; the blocks
/// cover rows 0..t.
fn query_blocks(t: usize, s: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(QBLOCK).map(move |r0| {
        let rows = QBLOCK.min(t - r0);
        (r0, rows, s - t + r0 + rows)
    })
}

/// (B, H, T, S, hd, Hkv) of an attention call.
fn attn_dims(q: &Layout, k: &Layout) -> Result<AttnDims> {
    let (b, h, t, hd) = q.shape().dims4()?;
    let (_, hkv, s, _) = k.shape().dims4()?;
    Ok((b, h, t, s, hd, hkv))
}

fn attn_fwd<T: Real>(
    qs: &CpuStorage,
    ql: &Layout,
    ks: &CpuStorage,
    kl: &Layout,
    vs: &CpuStorage,
    vl: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let (q, k, v) = (data::<T>(qs, ql, "attention")?, data::<T>(ks, kl, "attention")?, data::<T>(vs, vl, "attention")?);
    let dims = attn_dims(ql, kl)?;
    let (b, h, t, _, hd, _) = dims;
    Ok((T::to_cpu_storage_owned(attn_forward(q, k, v, dims, scale)), Shape::from((b, t, h, hd))))
}

/// The attention output (B, T, H, hd) of q (B, H, T, hd) and k, v (B, Hkv, S, hd), contiguous.
pub(super) fn attn_forward<T: Real>(q: &[T], k: &[T], v: &[T], dims: AttnDims, scale: f64) -> Vec<T> {
    let (b, h, t, s, hd, hkv) = dims;
    let rep = h / hkv;
    let scale = T::from_f64(scale);
    // y per head, (B, H, T, hd); transposed to (B, T, H, hd) below.
    let mut y = uninit_output(b * h * t * hd);
    y.par_chunks_mut(t * hd).enumerate().for_each(|(bh, y)| {
        let (bi, hi) = (bh / h, bh % h);
        let kv = (bi * hkv + hi / rep) * s * hd;
        let mut p = vec![T::zero(); QBLOCK.min(t) * s];
        for (r0, rows, sv) in query_blocks(t, s) {
            let p = &mut p[..rows * sv];
            let qm = Mat::at(q, (bh * t + r0) * hd, rows, hd, hd);
            matmul(p, sv, qm, Mat::at(k, kv, sv, hd, hd).t(), false);
            causal_softmax_rows(p, sv, s - t + r0 + 1, scale);
            matmul_into(&mut y[r0 * hd..], hd, Mat::at(p, 0, rows, sv, sv), Mat::at(v, kv, sv, hd, hd));
        }
    });
    // SAFETY: each head's (T, hd) chunk of y is covered by its query blocks, and each block's
    // matmul_into writes its rows in full (hd columns, rows hd apart).
    let y = unsafe { assume_written(y) };
    let mut out = uninit_output(y.len());
    out.par_chunks_mut(h * hd).enumerate().for_each(|(bt, o)| {
        let (bi, ti) = (bt / t, bt % t);
        for hi in 0..h {
            let src = ((bi * h + hi) * t + ti) * hd;
            write_slice(&mut o[hi * hd..(hi + 1) * hd], &y[src..src + hd]);
        }
    });
    // SAFETY: each (b, t) row of H·hd is written head by head, all h heads of hd.
    unsafe { assume_written(out) }
}

/// Gradients of q, k, v given dy (B, T, H, hd), recomputing P per head:
/// dP = dy vᵀ, dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), dq = dS k, dk = Σ_group dSᵀ q,
/// dv = Σ_group Pᵀ dy. One task per (batch, kv head) owns its dk, dv and its group's dq.
pub(super) fn attn_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    dy: &[T],
    dims: AttnDims,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (b, h, t, s, hd, hkv) = dims;
    let rep = h / hkv;
    let scale = T::from_f64(scale);
    let mut dq = uninit_output(b * h * t * hd);
    // dk and dv sum over the group's heads and blocks: zeroed, then accumulated into.
    let mut dk = vec![T::zero(); b * hkv * s * hd];
    let mut dv = vec![T::zero(); b * hkv * s * hd];
    dq.par_chunks_mut(rep * t * hd).zip(dk.par_chunks_mut(s * hd).zip(dv.par_chunks_mut(s * hd))).enumerate().for_each(
        |(bg, (dq, (dk, dv)))| {
            let bi = bg / hkv;
            let kv = bg * s * hd;
            let (km, vm) = (Mat::at(k, kv, s, hd, hd), Mat::at(v, kv, s, hd, hd));
            let mut p = vec![T::zero(); QBLOCK.min(t) * s];
            let mut dp = vec![T::zero(); QBLOCK.min(t) * s];
            for r in 0..rep {
                let hi = (bg % hkv) * rep + r;
                for (r0, rows, sv) in query_blocks(t, s) {
                    let (p, dp) = (&mut p[..rows * sv], &mut dp[..rows * sv]);
                    let (km, vm) = (Mat { rows: sv, ..km }, Mat { rows: sv, ..vm });
                    let qm = Mat::at(q, ((bi * h + hi) * t + r0) * hd, rows, hd, hd);
                    // dy for this head: rows of (B, T, H, hd), H·hd apart.
                    let dym = Mat::at(dy, ((bi * t + r0) * h + hi) * hd, rows, hd, h * hd);
                    matmul(p, sv, qm, km.t(), false);
                    causal_softmax_rows(p, sv, s - t + r0 + 1, scale);
                    matmul(dp, sv, dym, vm.t(), false);
                    softmax_grad_rows(p, dp, sv, s - t + r0 + 1, scale);
                    let pm = Mat::at(p, 0, rows, sv, sv);
                    let dsm = Mat::at(dp, 0, rows, sv, sv);
                    matmul_into(&mut dq[(r * t + r0) * hd..], hd, dsm, km);
                    matmul(dk, hd, dsm.t(), qm, true);
                    matmul(dv, hd, pm.t(), dym, true);
                }
            }
        },
    );
    // SAFETY: each task's dq chunk holds its group's rep heads of (T, hd); every head's query
    // blocks cover its T rows, and each matmul_into writes its rows in full (hd columns, rows
    // hd apart).
    (unsafe { assume_written(dq) }, dk, dv)
}

fn attn_bwd_tensors<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let ((qs, ql), (ks, kl)) = (q.storage_and_layout(), k.storage_and_layout());
    let ((vs, vl), (ds, dl)) = (v.storage_and_layout(), dy.storage_and_layout());
    let (dq, dk, dv) = attn_bwd(
        cpu_data::<T>(&qs, ql)?,
        cpu_data(&ks, kl)?,
        cpu_data(&vs, vl)?,
        cpu_data(&ds, dl)?,
        (b, h, t, s, hd, hkv),
        scale,
    );
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, q.shape(), dev)?,
        Tensor::from_vec(dk, k.shape(), dev)?,
        Tensor::from_vec(dv, v.shape(), dev)?,
    ))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }
    cpu_fwd3!(self, attn_fwd(self.scale));
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => attn_bwd_tensors::<f32>(q, k, v, &dy, self.scale)?,
            DType::F64 => attn_bwd_tensors::<f64>(q, k, v, &dy, self.scale)?,
            other => bail!("attention: dtype {other:?} is not supported (f32 or f64)"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
