//! lors-lm patch: f32 matmul row bands through a system OpenBLAS (`openblas` feature).
//!
//! The library is loaded at run time (`libopenblas.so.0`, as Debian's and Ubuntu's
//! `libopenblas0` install it), not linked: a binary built with the feature runs anywhere, and
//! uses OpenBLAS where it is installed and candle's gemm where it is not ([`backend`] says
//! which). `LORS_LM_BLAS=gemm` keeps gemm even where OpenBLAS is installed.
//!
//! Single-threaded OpenBLAS per band of rows: the callers already run one band per thread,
//! so OpenBLAS's own thread pool is switched off (it would spin against Rayon's).

use std::sync::OnceLock;

/// `cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type SgemmFn =
    unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);

struct OpenBlas {
    sgemm: SgemmFn,
    /// The file name it was loaded from.
    name: &'static str,
    /// Keeps the library mapped while `sgemm` may be called.
    _lib: libloading::Library,
}

/// The names tried, in order.
#[cfg(not(target_os = "macos"))]
const LIBRARIES: [&str; 2] = ["libopenblas.so.0", "libopenblas.so"];
#[cfg(target_os = "macos")]
const LIBRARIES: [&str; 2] = ["libopenblas.0.dylib", "libopenblas.dylib"];

static OPENBLAS: OnceLock<Result<OpenBlas, String>> = OnceLock::new();

/// (lors-lm itself validates `LORS_LM_BLAS` and reports the outcome: `device::cpu_matmul`.)
fn load() -> Result<OpenBlas, String> {
    if std::env::var("LORS_LM_BLAS").as_deref() == Ok("gemm") {
        return Err("LORS_LM_BLAS=gemm".into());
    }
    let mut errors = vec![];
    for name in LIBRARIES {
        // SAFETY: loading OpenBLAS runs its initialisers, which only set up its thread pool.
        let lib = match unsafe { libloading::Library::new(name) } {
            Ok(lib) => lib,
            Err(e) => {
                // libloading's message is "dlopen failed"; the reason is its source.
                use std::error::Error;
                errors.push(e.source().map_or_else(|| format!("{name}: {e}"), |s| s.to_string()));
                continue;
            }
        };
        // SAFETY: the two symbols have these C signatures in every OpenBLAS (cblas.h).
        let (sgemm, set_threads) = unsafe {
            let sgemm = lib.get::<SgemmFn>(b"cblas_sgemm\0").map_err(|e| format!("{name}: {e}"))?;
            let threads = lib
                .get::<unsafe extern "C" fn(i32)>(b"openblas_set_num_threads\0")
                .map_err(|e| format!("{name}: {e}"))?;
            (*sgemm, *threads)
        };
        // SAFETY: as above; called once, before any sgemm.
        unsafe { set_threads(1) };
        return Ok(OpenBlas { sgemm, name, _lib: lib });
    }
    Err(format!("no OpenBLAS found ({})", errors.join("; ")))
}

fn openblas() -> Option<&'static OpenBlas> {
    OPENBLAS.get_or_init(load).as_ref().ok()
}

/// `Ok(file name)` when f32 matmul bands run through OpenBLAS, or `Err(why not)` when they
/// run through gemm (`LORS_LM_BLAS=gemm`, or no library found). Loads it on first use.
pub fn backend() -> Result<&'static str, &'static str> {
    match OPENBLAS.get_or_init(load) {
        Ok(o) => Ok(o.name),
        Err(e) => Err(e.as_str()),
    }
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
/// Returns false, touching nothing, for layouts BLAS cannot express or when OpenBLAS is not
/// loaded (see [`backend`]).
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
    let Some(blas) = openblas() else { return false };
    let beta = if accumulate { 1.0 } else { 0.0 };
    (blas.sgemm)(ROW_MAJOR, ta, tb, mi, ni, ki, 1.0, a, lda, b, ldb, beta, c, ldc);
    true
}
