//! Fused, differentiable CPU kernels for the model's hot paths (candle custom ops with
//! hand-written backward passes).
//!
//! candle builds each of these from several basic ops, every one of which allocates and
//! writes a full tensor (and as many again in the backward pass); on the CPU that memory
//! traffic, not arithmetic, dominates a small model's step. Each op here reads its inputs once
//! and writes its output once, rows split across threads with rayon:
//!
//! | op | replaces | forward | backward |
//! |---|---|---|---|
//! | [`cross_entropy`] | log-softmax, gather, mean | per-row loss | `g·(softmax − onehot)` |
//! | [`linear_cross_entropy`] | LM head matmul, log-softmax, gather, and their backward | loss | blockwise dx, dw |
//! | [`lors_merge`] | B·A, scale, add (three stored tensors) | `W + s·B A` | dW, dB, dA |
//! | [`attention`] | qkᵀ, scale, mask, softmax (5 ops), P·v, transpose | per head | recomputes P per head |
//! | [`rms_norm`] | sqr, mean, add, sqrt, recip, mul, mul | `x·inv·g` | dx and dg in one op |
//! | [`rope_t`] | transpose, contiguous, narrow, neg, cat, mul, mul, add | rotate | rotate by −θ |
//! | [`swiglu`] | silu, mul | `silu(g)·u` | dg and du in one op |
//! | [`attention_qkv`] | narrow ×3, [`rope_t`] ×2, transpose, [`attention`] on packed q, k, v | rotate, attend | packed dqkv |
//! | [`swiglu_packed`] | narrow ×2, [`swiglu`] on packed [gate, up] | `silu(g)·u` | packed [dg, du] |
//! | [`matvec::linear_rows`] | matmul of a few rows (decoding), `+ s·(x Aᵀ) Bᵀ` of factored LORS | one pass over W | none (inference) |
//!
//! [`attention`] is FlashAttention's idea on a CPU: one task per head computes its scores,
//! masks and normalises them and multiplies by v without storing the (T, S) probabilities;
//! the backward pass recomputes them. Its matmuls run single-threaded per head (OpenBLAS
//! where it is loaded, see `device::cpu_matmul`; gemm otherwise).
//!
//! They run on the CPU in f32 or f64 only; the model uses the plain candle compositions
//! (kept in `model.rs`, and the reference in the tests) on other devices. Each op has a
//! finite-difference gradient test and a comparison with the plain version (tests/ops.rs).

pub mod matvec;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use candle_core::{DType, Result, WithDType};
use rayon::prelude::*;

/// The float types the kernels are written for.
pub(crate) trait Real: WithDType + num_traits::Float + Send + Sync {
    fn as_mut_slice(s: &mut CpuStorage) -> Result<&mut [Self]>;
    /// eˣ, in a form the compiler can vectorise (f32: within 2 ulp for x ≥ −87; f64: std).
    fn fast_exp(self) -> Self;
}
impl Real for f32 {
    /// Cody–Waite range reduction `x = k·ln2 + r`, |r| ≤ ln2/2, then a degree-6 Taylor
    /// polynomial for eʳ (truncation error < 1.3e-7 relative) and 2ᵏ through the exponent
    /// bits. Plain arithmetic with no calls or branches, so loops over it compile to SIMD,
    /// unlike libm's `expf`. Inputs below −87.3 give ~1e-38 instead of 0 (or a denormal):
    /// the kernels only exponentiate `x − max ≤ 0` terms whose sum is ≥ 1, where that is
    /// far below f32 resolution.
    #[inline(always)]
    fn fast_exp(self) -> Self {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        let x = self.clamp(-87.3, 88.7);
        // Round to nearest by adding and removing 1.5·2²³ (no `floor` call: baseline x86-64
        // has no vector rounding instruction, and a libm call would stop vectorisation).
        const MAGIC: f32 = 12_582_912.0;
        let shifted = x * LOG2E + MAGIC;
        let k = shifted - MAGIC;
        let r = x - k * LN2_HI - k * LN2_LO;
        let p =
            1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        // The integer k sits in the low mantissa bits of 1.5·2²³ + k; reading it from there
        // keeps the loop in vector integer instructions, where `k as i32` (a saturating cast
        // with a NaN check) compiles to one scalar conversion per lane.
        let k_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
        p * f32::from_bits(((k_int + 127) as u32) << 23)
    }
    fn as_mut_slice(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            other => bail!("expected f32 storage, got {:?}", other.dtype()),
        }
    }
}
impl Real for f64 {
    #[inline(always)]
    fn fast_exp(self) -> Self {
        self.exp()
    }
    fn as_mut_slice(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            other => bail!("expected f64 storage, got {:?}", other.dtype()),
        }
    }
}

/// Whether the fused kernels can run on `t` (CPU, f32 or f64).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous data of a CPU storage as a slice of T.
pub(crate) fn data<'a, T: Real>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

static POISON_OUTPUTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Fill the kernels' output buffers with NaN before the kernels write them, so that an
/// element a kernel fails to write shows up in tests as NaN rather than as stale memory.
pub fn poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A vector of n floats for a kernel output that is written in full before it is read: no
/// zero fill, which would be a single-threaded memset as large as the output.
fn output_vec<T: Real>(n: usize) -> Vec<T> {
    if POISON_OUTPUTS.load(std::sync::atomic::Ordering::Relaxed) {
        return vec![T::nan(); n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 and f64 have no invalid bit patterns, and every caller writes all n
    // elements before it reads any (as with candle's own `alloc_uninit`).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// `fn $name` runs the `#[inline(always)]` generic `$body` compiled for AVX2 where the CPU has
/// it (`is_x86_feature_detected!` caches the answer), and as built (baseline x86-64: SSE2)
/// elsewhere. The loops are the same, so the results are too; AVX2 doubles their vector width.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$doc])*
        fn $name<T: Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2<T: Real>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// Dispatch a generic kernel on the storage's float type.
macro_rules! float_dispatch {
    ($s:expr, $name:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            other => bail!("{}: dtype {:?} is not supported (f32 or f64)", $name, other.dtype()),
        }
    };
}

/// The `cpu_fwd` of a three-input custom op: `kernel::<T>(s1, l1, s2, l2, s3, l3, extra..)`
/// with T the float type of the first input.
macro_rules! cpu_fwd3 {
    ($self:ident, $kernel:ident ( $($extra:expr),* )) => {
        fn cpu_fwd(
            &$self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            float_dispatch!(s1, $self.name(), $kernel(s1, l1, s2, l2, s3, l3 $(, $extra)*))
        }
    };
}

// ---------------------------------------------------------------------------------------
// Cross-entropy

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
    logits.contiguous()?.apply_op1(CrossEntropy { targets: std::sync::Arc::new(targets) })
}

struct CrossEntropy {
    targets: std::sync::Arc<Vec<u32>>,
}

/// Σ f(x) with eight partial sums: a vectorisable reduction (one running sum is a serial
/// chain the compiler may not reorder).
#[inline(always)]
fn sum8_by<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().fold(chunks.remainder().iter().fold(T::zero(), |s, &v| s + f(v)), |s, &a| s + a)
}

/// The largest element (−∞ for an empty slice; NaNs are skipped), with eight running maxima:
/// vectorisable, where one `fold(max)` is a serial chain.
#[inline(always)]
fn max8<T: Real>(x: &[T]) -> T {
    let larger = |m: T, v: T| if v > m { v } else { m };
    let mut acc = [T::neg_infinity(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = larger(*a, v);
        }
    }
    acc.iter().fold(chunks.remainder().iter().fold(T::neg_infinity(), |m, &v| larger(m, v)), |m, &a| larger(m, a))
}

/// Cross-entropy of one row of logits against target t: `logsumexp(row) − row[t]`.
fn ce_row_loss<T: Real>(row: &[T], t: usize) -> T {
    let max = max8(row);
    max + sum8_by(row, |x| (x - max).fast_exp()).ln() - row[t]
}

/// Gradient of `g · ce_row_loss(row, t)` into `out`: `g · (softmax(row) − onehot(t))`, with
/// logsumexp recovered from the row's loss as `loss + row[t]`.
fn ce_row_grad<T: Real>(out: &mut [T], row: &[T], loss: T, g: T, t: usize) {
    out.copy_from_slice(row);
    ce_row_grad_in_place(out, loss, g, t);
}

/// `ce_row_grad` overwriting the row of logits with its gradient.
fn ce_row_grad_in_place<T: Real>(row: &mut [T], loss: T, g: T, t: usize) {
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

/// d logits = g_i · (softmax(x_i) − onehot(t_i)), with logsumexp recovered as loss + x[t].
struct CrossEntropyBwd {
    targets: std::sync::Arc<Vec<u32>>,
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
    let mut out = output_vec(x.len());
    out.par_chunks_mut(v).zip(x.par_chunks(v)).enumerate().for_each(|(i, (o, row))| {
        ce_row_grad(o, row, loss[i], g[i], targets[i] as usize);
    });
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-bwd"
    }
    cpu_fwd3!(self, ce_bwd(&self.targets));
}

// ---------------------------------------------------------------------------------------
// RMSNorm

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
    fn rms_fwd_rows<T: Real>(o: &mut [T], x: &[T], gain: &[T], eps: T) => rms_fwd_rows_body
);

#[inline(always)]
fn rms_fwd_rows_body<T: Real>(o: &mut [T], x: &[T], gain: &[T], eps: T) {
    let d = gain.len();
    for (o, row) in o.chunks_mut(d).zip(x.chunks(d)) {
        let inv = inv_rms(row, eps);
        for ((o, &x), &g) in o.iter_mut().zip(row).zip(gain) {
            *o = x * inv * g;
        }
    }
}

avx2_dispatch!(
    /// RMSNorm's input gradient for rows of x and dy into dx, and their gain gradient summed
    /// into dg.
    fn rms_bwd_rows<T: Real>(dx: &mut [T], x: &[T], dy: &[T], gain: &[T], dg: &mut [T], eps: T) => rms_bwd_rows_body
);

#[inline(always)]
fn rms_bwd_rows_body<T: Real>(dx: &mut [T], x: &[T], dy: &[T], gain: &[T], dg: &mut [T], eps: T) {
    let d = gain.len();
    let df = T::from_f64(d as f64);
    for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let inv = inv_rms(x, eps);
        let c = inv * inv * inv * dot3_8(gain, dy, x) / df;
        for ((((dx, &x), &dy), &g), dg) in dx.iter_mut().zip(x).zip(dy).zip(gain).zip(dg.iter_mut()) {
            *dx = inv * g * dy - x * c;
            *dg += dy * x * inv;
        }
    }
}

/// Σ aᵢ bᵢ cᵢ with eight running sums (vectorisable).
#[inline(always)]
fn dot3_8<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .fold(T::zero(), |s, ((&x, &y), &z)| s + x * y * z);
    acc.iter().fold(tail, |s, &v| s + v)
}

fn rms_fwd<T: Real>(s: &CpuStorage, l: &Layout, gs: &CpuStorage, gl: &Layout, eps: f64) -> Result<(CpuStorage, Shape)> {
    let x = data::<T>(s, l, "rms_norm")?;
    let gain = data::<T>(gs, gl, "rms_norm")?;
    let d = gain.len();
    let eps = T::from_f64(eps);
    let mut out = output_vec(x.len());
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, x)| rms_fwd_rows(o, x, gain, eps));
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
    let mut out = output_vec(x.len() + d);
    let (dx, dgain) = out.split_at_mut(x.len());
    dgain.fill(T::zero()); // summed into below; dx is written row by row
    let chunk = rows_per_task(d) * d;
    // dx row by row in parallel; each task also sums its rows' dgain, reduced afterwards.
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dx, (x, dy))| {
            let mut dg = vec![T::zero(); d];
            rms_bwd_rows(dx, x, dy, gain, &mut dg, eps);
            dg
        })
        .collect();
    for p in partials {
        for (a, b) in dgain.iter_mut().zip(p) {
            *a += b;
        }
    }
    let len = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }
    cpu_fwd3!(self, rms_bwd(self.eps));
}

// ---------------------------------------------------------------------------------------
// RoPE fused with the head transpose

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
    let mut out = output_vec(x.len());
    // One output row of hd values per (b, d1', d2') of the output layout.
    out.par_chunks_mut(hd).enumerate().with_min_len(rows_per_task(hd)).for_each(|(r, o)| {
        let (bi, rest) = (r / (d1 * d2), r % (d1 * d2));
        // Output index (b, h, t) forward, (b, t, h) inverse; source is the other layout.
        let (hi, ti) = if inverse { (rest % h, rest / h) } else { (rest / t, rest % t) };
        let src = if inverse { ((bi * h + hi) * t + ti) * hd } else { ((bi * t + ti) * h + hi) * hd };
        rotate_row(o, &x[src..src + hd], &cos[ti * hd..ti * hd + hd], &sin[ti * hd..ti * hd + hd], inverse);
    });
    let shape = if inverse { (b, t, h, hd) } else { (b, h, t, hd) };
    Ok((T::to_cpu_storage_owned(out), Shape::from(shape)))
}

/// One head row x (hd values) rotated by +θ (by −θ when `inverse`) into o, rotate_half
/// convention; c and sn are the position's table rows (each frequency in both halves).
#[inline]
fn rotate_row<T: Real>(o: &mut [T], x: &[T], c: &[T], sn: &[T], inverse: bool) {
    let half = x.len() / 2;
    for j in 0..half {
        let (x1, x2) = (x[j], x[j + half]);
        let (c1, c2) = (c[j], c[j + half]);
        let (s1, s2) = if inverse { (-sn[j], -sn[j + half]) } else { (sn[j], sn[j + half]) };
        o[j] = x1 * c1 - x2 * s1;
        o[j + half] = x2 * c2 + x1 * s2;
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

// ---------------------------------------------------------------------------------------
// SwiGLU

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
    let mut out = output_vec(g.len());
    out.par_chunks_mut(16384).zip(g.par_chunks(16384).zip(u.par_chunks(16384))).for_each(|(o, (g, u))| {
        swiglu_slice(o, g, u);
    });
    Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
}

avx2_dispatch!(fn swiglu_slice<T: Real>(o: &mut [T], g: &[T], u: &[T]) => swiglu_slice_body);

#[inline(always)]
fn swiglu_slice_body<T: Real>(o: &mut [T], g: &[T], u: &[T]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

avx2_dispatch!(
    /// With s = σ(g): dgate = dy·u·s·(1 + g·(1 − s)), dup = dy·g·s.
    fn swiglu_bwd_slice<T: Real>(dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dy: &[T]) => swiglu_bwd_slice_body
);

#[inline(always)]
fn swiglu_bwd_slice_body<T: Real>(dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dy: &[T]) {
    for i in 0..g.len() {
        let s = sigmoid(g[i]);
        dg[i] = dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
        du[i] = dy[i] * g[i] * s;
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
    let mut out = output_vec(2 * n);
    let (dg, du) = out.split_at_mut(n);
    const C: usize = 16384;
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .zip(g.par_chunks(C).zip(u.par_chunks(C)).zip(dy.par_chunks(C)))
        .for_each(|((dg, du), ((g, u), dy))| swiglu_bwd_slice(dg, du, g, u, dy));
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
    let mut out = output_vec(x.len() / 2);
    out.par_chunks_mut(f)
        .zip(x.par_chunks(2 * f))
        .with_min_len(rows_per_task(f))
        .for_each(|(o, row)| swiglu_slice(o, &row[..f], &row[f..]));
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
    let mut out = output_vec(x.len());
    out.par_chunks_mut(2 * f).zip(x.par_chunks(2 * f).zip(dy.par_chunks(f))).with_min_len(rows_per_task(f)).for_each(
        |(o, (row, dy))| {
            let (dg, du) = o.split_at_mut(f);
            swiglu_bwd_slice(dg, du, &row[..f], &row[f..], dy);
        },
    );
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

// ---------------------------------------------------------------------------------------
// Causal attention, fused

/// A strided matrix view into a slice: element (i, j) is `d[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    d: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major (rows × cols) block starting at `offset`, rows `rs` apart.
    fn at(d: &'a [T], offset: usize, rows: usize, cols: usize, rs: usize) -> Self {
        Self { d: &d[offset..], rows, cols, rs, cs: 1 }
    }
    fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
    /// Rows r0..r0 + rows of this view.
    fn rows(self, r0: usize, rows: usize) -> Self {
        Self { d: &self.d[(r0 * self.rs).min(self.d.len())..], rows, ..self }
    }
    /// Whether every element lies inside the slice.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.d.len()
    }
}

/// `dst (m×n, row-major, rows ld apart) [+]= a (m×k) · b (k×n)`, single-threaded (the callers
/// parallelise over heads or row bands).
fn matmul<T: Real>(dst: &mut [T], ld: usize, a: Mat<T>, b: Mat<T>, accumulate: bool) {
    matmul_ext(dst, ld, a, b, accumulate, T::one(), gemm::Parallelism::None)
}

/// `dst (m×n, rows ld apart) = a (m×k) · b (k×n)` on every rayon thread: the rows are split
/// into one band per thread, each a single-threaded `matmul`. On 2 cores this is up to 1.3x
/// faster than gemm's own Rayon split for long k (weight gradients) and level with it for the
/// other training shapes (`cargo bench --bench gemm_split`).
fn matmul_bands<T: Real>(dst: &mut [T], ld: usize, a: Mat<T>, b: Mat<T>) {
    let (m, n) = (a.rows, b.cols);
    assert!(n <= ld && m * ld <= dst.len(), "matmul: destination too small");
    // Bands of whole 16-row microkernel tiles.
    let band = m.div_ceil(rayon::current_num_threads()).div_ceil(16).max(1) * 16;
    dst[..m * ld].par_chunks_mut(band * ld).enumerate().for_each(|(i, d)| {
        let rows = band.min(m - i * band);
        matmul(d, ld, a.rows(i * band, rows), b, false);
    });
}

/// `matmul` with the product scaled by `beta` and a choice of parallelism.
fn matmul_ext<T: Real>(
    dst: &mut [T],
    ld: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    beta: T,
    parallelism: gemm::Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(a.cols == b.rows && a.in_bounds() && b.in_bounds(), "matmul: bad operand views");
    assert!(m == 0 || n == 0 || (m - 1) * ld + n <= dst.len(), "matmul: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    // With the `openblas` feature, single-threaded f32 products (scaled by 1) go through
    // OpenBLAS where it is loaded (its `sgemm` declines layouts CBLAS cannot express, and
    // everything when it is not loaded; gemm runs those).
    #[cfg(feature = "openblas")]
    if beta == T::one()
        && matches!(parallelism, gemm::Parallelism::None)
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
    {
        let f = |x: Mat<T>| x.d.as_ptr() as *const f32;
        // SAFETY: T is f32, the asserts above keep both operands and the m rows of dst inside
        // their slices, and dst is borrowed mutably, so it aliases neither operand.
        let done = unsafe {
            candle_core::cpu_backend::openblas::sgemm(
                (m, n, k),
                f(a),
                (a.rs, a.cs),
                f(b),
                (b.rs, b.cs),
                dst.as_mut_ptr() as *mut f32,
                ld,
                accumulate,
            )
        };
        if done {
            return;
        }
    }
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, and dst
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.d.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.d.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
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

/// Σ aᵢ bᵢ with eight running sums (vectorisable, where one fold is a serial chain).
#[inline(always)]
fn dot8<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Query rows per attention block: a block multiplies only against the keys its last row may
/// see, skipping most of the masked upper triangle (with T = S and 4 blocks, 3/8 of the
/// score and P·v multiply-adds).
const QBLOCK: usize = 64;

/// (first row, rows, keys visible to the block's last row) of each query block.
fn query_blocks(t: usize, s: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(QBLOCK).map(move |r0| {
        let rows = QBLOCK.min(t - r0);
        (r0, rows, s - t + r0 + rows)
    })
}

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

/// (B, H, T, S, hd, Hkv) of an attention call.
fn attn_dims(q: &Layout, k: &Layout) -> Result<(usize, usize, usize, usize, usize, usize)> {
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
fn attn_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: (usize, usize, usize, usize, usize, usize),
    scale: f64,
) -> Vec<T> {
    let (b, h, t, s, hd, hkv) = dims;
    let rep = h / hkv;
    let scale = T::from_f64(scale);
    // y per head, (B, H, T, hd); transposed to (B, T, H, hd) below.
    let mut y = output_vec(b * h * t * hd); // every block's rows written once
    y.par_chunks_mut(t * hd).enumerate().for_each(|(bh, y)| {
        let (bi, hi) = (bh / h, bh % h);
        let kv = (bi * hkv + hi / rep) * s * hd;
        let mut p = vec![T::zero(); QBLOCK.min(t) * s];
        for (r0, rows, sv) in query_blocks(t, s) {
            let p = &mut p[..rows * sv];
            let qm = Mat::at(q, (bh * t + r0) * hd, rows, hd, hd);
            matmul(p, sv, qm, Mat::at(k, kv, sv, hd, hd).t(), false);
            causal_softmax_rows(p, sv, s - t + r0 + 1, scale);
            matmul(&mut y[r0 * hd..], hd, Mat::at(p, 0, rows, sv, sv), Mat::at(v, kv, sv, hd, hd), false);
        }
    });
    let mut out = output_vec(y.len());
    out.par_chunks_mut(h * hd).enumerate().for_each(|(bt, o)| {
        let (bi, ti) = (bt / t, bt % t);
        for hi in 0..h {
            let src = ((bi * h + hi) * t + ti) * hd;
            o[hi * hd..(hi + 1) * hd].copy_from_slice(&y[src..src + hd]);
        }
    });
    out
}

/// Gradients of q, k, v given dy (B, T, H, hd), recomputing P per head:
/// dP = dy vᵀ, dS = scale · P ⊙ (dP − rowsum(P ⊙ dP)), dq = dS k, dk = Σ_group dSᵀ q,
/// dv = Σ_group Pᵀ dy. One task per (batch, kv head) owns its dk, dv and its group's dq.
fn attn_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    dy: &[T],
    dims: (usize, usize, usize, usize, usize, usize),
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (b, h, t, s, hd, hkv) = dims;
    let rep = h / hkv;
    let scale = T::from_f64(scale);
    let mut dq = output_vec(b * h * t * hd); // every (head, block) row range written once
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
                    matmul(&mut dq[(r * t + r0) * hd..], hd, dsm, km, false);
                    matmul(dk, hd, dsm.t(), qm, true);
                    matmul(dv, hd, pm.t(), dym, true);
                }
            }
        },
    );
    (dq, dk, dv)
}

/// The contiguous data of a tensor's storage (held through `Tensor::storage_and_layout`),
/// for the backward passes that run outside a custom op.
fn cpu_data<'a, T: Real>(s: &'a candle_core::Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        candle_core::Storage::Cpu(c) => data::<T>(c, l, "fused backward"),
        _ => bail!("the fused kernels run on the CPU only"),
    }
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

/// Causal self-attention straight from the packed q, k, v projections: qkv (B, T, W) with
/// W = (H + 2·Hkv)·hd, each row [q heads | k heads | v heads], at positions
/// offset..offset + T → (B, T, H·hd). RoPE of q and k, the head transposes and [`attention`]
/// in one op, whose backward pass returns the packed gradient (B, T, W): the three
/// projections run as one matmul, and nothing is split, narrowed or concatenated. The
/// rotated q, k, v are not kept; the backward pass rotates them again (one cheap pass).
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
    fn dims(&self, qkv: &[usize]) -> (usize, usize, usize, usize, usize) {
        (qkv[0], qkv[1], self.h, self.hkv, qkv[2] / (self.h + 2 * self.hkv))
    }
}

/// q (B, H, T, hd) and k, v (B, Hkv, T, hd) from packed qkv (B, T, (H + 2·Hkv)·hd), q and k
/// rotated by the (T, hd) tables.
fn unpack_qkv<T: Real>(
    qkv: &[T],
    cos: &[T],
    sin: &[T],
    (b, t, h, hkv, hd): (usize, usize, usize, usize, usize),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let w = (h + 2 * hkv) * hd;
    let heads = |n: usize, col0: usize, rotate: bool| -> Vec<T> {
        let mut out = output_vec(b * n * t * hd);
        // One output row per (b, head, t).
        out.par_chunks_mut(hd).enumerate().with_min_len(rows_per_task(hd)).for_each(|(r, o)| {
            let (bi, hi, ti) = (r / (n * t), r / t % n, r % t);
            let x = &qkv[(bi * t + ti) * w + col0 + hi * hd..][..hd];
            if rotate {
                rotate_row(o, x, &cos[ti * hd..][..hd], &sin[ti * hd..][..hd], false);
            } else {
                o.copy_from_slice(x);
            }
        });
        out
    };
    (heads(h, 0, true), heads(hkv, h * hd, true), heads(hkv, (h + hkv) * hd, false))
}

/// The packed gradient (B, T, (H + 2·Hkv)·hd) from dq (B, H, T, hd) and dk, dv (B, Hkv, T, hd):
/// the transpose of `unpack_qkv` (rotations by −θ).
fn pack_qkv_grad<T: Real>(
    (dq, dk, dv): (&[T], &[T], &[T]),
    cos: &[T],
    sin: &[T],
    (b, t, h, hkv, hd): (usize, usize, usize, usize, usize),
) -> Vec<T> {
    let w = (h + 2 * hkv) * hd;
    let mut out = output_vec(b * t * w);
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
                    o.copy_from_slice(x);
                }
            }
        }
    });
    out
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

// ---------------------------------------------------------------------------------------
// LM head and cross-entropy, fused

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
    let op = LinearCrossEntropy { targets: std::sync::Arc::new(targets), logits: std::sync::Mutex::new(None) };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

struct LinearCrossEntropy {
    targets: std::sync::Arc<Vec<u32>>,
    /// The forward pass's (N, V) logits, for the backward pass.
    logits: std::sync::Mutex<Option<CpuStorage>>,
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
    let mut logits = output_vec(n * v);
    matmul_bands(&mut logits, v, Mat::at(x, 0, n, d, d), Mat::at(w, 0, v, d, d).t());
    let loss: Vec<T> =
        logits.par_chunks(v).zip(targets.par_iter()).map(|(row, &t)| ce_row_loss(row, t as usize)).collect();
    Ok((T::to_cpu_storage_owned(loss), T::to_cpu_storage_owned(logits)))
}

/// dx and dw from the kept logits (overwritten with their gradient), the per-row losses
/// (lse = loss + logit[t]) and the upstream gradient g (N,).
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
    let mut dx = output_vec(n * d);
    matmul_bands(&mut dx, d, dl, Mat::at(w, 0, v, d, d));
    let mut dw = output_vec(v * d);
    matmul_bands(&mut dw, d, dl.t(), Mat::at(x, 0, n, d, d));
    (dx, dw)
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

// ---------------------------------------------------------------------------------------
// LORS merge

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
    let mut m = w.to_vec();
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    matmul_ext(&mut m, inp, Mat::at(b, 0, out, r, r), Mat::at(a, 0, r, inp, inp), true, T::from_f64(scale), par);
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

#[cfg(test)]
mod tests {
    use super::Real;

    /// max8 gives the maximum for every length around its 8-lane chunks, skips NaN, and is
    /// −∞ for an empty slice.
    #[test]
    fn max8_is_the_maximum() {
        for n in 0..40usize {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.5).collect();
            let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max8(&v), want, "length {n}");
        }
        assert_eq!(super::max8(&[1.0f32, f32::NAN, 3.0, -2.0]), 3.0);
    }

    /// The vectorisable f32 exp stays within 3e-7 relative error of f64's exp over the whole
    /// range the kernels use, and is exact at 0.
    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = x.fast_exp() as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(0f32.fast_exp(), 1.0);
    }
}
