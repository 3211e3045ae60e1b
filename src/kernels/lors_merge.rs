//! The merged LORS weight `W + scale · B A` as one op, the product accumulated straight into a
//! copy of W.

use super::matmul::{matmul_add_scaled, Mat};
use super::{data, Real};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The merged LORS weight `W + scale · B A` for W (out, in), B (out, r), A (r, in), as one
/// op: the product `B A` is accumulated straight into a copy of W and never stored, and the
/// backward pass gives dW = g, dB = s·g Aᵀ, dA = s·Bᵀ g.
pub fn lors_merge(w: &Tensor, b: &Tensor, a: &Tensor, scale: f64) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let (bo, r) = b.dims2()?;
    if bo != out || a.dims2()? != (r, inp) {
        bail!(
            "lors_merge: W {:?}, B {:?}, A {:?} do not fit (out, in), (out, r), (r, in)",
            w.dims(),
            b.dims(),
            a.dims()
        );
    }
    w.contiguous()?.apply_op3(&b.contiguous()?, &a.contiguous()?, LorsMerge { scale })
}

struct LorsMerge {
    scale: f64,
}

fn merge_fwd<T: Real>(
    ws: &CpuStorage,
    wl: &Layout,
    bs: &CpuStorage,
    bl: &Layout,
    as_: &CpuStorage,
    al: &Layout,
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let (w, b, a) =
        (data::<T>(ws, wl, "lors_merge")?, data::<T>(bs, bl, "lors_merge")?, data::<T>(as_, al, "lors_merge")?);
    let (out, inp) = wl.shape().dims2()?;
    let r = bl.dims()[1];
    // A copy of W (initialised: the product is added to it).
    let mut m = w.to_vec();
    matmul_add_scaled(&mut m, inp, Mat::at(b, 0, out, r, r), Mat::at(a, 0, r, inp, inp), T::from_f64(scale));
    Ok((T::to_cpu_storage_owned(m), wl.shape().clone()))
}

impl CustomOp3 for LorsMerge {
    fn name(&self) -> &'static str {
        "fused-lors-merge"
    }
    cpu_fwd3!(self, merge_fwd(self.scale));
    fn bwd(
        &self,
        _w: &Tensor,
        b: &Tensor,
        a: &Tensor,
        _m: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scaled = |t: Tensor| if self.scale == 1.0 { Ok(t) } else { t * self.scale };
        let db = scaled(grad.matmul(&a.t()?)?)?;
        let da = scaled(b.t()?.matmul(grad)?)?;
        Ok((Some(grad.clone()), Some(db), Some(da)))
    }
}
