//! Fused, differentiable CPU kernels for the model's hot paths (candle custom ops with
//! hand-written backward passes).
//!
//! candle builds each of these from several basic ops, every one of which allocates and
//! writes a full tensor (and as many again in the backward pass); on the CPU that memory
//! traffic, not arithmetic, dominates a small model's step. Each op here reads its inputs once
//! and writes its output once, rows split across threads with rayon. One file per op, its
//! forward and backward passes together (llm.c style):
//!
//! | op | replaces | forward | backward | file |
//! |---|---|---|---|---|
//! | [`cross_entropy()`] | log-softmax, gather, mean | per-row loss | `g·(softmax − onehot)` | `cross_entropy.rs` |
//! | [`linear_cross_entropy()`] | LM head matmul, log-softmax, gather, and their backward | loss | blockwise dx, dw | `linear_cross_entropy.rs` |
//! | [`lors_merge()`] | B·A, scale, add (three stored tensors) | `W + s·B A` | dW, dB, dA | `lors_merge.rs` |
//! | [`attention()`] | qkᵀ, scale, mask, softmax (5 ops), P·v, transpose | per head | recomputes P per head | `attention.rs` |
//! | [`rms_norm()`] | sqr, mean, add, sqrt, recip, mul, mul | `x·inv·g` | dx and dg in one op | `rms_norm.rs` |
//! | [`rope_t()`] | transpose, contiguous, narrow, neg, cat, mul, mul, add | rotate | rotate by −θ | `rope.rs` |
//! | [`swiglu()`] | silu, mul | `silu(g)·u` | dg and du in one op | `swiglu.rs` |
//! | [`attention_qkv()`] | narrow ×3, [`rope_t()`] ×2, transpose, [`attention()`] on packed q, k, v | rotate, attend | packed dqkv | `attention_qkv.rs` |
//! | [`swiglu_packed()`] | narrow ×2, [`swiglu()`] on packed [gate, up] | `silu(g)·u` | packed [dg, du] | `swiglu.rs` |
//!
//! Shared by them: `matmul.rs` (strided matrix views and the OpenBLAS/gemm products) and
//! `reduce.rs` (vectorisable sums, dot products and maxima); here, the float types (`Real`,
//! with a vectorisable exp), the output buffers and the dispatch macros.
//!
//! [`attention()`] is FlashAttention's idea on a CPU: one task per head computes its scores,
//! masks and normalises them and multiplies by v without storing the (T, S) probabilities;
//! the backward pass recomputes them. Its matmuls run single-threaded per head (OpenBLAS
//! where it is loaded, see `crate::device::cpu_matmul`; gemm otherwise).
//!
//! They run on the CPU in f32 or f64 only; the model uses the plain candle compositions
//! (`Ops::Plain` in `model/ops.rs`, also the reference in the tests) on other devices. Each
//! op has a finite-difference gradient test and a comparison with the plain version
//! (tests/ops.rs).
//!
//! Outputs are allocated uninitialised (`uninit_output`): a kernel writes every element
//! through `MaybeUninit::write` and only then turns the buffer into a `Vec` (`assume_written`).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Tensor};
use candle_core::{DType, Result, WithDType};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

/// The float types the kernels are written for.
pub(crate) trait Real: WithDType + num_traits::Float + Send + Sync {
    fn as_mut_slice(s: &mut CpuStorage) -> Result<&mut [Self]>;
    /// eˣ, in a form the compiler can vectorise (f32: within 3 ulp from −87.3 to ln(f32::MAX),
    /// +∞ above; f64: std).
    fn fast_exp(self) -> Self;
}
impl Real for f32 {
    /// Cody–Waite range reduction `x = k·ln2 + r`, |r| ≤ ln2/2, then a degree-6 Taylor
    /// polynomial for eʳ (truncation error < 1.3e-7 relative) and 2ᵏ through the exponent
    /// bits. k runs from −126 to 128, one more value than f32 has normal exponents (2¹²⁸ is
    /// not a float, though eˣ up to ln(f32::MAX) ≈ 88.7228 is), so the product is formed as
    /// 2eʳ · 2ᵏ⁻¹; beyond ln(f32::MAX) it overflows to +∞. Plain arithmetic with no calls or
    /// branches, so loops over it compile to SIMD, unlike libm's `expf`. Inputs below −87.3
    /// give ~1e-38 instead of 0 (or a denormal): the kernels only exponentiate `x − max ≤ 0`
    /// terms whose sum is ≥ 1, where that is far below f32 resolution.
    #[inline(always)]
    fn fast_exp(self) -> Self {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // Up to 89 > ln(f32::MAX), so that k ≤ 128 and everything above overflows.
        let x = self.clamp(-87.3, 89.0);
        // Round to nearest by adding and removing 1.5·2²³ (no `floor` call: baseline x86-64
        // has no vector rounding instruction, and a libm call would stop vectorisation).
        const MAGIC: f32 = 12_582_912.0;
        let shifted = x * LOG2E + MAGIC;
        let k = shifted - MAGIC;
        let r = x - k * LN2_HI - k * LN2_LO;
        // 2eʳ, the Taylor coefficients doubled: doubling is exact at every step, so this is
        // exactly twice the polynomial for eʳ, at no extra cost.
        let p2 =
            2.0 + r * (2.0 + r * (1.0 + r * (2.0 / 6.0 + r * (2.0 / 24.0 + r * (2.0 / 120.0 + r * (2.0 / 720.0))))));
        // The integer k sits in the low mantissa bits of 1.5·2²³ + k; reading it from there
        // keeps the loop in vector integer instructions, where `k as i32` (a saturating cast
        // with a NaN check) compiles to one scalar conversion per lane.
        let k_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
        // 2ᵏ⁻¹ through the exponent bits, normal for k from −125 to 128; for k = −126 those
        // bits give 0, and the select (a vector max) substitutes the denormal 2⁻¹²⁷.
        const TWO_POW_M127: f32 = f32::from_bits(1 << 22);
        let half_scale = f32::from_bits(((k_int + 126) as u32) << 23);
        // One rounding of the exact product: the same value as `eʳ · 2ᵏ` wherever 2ᵏ is a float.
        p2 * if half_scale < TWO_POW_M127 { TWO_POW_M127 } else { half_scale }
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

/// The contiguous data of a tensor's storage (held through `Tensor::storage_and_layout`),
/// for the backward passes that run outside a custom op.
fn cpu_data<'a, T: Real>(s: &'a candle_core::Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        candle_core::Storage::Cpu(c) => data::<T>(c, l, "fused backward"),
        _ => bail!("the fused kernels run on the CPU only"),
    }
}

// ---------------------------------------------------------------------------------------
// Output buffers

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// Fill the kernels' output buffers with NaN before the kernels write them, so that an
/// element a kernel fails to write shows up in tests as NaN rather than as stale memory.
pub fn poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// An output buffer of n floats, not initialised: no zero fill, which would be a
/// single-threaded memset as large as the output. The kernel writes every element (with
/// `MaybeUninit::write`), then [`assume_written`] gives the `Vec`. With [`poison_outputs`]
/// on, every element starts as NaN instead.
fn uninit_output<T: Real>(n: usize) -> Box<[MaybeUninit<T>]> {
    let mut out = Box::new_uninit_slice(n);
    if POISON_OUTPUTS.load(Ordering::Relaxed) {
        out.iter_mut().for_each(|x| {
            x.write(T::nan());
        });
    }
    out
}

/// The output of [`uninit_output`] once the kernel has written it, as a `Vec` (no copy).
///
/// # Safety
/// Every element of `out` has been written. Each caller says why in a SAFETY comment.
unsafe fn assume_written<T>(out: Box<[MaybeUninit<T>]>) -> Vec<T> {
    // SAFETY: every element is initialised (the caller's contract).
    unsafe { out.assume_init() }.into_vec()
}

/// Copy `src` into the (possibly uninitialised) `dst` of the same length.
#[inline(always)]
fn write_slice<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "write_slice: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

// ---------------------------------------------------------------------------------------
// Threads and dispatch

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// `fn $name` runs the `#[inline(always)]` generic `$body` compiled for AVX2 where the CPU has
/// it (`is_x86_feature_detected!` caches the answer), and as built (baseline x86-64: SSE2)
/// elsewhere. The loops are the same, so the results are too; AVX2 doubles their vector width.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$doc])*
        fn $name<T: $crate::kernels::Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2<T: $crate::kernels::Real>($($arg: $ty),*) {
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

/// Dispatch a generic kernel on the storage's float type.
macro_rules! float_dispatch {
    ($s:expr, $name:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            candle_core::CpuStorage::F32(_) => $f::<f32>($($arg),*),
            candle_core::CpuStorage::F64(_) => $f::<f64>($($arg),*),
            other => candle_core::bail!(
                "{}: dtype {:?} is not supported (f32 or f64)",
                $name,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}

/// The `cpu_fwd` of a three-input custom op: `kernel::<T>(s1, l1, s2, l2, s3, l3, extra..)`
/// with T the float type of the first input.
macro_rules! cpu_fwd3 {
    ($self:ident, $kernel:ident ( $($extra:expr),* )) => {
        fn cpu_fwd(
            &$self,
            s1: &candle_core::CpuStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            l2: &candle_core::Layout,
            s3: &candle_core::CpuStorage,
            l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            float_dispatch!(s1, $self.name(), $kernel(s1, l1, s2, l2, s3, l3 $(, $extra)*))
        }
    };
}

// The ops (after the macros, which they use).
mod attention;
mod attention_qkv;
mod cross_entropy;
mod linear_cross_entropy;
mod lors_merge;
mod matmul;
mod reduce;
mod rms_norm;
mod rope;
mod swiglu;

pub use attention::attention;
pub use attention_qkv::attention_qkv;
pub use cross_entropy::cross_entropy;
pub use linear_cross_entropy::linear_cross_entropy;
pub use lors_merge::lors_merge;
pub use rms_norm::rms_norm;
pub use rope::rope_t;
pub use swiglu::{swiglu, swiglu_packed};

#[cfg(test)]
mod tests {
    use super::Real;

    /// The vectorisable f32 exp against f64's exp rounded to f32, on a dense grid from −87.3 up
    /// to ln(f32::MAX) and on every f32 within 200 ulp of that edge: within 3 ulp wherever eˣ
    /// is a finite f32 (also from 88.38 to 88.72, where 2ᵏ alone would overflow), +∞ just
    /// above ln(f32::MAX) and beyond, and exact at 0.
    #[test]
    fn fast_exp_is_accurate_up_to_overflow() {
        let ln_max = (f32::MAX as f64).ln(); // 88.722839…
                                             // The largest f32 whose exp is finite.
        let edge = (0..).map(|i| f32::from_bits((ln_max as f32).to_bits() - i)).find(|&x| (x as f64) <= ln_max);
        let edge = edge.expect("some f32 lies below ln(f32::MAX)");
        let near_edge = (0..400).map(|i| f32::from_bits(edge.to_bits() - 200 + i));
        let grid = (0..=1_761_000).map(|i| (-87.3 + i as f64 * 1e-4) as f32); // to 88.8
        let beyond = [88.73, 89.0, 89.5, 100.0, f32::INFINITY];
        let mut worst = (0, 0f32);
        for x in grid.chain(near_edge).chain(beyond) {
            let (got, want) = (x.fast_exp(), (x as f64).exp() as f32);
            assert_eq!(got.is_finite(), want.is_finite(), "exp({x}) is {want} in f32, fast_exp gives {got}");
            let ulps = got.to_bits().abs_diff(want.to_bits());
            if ulps > worst.0 {
                worst = (ulps, x);
            }
        }
        assert!(worst.0 <= 3, "fast_exp is {} ulp off at {}", worst.0, worst.1);
        assert!(f32::from_bits(edge.to_bits() + 1).fast_exp().is_infinite());
        assert_eq!(0f32.fast_exp(), 1.0);
    }

    /// Outputs start as NaN in the poison mode, so an element a kernel never writes shows.
    #[test]
    fn poisoned_outputs_start_as_nan() {
        super::poison_outputs(true);
        let out = super::uninit_output::<f32>(5);
        // SAFETY: poisoning wrote every element (NaN).
        assert!(unsafe { super::assume_written(out) }.iter().all(|x| x.is_nan()));
    }
}
