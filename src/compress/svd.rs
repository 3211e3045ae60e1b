//! Truncated SVD of a residual `W_l − W_shared` into LORS factors, through faer.
//!
//! For R (out×in) = U Σ Vᵀ (thin: k = min(out, in) singular values, descending), the rank-r
//! factors are `B = U_r Σ_r^½` (out×r) and `A = Σ_r^½ V_rᵀ` (r×in): B A = U_r Σ_r V_rᵀ is the
//! best rank-r approximation of R (Eckart–Young), exact at r = k, and the singular values are
//! split evenly so that neither factor is much larger than the other.
//!
//! **Activation-aware** ([`Whitening`], SVD-LLM, Wang et al. 2024): what matters is not
//! ‖R − B A‖_F but the error on the projection's inputs, ‖(R − B A) X‖_F over calibration
//! inputs X (in × N). With G = X Xᵀ + λI = Q Λ Qᵀ and S = Q Λ^½ (so S Sᵀ = G), ‖E X‖² =
//! ‖E S‖², so the best rank-r approximation in that norm is the truncated SVD of R S cut back
//! through S⁻¹: for R S = U Σ Vᵀ, `B = U_r Σ_r^½`, `A = Σ_r^½ V_rᵀ S⁻¹`; still exact at full
//! rank, and the "energy" of a rank is the fraction of ‖R X‖² it keeps.

use anyhow::{bail, Result};
use faer::{Mat, Side};

/// The thin SVD of one residual, ready to be cut at any rank.
pub struct ResidualSvd {
    pub rows: usize,
    pub cols: usize,
    /// Singular values, descending (k = min(rows, cols) of them).
    pub sigma: Vec<f64>,
    /// U (rows × k), row-major.
    u: Vec<f32>,
    /// V (cols × k), row-major.
    v: Vec<f32>,
}

/// The input whitening of one projection input: S and (S⁻¹)ᵀ from the Gram matrix of its
/// calibration inputs.
pub struct Whitening {
    /// S = Q Λ^½ (n × n).
    s: Mat<f32>,
    /// (S⁻¹)ᵀ = Q Λ^{-½} (n × n).
    s_inv_t: Mat<f32>,
}

/// Added to the Gram matrix's diagonal, relative to its mean diagonal value: keeps S
/// invertible where some input directions were never seen in calibration.
pub const WHITENING_DAMPING: f64 = 1e-2;

impl Whitening {
    /// From the row-major `n × n` Gram matrix `gram` = Σ x xᵀ of the inputs.
    pub fn new(gram: &[f64], n: usize) -> Result<Self> {
        if gram.len() != n * n || gram.iter().any(|x| !x.is_finite()) {
            bail!("whitening: a {n}×{n} Gram matrix needs {} finite values (got {})", n * n, gram.len());
        }
        let mean_diag = (0..n).map(|i| gram[i * n + i]).sum::<f64>() / n as f64;
        if mean_diag <= 0.0 {
            bail!("whitening: the calibration inputs are all zero");
        }
        let damp = WHITENING_DAMPING * mean_diag;
        let g = Mat::<f64>::from_fn(n, n, |i, j| {
            0.5 * (gram[i * n + j] + gram[j * n + i]) + if i == j { damp } else { 0.0 }
        });
        let evd = g
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| anyhow::anyhow!("whitening: eigendecomposition failed: {e:?}"))?;
        let (q, lambda) = (evd.U(), evd.S().column_vector());
        // Eigenvalues below the damping are rounding: the damped matrix has none.
        let l = |j: usize| lambda[j].max(damp);
        Ok(Self {
            s: Mat::from_fn(n, n, |i, j| (q[(i, j)] * l(j).sqrt()) as f32),
            s_inv_t: Mat::from_fn(n, n, |i, j| (q[(i, j)] / l(j).sqrt()) as f32),
        })
    }
}

impl ResidualSvd {
    /// SVD of the row-major `rows × cols` matrix `r`.
    pub fn new(r: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new_whitened(r, rows, cols, None)
    }

    /// SVD of `r` S (activation-aware, see the module docs) when a whitening of its input is
    /// given, else of `r` itself.
    pub fn new_whitened(r: &[f32], rows: usize, cols: usize, white: Option<&Whitening>) -> Result<Self> {
        if r.len() != rows * cols {
            bail!("SVD: {} values for a {rows}×{cols} matrix", r.len());
        }
        if r.iter().any(|x| !x.is_finite()) {
            bail!("SVD: the {rows}×{cols} matrix holds a non-finite value");
        }
        let mut m = Mat::<f32>::from_fn(rows, cols, |i, j| r[i * cols + j]);
        if let Some(w) = white {
            if w.s.nrows() != cols {
                bail!("whitening: a {0}×{0} whitening for a matrix of {cols} columns", w.s.nrows());
            }
            m = &m * &w.s;
        }
        let svd = m.thin_svd().map_err(|e| anyhow::anyhow!("SVD of a {rows}×{cols} matrix did not converge: {e:?}"))?;
        let k = rows.min(cols);
        let (u, s) = (svd.U(), svd.S().column_vector());
        // A = Σ^½ Vᵀ S⁻¹ = Σ^½ ((S⁻¹)ᵀ V)ᵀ: V is replaced by (S⁻¹)ᵀ V.
        let v = match white {
            Some(w) => &w.s_inv_t * svd.V(),
            None => svd.V().to_owned(),
        };
        let v = v.as_ref();
        Ok(Self {
            rows,
            cols,
            sigma: (0..k).map(|i| s[i] as f64).collect(),
            u: (0..rows).flat_map(|i| (0..k).map(move |j| u[(i, j)])).collect(),
            v: (0..cols).flat_map(|i| (0..k).map(move |j| v[(i, j)])).collect(),
        })
    }

    /// Number of singular values, min(rows, cols).
    pub fn k(&self) -> usize {
        self.sigma.len()
    }

    /// Σ σ_i², the residual's squared Frobenius norm.
    pub fn energy(&self) -> f64 {
        self.sigma.iter().map(|s| s * s).sum()
    }

    /// The fraction of the residual's energy (Σ σ_i²) that rank r keeps; 1 for a zero residual.
    pub fn energy_kept(&self, r: usize) -> f64 {
        let total = self.energy();
        if total == 0.0 {
            return 1.0;
        }
        self.sigma[..r.min(self.k())].iter().map(|s| s * s).sum::<f64>() / total
    }

    /// The smallest rank that keeps at least `fraction` of the energy (at least 1). One pass
    /// over the spectrum (`--budget` asks this of every residual at every bisection step).
    pub fn rank_for_energy(&self, fraction: f64) -> usize {
        let total = self.energy();
        if total == 0.0 {
            return 1; // a zero residual keeps all of its (no) energy at any rank
        }
        let mut kept = 0.0;
        for (i, s) in self.sigma.iter().enumerate() {
            kept += s * s;
            if kept / total >= fraction - 1e-12 {
                return i + 1;
            }
        }
        self.k().max(1)
    }

    /// The rank-r factors (B: rows × r, A: r × cols), row-major.
    pub fn factors(&self, r: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let k = self.k();
        if r == 0 || r > k {
            bail!("rank {r} is outside 1..={k} for a {}×{} matrix", self.rows, self.cols);
        }
        let half: Vec<f32> = self.sigma[..r].iter().map(|s| s.sqrt() as f32).collect();
        let b = (0..self.rows).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| self.u[i * k + j] * half[j]);
        let a = (0..r).flat_map(|j| (0..self.cols).map(move |c| (j, c))).map(|(j, c)| half[j] * self.v[c * k + j]);
        Ok((b.collect(), a.collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6×4 matrix with a known spectrum: R = Q1 diag(4, 3, 2, 1) Q2ᵀ with orthonormal
    /// columns built by hand (Householder-free: axis permutations and sign flips).
    fn known() -> (Vec<f32>, [f64; 4]) {
        let sigma = [4.0, 3.0, 2.0, 1.0];
        // Columns of Q1 (6×4): e_5, -e_0, e_2, e_3; of Q2 (4×4): e_1, e_3, -e_0, e_2.
        let q1 = [(5, 1.0), (0, -1.0), (2, 1.0), (3, 1.0)];
        let q2 = [(1, 1.0), (3, 1.0), (0, -1.0), (2, 1.0)];
        let mut r = vec![0f32; 24];
        for (i, (&(row, s1), &(col, s2))) in q1.iter().zip(&q2).enumerate() {
            r[row * 4 + col] += (sigma[i] * s1 * s2) as f32;
        }
        (r, sigma)
    }

    #[test]
    fn energy_report_of_a_known_spectrum() -> Result<()> {
        let (r, sigma) = known();
        let svd = ResidualSvd::new(&r, 6, 4)?;
        for (got, want) in svd.sigma.iter().zip(sigma) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // Energies 16, 9, 4, 1 of 30.
        for (rank, want) in [(1, 16.0 / 30.0), (2, 25.0 / 30.0), (3, 29.0 / 30.0), (4, 1.0)] {
            assert!((svd.energy_kept(rank) - want).abs() < 1e-6, "rank {rank}");
        }
        assert_eq!(svd.rank_for_energy(0.8), 2);
        assert_eq!(svd.rank_for_energy(0.9), 3);
        assert_eq!(svd.rank_for_energy(1.0), 4);
        Ok(())
    }

    #[test]
    fn factors_are_exact_at_full_rank_and_best_at_lower_rank() -> Result<()> {
        let (r, _) = known();
        let svd = ResidualSvd::new(&r, 6, 4)?;
        let product = |rank: usize| -> Result<Vec<f32>> {
            let (b, a) = svd.factors(rank)?;
            Ok((0..6)
                .flat_map(|i| (0..4).map(move |j| (i, j)))
                .map(|(i, j)| (0..rank).map(|t| b[i * rank + t] * a[t * 4 + j]).sum())
                .collect())
        };
        let full = product(4)?;
        assert!(full.iter().zip(&r).all(|(x, y)| (x - y).abs() < 1e-5));
        // Rank 2 leaves exactly the two smallest singular values: ‖R − B A‖² = 4 + 1.
        let err: f32 = product(2)?.iter().zip(&r).map(|(x, y)| (x - y) * (x - y)).sum();
        assert!((err - 5.0).abs() < 1e-4, "{err}");
        assert!(svd.factors(5).is_err() && svd.factors(0).is_err());
        Ok(())
    }

    /// A random matrix (values in ±1) from a simple LCG.
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// ‖(R − B A) X‖²_F for row-major R (rows × cols), X (cols × n).
    fn input_error(
        r: &[f32],
        (b, a, rank): (&[f32], &[f32], usize),
        x: &[f32],
        (rows, cols, n): (usize, usize, usize),
    ) -> f64 {
        let mut err = 0.0;
        for i in 0..rows {
            let e: Vec<f64> = (0..cols)
                .map(|c| {
                    r[i * cols + c] as f64 - (0..rank).map(|t| (b[i * rank + t] * a[t * cols + c]) as f64).sum::<f64>()
                })
                .collect();
            for j in 0..n {
                let v: f64 = (0..cols).map(|c| e[c] * x[c * n + j] as f64).sum();
                err += v * v;
            }
        }
        err
    }

    /// Whitened by the inputs' Gram matrix, the SVD is still exact at full rank, and at lower
    /// rank its error on those inputs is below the plain SVD's (inputs with very unequal
    /// scales per direction: the case activation-aware truncation is for); its energy report
    /// is the fraction of ‖R X‖² kept.
    #[test]
    fn whitening_minimises_the_error_on_the_inputs() -> Result<()> {
        let (rows, cols, n) = (7, 6, 40);
        let r = random(rows * cols, 1);
        // Inputs: direction c scaled by 4^-c.
        let x: Vec<f32> =
            random(cols * n, 2).iter().enumerate().map(|(i, v)| v * 4f32.powi(-((i / n) as i32))).collect();
        let mut gram = vec![0f64; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                gram[i * cols + j] = (0..n).map(|t| x[i * n + t] as f64 * x[j * n + t] as f64).sum();
            }
        }
        let white = Whitening::new(&gram, cols)?;
        let ws = ResidualSvd::new_whitened(&r, rows, cols, Some(&white))?;
        let plain = ResidualSvd::new(&r, rows, cols)?;
        let (b, a) = ws.factors(cols)?;
        let dims = (rows, cols, n);
        let full = input_error(&r, (&b, &a, cols), &x, dims);
        let total = input_error(&r, (&vec![0.0; rows], &vec![0.0; cols], 1), &x, dims);
        assert!(full < 1e-8 * total, "full rank: error {full} of {total}");
        for rank in 1..cols {
            let (b, a) = ws.factors(rank)?;
            let aware = input_error(&r, (&b, &a, rank), &x, dims);
            let (b, a) = plain.factors(rank)?;
            let naive = input_error(&r, (&b, &a, rank), &x, dims);
            assert!(aware < naive, "rank {rank}: activation-aware {aware} vs plain {naive}");
            // The damping (1 % of the mean diagonal) makes the report approximate.
            let kept = 1.0 - aware / total;
            assert!((ws.energy_kept(rank) - kept).abs() < 0.05, "rank {rank}: {} vs {kept}", ws.energy_kept(rank));
        }
        assert!(Whitening::new(&[0.0; 4], 2).is_err(), "all-zero inputs are refused");
        assert!(Whitening::new(&[1.0; 3], 2).is_err(), "a wrong size is refused");
        Ok(())
    }
}
