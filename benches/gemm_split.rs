//! How to spread one f32 matmul over the cores: gemm's own Rayon split, or one single-threaded
//! gemm per thread on a band of rows (split m) or of columns (split n)? The matmul shapes of a
//! bench-medium training step (4096 tokens, d 384, ffn 1024, vocab 4096), the three strategies
//! interleaved within each repetition, medians in GFLOP/s and as ratios to gemm's split; and
//! single-threaded gemm, for scale.
//! The patched candle (vendor/README.md) and `ops::matmul_bands` use split m.
//! Where OpenBLAS is installed (and LORS_LM_BLAS is not gemm), a last column: split m with one
//! single-threaded OpenBLAS sgemm per band (what the `openblas` feature runs instead of gemm),
//! as a ratio to gemm's split.
//! `cargo bench --bench gemm_split`
use gemm::{gemm, Parallelism};
use std::time::Instant;

/// Row-major C (m×n) = A (m×k, strides a_rs/a_cs) · B (k×n, row-major).
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    a_rs: usize,
    a_cs: usize,
    b: Vec<f32>,
}

impl Problem {
    /// C rows r0..r0+rows, columns c0..c0+cols, into `c` (row-major m×n), single-threaded or not.
    fn run(&self, c: Out, (r0, rows): (usize, usize), (c0, cols): (usize, usize), par: Parallelism) {
        assert!(r0 + rows <= self.m && c0 + cols <= self.n && c.1 == self.m * self.n);
        // SAFETY: the asserts keep the block inside C, whose blocks written at the same time
        // are disjoint; A and B are read inside their vectors (rows r0.. of A, columns c0.. of B).
        unsafe {
            gemm(
                rows,
                cols,
                self.k,
                c.0.add(r0 * self.n + c0),
                1,
                self.n as isize,
                false,
                self.a.as_ptr().add(r0 * self.a_rs),
                self.a_cs as isize,
                self.a_rs as isize,
                self.b.as_ptr().add(c0),
                1,
                self.n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    }
}

#[cfg(feature = "openblas")]
impl Problem {
    /// C rows r0..r0+rows with the `openblas` feature's single-threaded OpenBLAS sgemm.
    fn run_openblas(&self, c: Out, (r0, rows): (usize, usize)) {
        assert!(r0 + rows <= self.m && c.1 == self.m * self.n);
        // SAFETY: as in `run`: rows r0.. of C and A exist, the bands written at once are disjoint.
        let done = unsafe {
            candle_core::cpu_backend::openblas::sgemm(
                (rows, self.n, self.k),
                self.a.as_ptr().add(r0 * self.a_rs),
                (self.a_rs, self.a_cs),
                self.b.as_ptr(),
                (self.n, 1),
                c.0.add(r0 * self.n),
                self.n,
                false,
            )
        };
        assert!(done, "OpenBLAS declined a row-major or transposed operand");
    }
}

/// The output matrix (pointer, length), shared by threads that write disjoint blocks.
#[derive(Clone, Copy)]
struct Out(*mut f32, usize);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Two halves (multiples of 16) of `len`.
fn halves(len: usize) -> [(usize, usize); 2] {
    let h = (len / 2).div_ceil(16) * 16;
    [(0, h), (h, len - h)]
}

fn main() {
    lors_lm::device::tune_allocator();
    let threads = rayon::current_num_threads();
    println!("{threads} threads; GFLOP/s, median of 13 interleaved repetitions");
    #[cfg(feature = "openblas")]
    let openblas = candle_core::cpu_backend::openblas::backend().is_ok();
    #[cfg(not(feature = "openblas"))]
    let openblas = false;
    println!(
        "{:<22} {:>8} {:>16} {:>16} {:>9}{}",
        "m x n x k",
        "gemm",
        "split m",
        "split n",
        "1 thread",
        if openblas { "   OpenBLAS split m" } else { "" }
    );
    // (m, n, k, A stored transposed): forward x·Wᵀ and input gradients dy·W have m = tokens;
    // weight gradients dyᵀ·x have k = tokens and a transposed A.
    for (m, n, k, at) in [
        (4096, 384, 384, false),
        (4096, 1024, 384, false),
        (4096, 384, 1024, false),
        (4096, 4096, 384, false),
        (4096, 384, 4096, false),
        (384, 384, 4096, true),
        (1024, 384, 4096, true),
        (384, 1024, 4096, true),
        (4096, 384, 4096, true),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.1).collect();
        let (a_rs, a_cs) = if at { (1, m) } else { (k, 1) };
        let p = Problem { m, n, k, a, a_rs, a_cs, b };
        let mut c = vec![0f32; m * n];
        let out = Out(c.as_mut_ptr(), c.len());
        // Five strategies with OpenBLAS, four without.
        let mut times: Vec<Vec<f64>> = vec![vec![]; if openblas { 5 } else { 4 }];
        for rep in 0..15 {
            for (s, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                match s {
                    0 => p.run(out, (0, m), (0, n), Parallelism::Rayon(threads)),
                    3 => p.run(out, (0, m), (0, n), Parallelism::None),
                    #[cfg(feature = "openblas")]
                    4 => {
                        let [x, y] = halves(m);
                        rayon::join(|| p.run_openblas(out, x), || p.run_openblas(out, y));
                    }
                    1 | 2 => {
                        let [x, y] = if s == 1 { halves(m) } else { halves(n) };
                        let block = |h: (usize, usize)| {
                            let (rows, cols) = if s == 1 { (h, (0, n)) } else { ((0, m), h) };
                            p.run(out, rows, cols, Parallelism::None)
                        };
                        rayon::join(|| block(x), || block(y));
                    }
                    _ => unreachable!("strategy {s}"),
                }
                if rep >= 2 {
                    t.push(start.elapsed().as_secs_f64());
                }
            }
        }
        let med: Vec<f64> = times
            .iter_mut()
            .map(|t| {
                t.sort_by(f64::total_cmp);
                t[t.len() / 2]
            })
            .collect();
        let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        let shape = format!("{m} x {n} x {k}{}", if at { " (Aᵀ)" } else { "" });
        let ob = if openblas { format!(" {:>9.1} ({:.2}x)", gf(med[4]), med[0] / med[4]) } else { String::new() };
        println!(
            "{shape:<22} {:>8.1} {:>8.1} ({:.2}x) {:>8.1} ({:.2}x) {:>9.1}{ob}",
            gf(med[0]),
            gf(med[1]),
            med[0] / med[1],
            gf(med[2]),
            med[0] / med[2],
            gf(med[3])
        );
    }
}
