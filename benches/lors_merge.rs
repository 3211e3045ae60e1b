//! Merge `W + B A` per step, or run the factored `x Wᵀ + (x Aᵀ) Bᵀ`? Forward + backward of one
//! LORS projection at training shapes, median of several repetitions, both forms in the same
//! process, beside a vanilla projection (`x Wᵀ`, W private) of the same shape: what LORS
//! costs per projection. `cargo bench --bench lors_merge`
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use lors_lm::model::LorsLinear;
use std::time::Instant;

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut t = vec![];
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[reps / 2])
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!(
        "{:>6} {:>6} {:>6} {:>4} | {:>10} {:>10} {:>8} | {:>10} {:>8}",
        "tokens", "out", "in", "r", "merged ms", "factored ms", "ratio", "vanilla ms", "merged/vanilla"
    );
    for (n, out, inp, r) in
        [(2048, 128, 128, 16), (2048, 344, 128, 16), (4096, 384, 384, 32), (4096, 1024, 384, 64), (64, 384, 384, 32)]
    {
        let w = Var::randn(0f32, 0.02, (out, inp), &dev)?;
        let a = Var::randn(0f32, 0.1, (r, inp), &dev)?;
        let b = Var::randn(0f32, 0.1, (out, r), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (n, inp), &dev)?;
        let layer = LorsLinear::from_parts(w.as_tensor().clone(), Some((a.as_tensor().clone(), b.as_tensor().clone())));
        let merged = median_ms(9, || {
            let g = layer.forward(&x)?.sqr()?.sum_all()?.backward()?;
            assert!(g.get(a.as_tensor()).is_some());
            Ok(())
        })?;
        let factored = median_ms(9, || {
            let g = layer.forward_factored(&x)?.sqr()?.sum_all()?.backward()?;
            assert!(g.get(a.as_tensor()).is_some());
            Ok(())
        })?;
        let plain = LorsLinear::from_parts(w.as_tensor().clone(), None);
        let vanilla = median_ms(9, || {
            let g = plain.forward(&x)?.sqr()?.sum_all()?.backward()?;
            assert!(g.get(w.as_tensor()).is_some());
            Ok(())
        })?;
        println!(
            "{n:>6} {out:>6} {inp:>6} {r:>4} | {merged:>10.3} {factored:>10.3} {:>7.2}x | {vanilla:>10.3} {:>13.2}x",
            factored / merged,
            merged / vanilla
        );
    }
    println!("ratio = factored / merged time for forward + backward (> 1: merging is faster)");
    println!("merged/vanilla = what the LORS projection costs against a private weight of the same shape");
    Ok(())
}
