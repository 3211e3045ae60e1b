//! The AdamW update as two in-place CPU ops (f32/f64): the moments, then the parameter, in
//! three passes over memory and no allocations. `optim.rs` uses them where they can run and
//! the same arithmetic as tensor ops elsewhere.

use crate::kernels::{data, Real};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};

/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²` in place.
pub struct Moments {
    pub beta: f64,
    pub square: bool,
}

fn moments<T: Real>(
    m: &mut CpuStorage,
    ml: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    beta: f64,
    square: bool,
) -> Result<()> {
    let g = data::<T>(gs, gl, "adamw")?;
    let Some((a, b)) = ml.contiguous_offsets() else { bail!("adamw: moment must be contiguous") };
    let m = &mut T::as_mut_slice(m)?[a..b];
    let (beta, one_minus) = (T::from_f64(beta), T::from_f64(1.0 - beta));
    for (m, &g) in m.iter_mut().zip(g) {
        let g = if square { g * g } else { g };
        *m = beta * *m + one_minus * g;
    }
    Ok(())
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        match s1 {
            CpuStorage::F32(_) => moments::<f32>(s1, l1, s2, l2, self.beta, self.square),
            CpuStorage::F64(_) => moments::<f64>(s1, l1, s2, l2, self.beta, self.square),
            other => bail!("adamw: dtype {:?} is not supported on the CPU", other.dtype()),
        }
    }
}

/// `p ← p·(1 − lr·wd) − lr·(m / bc1) / (√(v / bc2) + ε)` in place.
pub struct AdamUpdate {
    pub lr: f64,
    pub weight_decay: f64,
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
}

fn adam_update<T: Real>(
    p: &mut CpuStorage,
    pl: &Layout,
    ms: &CpuStorage,
    ml: &Layout,
    vs: &CpuStorage,
    vl: &Layout,
    u: &AdamUpdate,
) -> Result<()> {
    let m = data::<T>(ms, ml, "adamw")?;
    let v = data::<T>(vs, vl, "adamw")?;
    let Some((a, b)) = pl.contiguous_offsets() else { bail!("adamw: parameter must be contiguous") };
    let p = &mut T::as_mut_slice(p)?[a..b];
    let decay = T::from_f64(1.0 - u.lr * u.weight_decay);
    let step = T::from_f64(u.lr / u.bc1);
    let (inv_bc2, eps) = (T::from_f64(1.0 / u.bc2), T::from_f64(u.eps));
    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
        *p = *p * decay - step * m / ((v * inv_bc2).sqrt() + eps);
    }
    Ok(())
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(_) => adam_update::<f32>(s1, l1, s2, l2, s3, l3, self),
            CpuStorage::F64(_) => adam_update::<f64>(s1, l1, s2, l2, s3, l3, self),
            other => bail!("adamw: dtype {:?} is not supported on the CPU", other.dtype()),
        }
    }
}
