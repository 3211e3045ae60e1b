//! Truncated SVD of a residual `W_l − W_shared` into LORS factors, through faer.
//!
//! For R (out×in) = U Σ Vᵀ (thin: k = min(out, in) singular values, descending), the rank-r
//! factors are `B = U_r Σ_r^½` (out×r) and `A = Σ_r^½ V_rᵀ` (r×in): B A = U_r Σ_r V_rᵀ is the
//! best rank-r approximation of R (Eckart–Young), exact at r = k, and the singular values are
//! split evenly so that neither factor is much larger than the other.

use anyhow::{bail, Result};
use faer::Mat;

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

impl ResidualSvd {
    /// SVD of the row-major `rows × cols` matrix `r`.
    pub fn new(r: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if r.len() != rows * cols {
            bail!("SVD: {} values for a {rows}×{cols} matrix", r.len());
        }
        if r.iter().any(|x| !x.is_finite()) {
            bail!("SVD: the {rows}×{cols} matrix holds a non-finite value");
        }
        let m = Mat::<f32>::from_fn(rows, cols, |i, j| r[i * cols + j]);
        let svd = m.thin_svd().map_err(|e| anyhow::anyhow!("SVD of a {rows}×{cols} matrix did not converge: {e:?}"))?;
        let k = rows.min(cols);
        let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
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

    /// The smallest rank that keeps at least `fraction` of the energy (at least 1).
    pub fn rank_for_energy(&self, fraction: f64) -> usize {
        (1..=self.k()).find(|&r| self.energy_kept(r) >= fraction - 1e-12).unwrap_or(self.k()).max(1)
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
}
