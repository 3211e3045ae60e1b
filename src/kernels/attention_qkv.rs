//! Causal self-attention on the packed q, k, v projection ([`attention_qkv`]): RoPE, the head
//! transposes and the attention kernel of `attention.rs` in one op.

use super::attention::{attn_bwd, attn_forward};
use super::rope::rotate_row;
use super::{assume_written, cpu_data, data, rows_per_task, uninit_output, write_slice, Real};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// (B, T, H, Hkv, hd): batch, tokens, query heads, kv heads, head width.
type QkvDims = (usize, usize, usize, usize, usize);

/// Causal self-attention straight from the packed q, k, v projections: qkv (B, T, W) with
/// W = (H + 2·Hkv)·hd, each row [q heads | k heads | v heads], at positions
/// offset..offset + T → (B, T, H·hd). RoPE of q and k, the head transposes and
/// [`attention`](super::attention()) in one op, whose backward pass returns the packed
/// gradient (B, T, W): the three projections run as one matmul, and nothing is split,
/// narrowed or concatenated. The rotated q, k, v are not kept; the backward pass rotates them
/// again (one cheap pass).
pub fn attention_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    offset: usize,
    (h, hkv): (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let (_, t, w) = qkv.dims3()?;
    let (max_t, table_hd) = cos.dims2()?;
    let fits = hkv > 0 && h % hkv == 0 && w % (h + 2 * hkv) == 0;
    let hd = if fits { w / (h + 2 * hkv) } else { 0 };
    if hd == 0 || hd % 2 != 0 || table_hd != hd || offset + t > max_t || sin.dims() != cos.dims() || scale <= 0.0 {
        bail!(
            "attention_qkv: qkv {:?} does not fit {h} query and {hkv} kv heads of even width with tables {:?} at offset {offset}",
            qkv.dims(),
            cos.dims()
        );
    }
    let (cos, sin) = (cos.narrow(0, offset, t)?.contiguous()?, sin.narrow(0, offset, t)?.contiguous()?);
    qkv.contiguous()?.apply_op3(&cos, &sin, AttentionQkv { h, hkv, scale })
}

struct AttentionQkv {
    h: usize,
    hkv: usize,
    scale: f64,
}

impl AttentionQkv {
    /// (B, T, H, Hkv, hd) of packed qkv dims (B, T, W).
    fn dims(&self, qkv: &[usize]) -> QkvDims {
        (qkv[0], qkv[1], self.h, self.hkv, qkv[2] / (self.h + 2 * self.hkv))
    }
}

/// q (B, H, T, hd) and k, v (B, Hkv, T, hd) from packed qkv (B, T, (H + 2·Hkv)·hd), q and k
/// rotated by the (T, hd) tables.
fn unpack_qkv<T: Real>(qkv: &[T], cos: &[T], sin: &[T], (b, t, h, hkv, hd): QkvDims) -> (Vec<T>, Vec<T>, Vec<T>) {
    let w = (h + 2 * hkv) * hd;
    let heads = |n: usize, col0: usize, rotate: bool| -> Vec<T> {
        let mut out = uninit_output(b * n * t * hd);
        // One output row per (b, head, t).
        out.par_chunks_mut(hd).enumerate().with_min_len(rows_per_task(hd)).for_each(|(r, o)| {
            let (bi, hi, ti) = (r / (n * t), r / t % n, r % t);
            let x = &qkv[(bi * t + ti) * w + col0 + hi * hd..][..hd];
            if rotate {
                rotate_row(o, x, &cos[ti * hd..][..hd], &sin[ti * hd..][..hd], false);
            } else {
                write_slice(o, x);
            }
        });
        // SAFETY: out has rows of hd (even: checked by `attention_qkv`), each written in full
        // by rotate_row or write_slice.
        unsafe { assume_written(out) }
    };
    (heads(h, 0, true), heads(hkv, h * hd, true), heads(hkv, (h + hkv) * hd, false))
}

/// The packed gradient (B, T, (H + 2·Hkv)·hd) from dq (B, H, T, hd) and dk, dv (B, Hkv, T, hd):
/// the transpose of `unpack_qkv` (rotations by −θ).
fn pack_qkv_grad<T: Real>(
    (dq, dk, dv): (&[T], &[T], &[T]),
    cos: &[T],
    sin: &[T],
    (b, t, h, hkv, hd): QkvDims,
) -> Vec<T> {
    let w = (h + 2 * hkv) * hd;
    let mut out = uninit_output(b * t * w);
    out.par_chunks_mut(w).enumerate().with_min_len(rows_per_task(w)).for_each(|(bt, row)| {
        let (bi, ti) = (bt / t, bt % t);
        let (c, sn) = (&cos[ti * hd..][..hd], &sin[ti * hd..][..hd]);
        for (col0, n, src, rotate) in [(0, h, dq, true), (h * hd, hkv, dk, true), ((h + hkv) * hd, hkv, dv, false)] {
            for hi in 0..n {
                let x = &src[((bi * n + hi) * t + ti) * hd..][..hd];
                let o = &mut row[col0 + hi * hd..][..hd];
                if rotate {
                    rotate_row(o, x, c, sn, true);
                } else {
                    write_slice(o, x);
                }
            }
        }
    });
    // SAFETY: each row of W = (H + 2·Hkv)·hd is written in full: its H + Hkv + Hkv heads of hd
    // (even) side by side, each by rotate_row or write_slice.
    unsafe { assume_written(out) }
}

fn attn_qkv_fwd<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    op: &AttentionQkv,
) -> Result<(CpuStorage, Shape)> {
    let what = "attention_qkv";
    let (qkv, cos, sin) = (data::<T>(s1, l1, what)?, data::<T>(s2, l2, what)?, data::<T>(s3, l3, what)?);
    let dims = op.dims(l1.dims());
    let (b, t, h, hkv, hd) = dims;
    let (q, k, v) = unpack_qkv(qkv, cos, sin, dims);
    let y = attn_forward(&q, &k, &v, (b, h, t, t, hd, hkv), op.scale);
    Ok((T::to_cpu_storage_owned(y), Shape::from((b, t, h * hd))))
}

fn attn_qkv_bwd_tensor<T: Real>(
    op: &AttentionQkv,
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    let dims = op.dims(qkv.dims());
    let (b, t, h, hkv, hd) = dims;
    let ((xs, xl), (cs, cl)) = (qkv.storage_and_layout(), cos.storage_and_layout());
    let ((ss, sl), (ds, dl)) = (sin.storage_and_layout(), dy.storage_and_layout());
    let (c, sn) = (cpu_data::<T>(&cs, cl)?, cpu_data::<T>(&ss, sl)?);
    let (q, k, v) = unpack_qkv(cpu_data::<T>(&xs, xl)?, c, sn, dims);
    let (dq, dk, dv) = attn_bwd(&q, &k, &v, cpu_data(&ds, dl)?, (b, h, t, t, hd, hkv), op.scale);
    let d = pack_qkv_grad((&dq, &dk, &dv), c, sn, dims);
    Tensor::from_vec(d, qkv.shape(), qkv.device())
}

impl CustomOp3 for AttentionQkv {
    fn name(&self) -> &'static str {
        "fused-rope-causal-attention-packed"
    }
    cpu_fwd3!(self, attn_qkv_fwd(self));
    fn bwd(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let d = match qkv.dtype() {
            DType::F32 => attn_qkv_bwd_tensor::<f32>(self, qkv, cos, sin, &dy)?,
            DType::F64 => attn_qkv_bwd_tensor::<f64>(self, qkv, cos, sin, &dy)?,
            other => bail!("attention_qkv: dtype {other:?} is not supported (f32 or f64)"),
        };
        Ok((Some(d), None, None))
    }
}
