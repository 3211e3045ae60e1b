//! Strided matrix views and single-threaded (or row-banded) matrix products for the kernels:
//! OpenBLAS's `sgemm` where it is loaded (f32, with the `openblas` feature), the gemm crate
//! otherwise.

use super::Real;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A strided matrix view into a slice: element (i, j) is `d[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, T> {
    pub(super) d: &'a [T],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major (rows × cols) block starting at `offset`, rows `rs` apart.
    pub(super) fn at(d: &'a [T], offset: usize, rows: usize, cols: usize, rs: usize) -> Self {
        Self { d: &d[offset..], rows, cols, rs, cs: 1 }
    }
    pub(super) fn t(self) -> Self {
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
pub(super) fn matmul<T: Real>(dst: &mut [T], ld: usize, a: Mat<T>, b: Mat<T>, accumulate: bool) {
    // SAFETY: dst is an initialised slice borrowed mutably for its whole length.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst.len(), ld, a, b, accumulate, T::one(), gemm::Parallelism::None) }
}

/// `dst (m×n, rows ld apart) = a (m×k) · b (k×n)` into memory that need not be initialised,
/// single-threaded: afterwards the m rows' first n elements are written (all of the m rows
/// when n = ld).
pub(super) fn matmul_into<T: Real>(dst: &mut [MaybeUninit<T>], ld: usize, a: Mat<T>, b: Mat<T>) {
    // SAFETY: dst is borrowed mutably for its whole length, and without `accumulate` the
    // product only writes it.
    unsafe { gemm_raw(dst.as_mut_ptr().cast(), dst.len(), ld, a, b, false, T::one(), gemm::Parallelism::None) }
}

/// `dst (m×n, rows ld apart) = a (m×k) · b (k×n)` on every rayon thread, into memory that need
/// not be initialised (written as by [`matmul_into`]): the rows are split into one band per
/// thread, each a single-threaded product. On 2 cores this is up to 1.3x faster than gemm's own
/// Rayon split for long k (weight gradients) and level with it for the other training shapes
/// (`cargo bench --bench gemm_split`).
pub(super) fn matmul_bands<T: Real>(dst: &mut [MaybeUninit<T>], ld: usize, a: Mat<T>, b: Mat<T>) {
    let (m, n) = (a.rows, b.cols);
    assert!(n <= ld && m * ld <= dst.len(), "matmul: destination too small");
    // Bands of whole 16-row microkernel tiles.
    let band = m.div_ceil(rayon::current_num_threads()).div_ceil(16).max(1) * 16;
    dst[..m * ld].par_chunks_mut(band * ld).enumerate().for_each(|(i, d)| {
        let rows = band.min(m - i * band);
        matmul_into(d, ld, a.rows(i * band, rows), b);
    });
}

/// `dst (m×n, rows ld apart) += beta · a (m×k) · b (k×n)` on every rayon thread (gemm's own
/// split).
pub(super) fn matmul_add_scaled<T: Real>(dst: &mut [T], ld: usize, a: Mat<T>, b: Mat<T>, beta: T) {
    let parallelism = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // SAFETY: dst is an initialised slice borrowed mutably for its whole length.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst.len(), ld, a, b, true, beta, parallelism) }
}

/// `dst (m×n, rows ld apart) = [dst +] beta · a (m×k) · b (k×n)`: the bounds checks and the
/// OpenBLAS/gemm dispatch under [`matmul`], [`matmul_into`] and [`matmul_add_scaled`].
///
/// # Safety
/// `dst` is valid for reads and writes of `len` elements and aliases neither operand; with
/// `accumulate` those elements are initialised (without it they are only written).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: Real>(
    dst: *mut T,
    len: usize,
    ld: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    beta: T,
    parallelism: gemm::Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(a.cols == b.rows && a.in_bounds() && b.in_bounds(), "matmul: bad operand views");
    assert!(m == 0 || n == 0 || (m - 1) * ld + n <= len, "matmul: destination too small");
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
        // their slices, dst aliases neither operand (the caller's contract), and with beta = 0
        // (no `accumulate`) sgemm does not read dst.
        let done = unsafe {
            candle_core::cpu_backend::openblas::sgemm(
                (m, n, k),
                f(a),
                (a.rs, a.cs),
                f(b),
                (b.rs, b.cs),
                dst as *mut f32,
                ld,
                accumulate,
            )
        };
        if done {
            return;
        }
    }
    // SAFETY: the asserts above keep every index gemm touches inside the three slices, dst
    // aliases neither operand (the caller's contract), and gemm reads dst only when asked to
    // (`read_dst` = `accumulate`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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
