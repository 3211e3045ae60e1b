//! Linear layers for a handful of rows: decoding's matrix-vector products.
//!
//! `y = x·Wᵀ + Σ_p s_p·(t_p·B_pᵀ)` on the output columns of part p, for x (m, in) with m
//! small (one row per sequence of a decoding batch), W (out, in) given as one or more
//! row-stacked segments, and the optional low-rank parts of a factored LORS layer
//! (`t = x·Aᵀ`, computed by a first call). Columns no segment covers have no base weight
//! (a `lowrank` model's `W = s·B A`): only their low-rank term is computed. Every weight row is read once and dotted with all
//! m rows of x while it is in L1, the outputs are written once, and the rows of W are split
//! across the rayon threads in tasks of a few tens of KiB.
//!
//! Why not candle's matmul: for m = 1 it goes to the gemm crate, which packs x and splits
//! the work its own way; this loop streams W at the machine's read bandwidth
//! (docs/performance.md, "Inference"). Inference only: the output carries no gradient.

use candle_core::{bail, DType, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

/// One run of weight rows: W (rows, in), row-major, producing output columns
/// `col..col + rows`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub w: &'a [f32],
    pub col: usize,
}

/// A low-rank term on output columns `col..col + rows`: `scale · t[:, t_col..t_col + rank] · Bᵀ`
/// with B (rows, rank).
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    pub b: &'a [f32],
    pub col: usize,
    pub rank: usize,
    pub t_col: usize,
    pub scale: f32,
}

/// Weight bytes per rayon task: small enough to balance two to a few dozen threads, large
/// enough to amortise scheduling.
const TASK_BYTES: usize = 64 << 10;
/// Below this many weight bytes a call runs on the calling thread (a rayon dispatch costs
/// a few microseconds, as much as streaming 100 KiB).
const PARALLEL_BYTES: usize = 256 << 10;

/// A run of output columns computed by one task: its weight rows (None: no base), and the
/// low-rank term covering them, if any.
struct Task<'a> {
    w: Option<&'a [f32]>,
    low: Option<(&'a [f32], LowRank<'a>)>,
    rows: usize,
}

/// `y (m, out) = x (m, in) · Wᵀ + low-rank terms`, W the segments stacked by output column.
/// `t` (m, t_cols) holds `x·Aᵀ` of the low-rank terms. Segments (whole rows, in column order)
/// and low-rank terms must not overlap among themselves; every output column needs a
/// segment, a low-rank term, or both.
pub fn linear_rows(
    x: &[f32],
    (m, inp): (usize, usize),
    segments: &[Segment],
    t: Option<(&[f32], usize)>,
    low: &[LowRank],
    out: usize,
) -> Result<Vec<f32>> {
    if x.len() != m * inp || inp == 0 {
        bail!("linear_rows: x has {} values, not {m} × {inp}", x.len());
    }
    let tasks = plan(segments, low, inp, out)?;
    if !low.is_empty() {
        match t {
            Some((t, cols)) if t.len() == m * cols && low.iter().all(|l| l.t_col + l.rank <= cols) => {}
            _ => bail!("linear_rows: low-rank terms need t = x·Aᵀ with all their columns"),
        }
    }
    let (t, t_cols) = t.unwrap_or((&[], 0));
    // Outputs column-major (out, m): each task owns a contiguous run; transposed at the end.
    let mut yt = vec![0f32; out * m];
    let mut chunks = Vec::with_capacity(tasks.len());
    let mut rest = yt.as_mut_slice();
    for task in &tasks {
        let (head, tail) = rest.split_at_mut(task.rows * m);
        chunks.push((task, head));
        rest = tail;
    }
    let run = |(task, y): (&Task, &mut [f32])| rows_kernel(task, x, (m, inp), (t, t_cols), y);
    let bytes: usize = tasks.iter().map(|t| 4 * (t.w.map_or(0, |w| w.len()) + t.low.map_or(0, |(b, _)| b.len()))).sum();
    if bytes < PARALLEL_BYTES || rayon::current_num_threads() == 1 {
        chunks.into_iter().for_each(run);
    } else {
        chunks.into_par_iter().for_each(run);
    }
    if m == 1 {
        return Ok(yt);
    }
    let mut y = vec![0f32; m * out];
    for (o, col) in yt.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * out + o] = *v;
        }
    }
    Ok(y)
}

/// Split the output columns into tasks at segment and low-rank boundaries and every
/// `TASK_BYTES` of weights.
fn plan<'a>(segments: &[Segment<'a>], low: &[LowRank<'a>], inp: usize, out: usize) -> Result<Vec<Task<'a>>> {
    // Column ranges [start, end) of the segments and of the low-rank terms.
    let mut seg_cols = Vec::with_capacity(segments.len());
    for s in segments {
        let rows = s.w.len() / inp;
        if rows * inp != s.w.len() || rows == 0 || s.col < seg_cols.last().map_or(0, |&(_, end)| end) {
            bail!("linear_rows: segments must be whole rows of {inp} values, in column order, not overlapping");
        }
        seg_cols.push((s.col, s.col + rows));
    }
    let mut low_cols: Vec<(usize, usize)> = Vec::with_capacity(low.len());
    for l in low {
        if l.rank == 0 || l.b.is_empty() || l.b.len() % l.rank != 0 {
            bail!("linear_rows: a low-rank term's B has {} values, not whole rows of rank {}", l.b.len(), l.rank);
        }
        let cols = (l.col, l.col + l.b.len() / l.rank);
        if low_cols.iter().any(|&(a, b)| a < cols.1 && cols.0 < b) {
            bail!("linear_rows: low-rank terms overlap on output columns {}..{}", cols.0, cols.1);
        }
        low_cols.push(cols);
    }
    if let Some(&(_, end)) = seg_cols.iter().chain(&low_cols).find(|(_, end)| *end > out) {
        bail!("linear_rows: weights reach output column {end}, past the {out} outputs");
    }
    let mut tasks = vec![];
    let mut c = 0;
    while c < out {
        let seg = seg_cols.iter().position(|&(a, b)| a <= c && c < b);
        let lr = low_cols.iter().position(|&(a, b)| a <= c && c < b);
        if seg.is_none() && lr.is_none() {
            bail!("linear_rows: output column {c} has neither a weight row nor a low-rank term");
        }
        // The run ends where its segment or term ends, or where the next one starts.
        let end = seg_cols
            .iter()
            .chain(&low_cols)
            .map(|&(a, b)| if a > c { a } else { b })
            .filter(|&e| e > c)
            .fold(out, usize::min);
        let row_values = seg.map_or(0, |_| inp) + lr.map_or(0, |k| low[k].rank);
        let n = (TASK_BYTES / (4 * row_values)).max(4).min(end - c);
        let w = seg.map(|k| {
            let r = c - segments[k].col;
            &segments[k].w[r * inp..(r + n) * inp]
        });
        let low = lr.map(|k| {
            let (l, r) = (low[k], c - low[k].col);
            (&l.b[r * l.rank..(r + n) * l.rank], l)
        });
        tasks.push(Task { w, low, rows: n });
        c += n;
    }
    Ok(tasks)
}

/// Four dot products `w_k · x` (all slices of one length).
type Dot4 = fn([&[f32]; 4], &[f32]) -> [f32; 4];

/// The fastest `Dot4` this CPU runs: AVX-512, AVX2 + FMA, or portable.
fn dot4_for_cpu() -> Dot4 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return x86::dot4_avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return x86::dot4_avx2;
        }
    }
    dot4_portable
}

/// The task's outputs, column-major: y[j·m + i] for weight row j and x row i.
fn rows_kernel(task: &Task, x: &[f32], (m, inp): (usize, usize), (t, t_cols): (&[f32], usize), y: &mut [f32]) {
    let dot4 = dot4_for_cpu();
    // Without a base weight y stays zero (as allocated) before the low-rank term.
    if let Some(tw) = task.w {
        let mut j = 0;
        // Four weight rows at a time: four streams and independent accumulator chains.
        while j + 4 <= task.rows {
            let w = |k: usize| &tw[(j + k) * inp..(j + k + 1) * inp];
            let rows = [w(0), w(1), w(2), w(3)];
            for i in 0..m {
                let d = dot4(rows, &x[i * inp..(i + 1) * inp]);
                for (k, v) in d.into_iter().enumerate() {
                    y[(j + k) * m + i] = v;
                }
            }
            j += 4;
        }
        for j in j..task.rows {
            let w = &tw[j * inp..(j + 1) * inp];
            for i in 0..m {
                y[j * m + i] = dot4([w, w, w, w], &x[i * inp..(i + 1) * inp])[0];
            }
        }
    }
    // The low-rank term: rows of B (rank values each) dotted with the row's t, four at a time.
    if let Some((b, l)) = task.low {
        let row = |j: usize| &b[j * l.rank..(j + 1) * l.rank];
        for i in 0..m {
            let t = &t[i * t_cols + l.t_col..i * t_cols + l.t_col + l.rank];
            let mut j = 0;
            while j + 4 <= task.rows {
                let d = dot4([row(j), row(j + 1), row(j + 2), row(j + 3)], t);
                for (k, v) in d.into_iter().enumerate() {
                    y[(j + k) * m + i] += l.scale * v;
                }
                j += 4;
            }
            for j in j..task.rows {
                y[j * m + i] += l.scale * dot4([row(j); 4], t)[0];
            }
        }
    }
}

/// Eight running sums per row (the compiler may vectorise them; SSE2 on baseline x86-64).
fn dot4_portable(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    w.map(|w| {
        let mut acc = [0f32; 8];
        let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
        let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
        for (a, b) in wc.zip(xc) {
            for l in 0..8 {
                acc[l] += a[l] * b[l];
            }
        }
        acc.iter().sum::<f32>() + tail
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16 lanes × 2 accumulators per row: eight independent FMA chains.
    pub fn dot4_avx512(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        assert!(w.iter().all(|w| w.len() == x.len()), "dot4: rows and x differ in length");
        // SAFETY: chosen only where the CPU has AVX-512F (`dot4_for_cpu`); every load reads
        // 16 values at offsets i..i + 16 <= len of equal-length slices (asserted above).
        unsafe { avx512(w, x) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        let (xp, wp) = (x.as_ptr(), w.map(|w| w.as_ptr()));
        let mut a = [_mm512_setzero_ps(); 8];
        let mut i = 0;
        while i + 32 <= n {
            let (x0, x1) = (_mm512_loadu_ps(xp.add(i)), _mm512_loadu_ps(xp.add(i + 16)));
            for k in 0..4 {
                a[k] = _mm512_fmadd_ps(_mm512_loadu_ps(wp[k].add(i)), x0, a[k]);
                a[k + 4] = _mm512_fmadd_ps(_mm512_loadu_ps(wp[k].add(i + 16)), x1, a[k + 4]);
            }
            i += 32;
        }
        if i + 16 <= n {
            let x0 = _mm512_loadu_ps(xp.add(i));
            for k in 0..4 {
                a[k] = _mm512_fmadd_ps(_mm512_loadu_ps(wp[k].add(i)), x0, a[k]);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for k in 0..4 {
            let tail: f32 = (i..n).map(|c| *wp[k].add(c) * *xp.add(c)).sum();
            out[k] = _mm512_reduce_add_ps(_mm512_add_ps(a[k], a[k + 4])) + tail;
        }
        out
    }

    /// 8 lanes × 2 accumulators per row: eight independent FMA chains.
    pub fn dot4_avx2(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        assert!(w.iter().all(|w| w.len() == x.len()), "dot4: rows and x differ in length");
        // SAFETY: chosen only where the CPU has AVX2 and FMA (`dot4_for_cpu`); every load
        // reads 8 values at offsets i..i + 8 <= len of equal-length slices (asserted above).
        unsafe { avx2(w, x) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        let (xp, wp) = (x.as_ptr(), w.map(|w| w.as_ptr()));
        let mut a = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 16 <= n {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[k].add(i)), x0, a[k]);
                a[k + 4] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[k].add(i + 8)), x1, a[k + 4]);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for k in 0..4 {
            let v = _mm256_add_ps(a[k], a[k + 4]);
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            let tail: f32 = (i..n).map(|c| *wp[k].add(c) * *xp.add(c)).sum();
            out[k] = lanes.iter().sum::<f32>() + tail;
        }
        out
    }
}

/// A read lock on a contiguous f32 CPU tensor, to borrow its values as a slice.
pub struct F32View<'a> {
    storage: StorageRef<'a>,
    range: (usize, usize),
}

impl<'a> F32View<'a> {
    /// Lock `t`'s storage; errors unless it is f32, on the CPU and contiguous.
    pub fn new(t: &'a Tensor, what: &str) -> Result<Self> {
        if t.dtype() != DType::F32 {
            bail!("{what}: expected f32, got {:?}", t.dtype());
        }
        let (storage, layout) = t.storage_and_layout();
        let Some(range) = layout.contiguous_offsets() else { bail!("{what}: expected a contiguous tensor") };
        if !matches!(&*storage, Storage::Cpu(_)) {
            bail!("{what}: expected a CPU tensor");
        }
        Ok(Self { storage, range })
    }

    pub fn slice(&self) -> Result<&[f32]> {
        let Storage::Cpu(cpu) = &*self.storage else { bail!("expected a CPU tensor") };
        Ok(&cpu.as_slice::<f32>()?[self.range.0..self.range.1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop.
    fn reference(x: &[f32], m: usize, inp: usize, w: &[f32], out: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * out];
        for i in 0..m {
            for o in 0..out {
                y[i * out + o] = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_the_triple_loop_for_odd_shapes_and_segments() -> Result<()> {
        for (m, inp, out) in [(1, 37, 9), (3, 64, 130), (8, 300, 1031), (2, 1024, 600)] {
            let (x, w) = (values(m * inp, 1), values(out * inp, 2));
            let split = out / 3;
            let segs = [Segment { w: &w[..split * inp], col: 0 }, Segment { w: &w[split * inp..], col: split }];
            let got = linear_rows(&x, (m, inp), &segs, None, &[], out)?;
            let want = reference(&x, m, inp, &w, out);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-3, "m {m} in {inp} out {out}: max error {err}");
        }
        Ok(())
    }

    #[test]
    fn low_rank_terms_land_on_their_columns_only() -> Result<()> {
        let (m, inp, out, r) = (2, 48, 40, 3);
        let (x, w) = (values(m * inp, 3), values(out * inp, 4));
        let b = values(10 * r, 5);
        let t = values(m * (r + 1), 6); // one spare leading column: t_col = 1
        let low = [LowRank { b: &b, col: 20, rank: r, t_col: 1, scale: 0.5 }];
        let got = linear_rows(&x, (m, inp), &[Segment { w: &w, col: 0 }], Some((&t, r + 1)), &low, out)?;
        let mut want = reference(&x, m, inp, &w, out);
        for i in 0..m {
            for j in 0..10 {
                let s: f32 = (0..r).map(|k| b[j * r + k] * t[i * (r + 1) + 1 + k]).sum();
                want[i * out + 20 + j] += 0.5 * s;
            }
        }
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "max error {err}");
        Ok(())
    }

    #[test]
    fn every_dot4_this_cpu_runs_agrees_with_the_plain_sum() {
        let mut impls: Vec<(&str, Dot4)> = vec![("portable", dot4_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                impls.push(("avx512", x86::dot4_avx512));
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                impls.push(("avx2", x86::dot4_avx2));
            }
        }
        for n in [1, 7, 16, 33, 100, 512] {
            let x = values(n, 9);
            let w: Vec<Vec<f32>> = (0..4).map(|k| values(n, 10 + k)).collect();
            let want: Vec<f32> = w.iter().map(|w| w.iter().zip(&x).map(|(a, b)| a * b).sum()).collect();
            for (name, dot4) in &impls {
                let got = dot4([&w[0], &w[1], &w[2], &w[3]], &x);
                for k in 0..4 {
                    assert!((got[k] - want[k]).abs() < 1e-3, "{name}, n {n}, row {k}: {} vs {}", got[k], want[k]);
                }
            }
        }
    }

    #[test]
    fn columns_without_a_segment_get_their_low_rank_term_only() -> Result<()> {
        // Columns 0..6: a base; 6..14: only s·t·Bᵀ (a lowrank projection); 14..20: both.
        let (m, inp, r) = (3, 40, 2);
        let x = values(m * inp, 11);
        let (w0, w2) = (values(6 * inp, 12), values(6 * inp, 13));
        let (b1, b2) = (values(8 * r, 14), values(6 * r, 15));
        let t = values(m * 2 * r, 16);
        let segs = [Segment { w: &w0, col: 0 }, Segment { w: &w2, col: 14 }];
        let low = [
            LowRank { b: &b1, col: 6, rank: r, t_col: 0, scale: 2.0 },
            LowRank { b: &b2, col: 14, rank: r, t_col: r, scale: 0.5 },
        ];
        let got = linear_rows(&x, (m, inp), &segs, Some((&t, 2 * r)), &low, 20)?;
        let (y0, y2) = (reference(&x, m, inp, &w0, 6), reference(&x, m, inp, &w2, 6));
        for i in 0..m {
            let lr = |b: &[f32], j: usize, t_col: usize| -> f32 {
                (0..r).map(|k| b[j * r + k] * t[i * 2 * r + t_col + k]).sum()
            };
            let mut want = [0f32; 20];
            for j in 0..6 {
                want[j] = y0[i * 6 + j];
                want[14 + j] = y2[i * 6 + j] + 0.5 * lr(&b2, j, r);
            }
            for j in 0..8 {
                want[6 + j] = 2.0 * lr(&b1, j, 0);
            }
            for (o, w) in want.iter().enumerate() {
                let g = got[i * 20 + o];
                assert!((g - w).abs() < 1e-4, "row {i}, column {o}: {g} vs {w}");
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_columns_with_nothing_and_overlaps() {
        let w = values(4 * 8, 7);
        let x = values(8, 8);
        let b = values(3, 9);
        let t = values(1, 10);
        // Column 0 has neither a weight row nor a low-rank term.
        let gap = [Segment { w: &w, col: 1 }];
        assert!(linear_rows(&x, (1, 8), &gap, None, &[], 5).is_err());
        // Columns 4..5 likewise.
        assert!(linear_rows(&x, (1, 8), &[Segment { w: &w, col: 0 }], None, &[], 5).is_err());
        // A segment past the outputs.
        assert!(linear_rows(&x, (1, 8), &[Segment { w: &w, col: 2 }], None, &[], 5).is_err());
        // Overlapping segments.
        let two = [Segment { w: &w, col: 0 }, Segment { w: &w, col: 2 }];
        assert!(linear_rows(&x, (1, 8), &two, None, &[], 6).is_err());
        // Overlapping low-rank terms.
        let low = [
            LowRank { b: &b, col: 0, rank: 1, t_col: 0, scale: 1.0 },
            LowRank { b: &b, col: 2, rank: 1, t_col: 0, scale: 1.0 },
        ];
        assert!(linear_rows(&x, (1, 8), &[Segment { w: &w, col: 0 }], Some((&t, 1)), &low, 5).is_err());
        // The gap filled by a low-rank term is fine.
        let fill = [LowRank { b: &b[..1], col: 4, rank: 1, t_col: 0, scale: 1.0 }];
        assert!(linear_rows(&x, (1, 8), &[Segment { w: &w, col: 0 }], Some((&t, 1)), &fill, 5).is_ok());
    }
}
