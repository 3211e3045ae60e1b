//! lors-lm patch: f32 matmul row bands through a system OpenBLAS (`openblas` feature).
//!
//! Single-threaded OpenBLAS per band of rows: the callers already run one band per thread,
//! so OpenBLAS's own thread pool is switched off (it would spin against Rayon's).

#[link(name = "openblas")]
extern "C" {
    fn cblas_sgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// The CBLAS (transpose flag, leading dimension) of a rows × cols row-major operand with
/// strides (rs, cs), or None when BLAS cannot express it (neither stride 1, a too short
/// leading dimension, or a size past i32).
fn layout(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(i32, i32)> {
    let (trans, ld) = if cs == 1 && rs >= cols.max(1) {
        (NO_TRANS, rs)
    } else if rs == 1 && cs >= rows.max(1) {
        (TRANS, cs)
    } else {
        return None;
    };
    Some((trans, i32::try_from(ld).ok()?))
}

/// C (m × n, rows `ldc` apart) = A (m × k, strides a_rs/a_cs) · B (k × n, strides b_rs/b_cs)
/// on this thread, or C += A · B with `accumulate` (beta = 1, which also skips OpenBLAS's
/// separate pass that zeroes C for beta = 0: callers whose C is already zero accumulate).
/// Returns false, touching nothing, for layouts BLAS cannot express.
///
/// # Safety
/// A, B and the m rows of C must be valid for the given sizes and strides, C writable and
/// disjoint from A and B.
pub unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) -> bool {
    static SINGLE_THREADED: std::sync::Once = std::sync::Once::new();
    let (Some((ta, lda)), Some((tb, ldb))) = (layout(m, k, a_rs, a_cs), layout(k, n, b_rs, b_cs)) else {
        return false;
    };
    let (Ok(mi), Ok(ni), Ok(ki), Ok(ldc)) = (i32::try_from(m), i32::try_from(n), i32::try_from(k), i32::try_from(ldc))
    else {
        return false;
    };
    if ldc < ni.max(1) {
        return false;
    }
    SINGLE_THREADED.call_once(|| openblas_set_num_threads(1));
    let beta = if accumulate { 1.0 } else { 0.0 };
    cblas_sgemm(ROW_MAJOR, ta, tb, mi, ni, ki, 1.0, a, lda, b, ldb, beta, c, ldc);
    true
}
