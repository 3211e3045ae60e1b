//! How long `lors-lm compress` spends in SVDs: the thin f32 SVD (faer) of one residual at the
//! projection shapes of the models we compress (d 128 here, SmolLM2-135M, a Llama-7B FFN),
//! with the reconstruction error at full rank as a check. `cargo bench --bench svd`
use anyhow::Result;
use lors_lm::compress::svd::ResidualSvd;
use lors_lm::rng::Rng;
use std::time::Instant;

fn main() -> Result<()> {
    println!("threads {} (RAYON_NUM_THREADS)", rayon::current_num_threads());
    println!("{:>6} {:>6} | {:>10} {:>14}", "rows", "cols", "svd s", "max |R - BA|");
    let mut rng = Rng::new(1);
    for (rows, cols) in [(128, 344), (576, 1536), (1536, 576), (4096, 11008)] {
        let r: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32 * 0.02).collect();
        let t = Instant::now();
        let svd = ResidualSvd::new(&r, rows, cols)?;
        let secs = t.elapsed().as_secs_f64();
        // Full-rank reconstruction on a sample of entries (the whole product would dominate).
        let k = svd.k();
        let (b, a) = svd.factors(k)?;
        let err = (0..2000)
            .map(|_| (rng.below(rows as u64) as usize, rng.below(cols as u64) as usize))
            .map(|(i, j)| ((0..k).map(|t| b[i * k + t] * a[t * cols + j]).sum::<f32>() - r[i * cols + j]).abs())
            .fold(0f32, f32::max);
        println!("{rows:>6} {cols:>6} | {secs:>10.2} {err:>14.2e}");
    }
    Ok(())
}
