//! Forward + backward time of each piece of a training step at bench-medium's shapes (batch
//! 16 × 256 tokens, d 384, 6 heads, ffn 1024, vocab 4096, LORS rank 32), median of 7 after a
//! warm-up: where a step's time goes, one piece at a time, and each matmul's GFLOP/s.
//! Every loss is `sum(y)`, so each row includes a `sum_all` backward (its cost is printed
//! for the two widths). `cargo bench --bench kernels`
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use lors_lm::{kernels as ops, model::ops as lors};
use std::time::Instant;

/// Median seconds of `f` over 7 runs after one warm-up; prints a row.
fn row(name: &str, gflop: f64, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    f()?;
    let mut t = vec![];
    for _ in 0..7 {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    let s = t[3];
    let rate = if gflop > 0.0 { format!("{:8.1}", gflop / s) } else { String::new() };
    println!("{name:<34} {:8.1} {rate}", s * 1e3);
    Ok(())
}

fn var(shape: &[usize], scale: f64) -> Result<Var> {
    Ok(Var::randn(0f32, scale as f32, shape, &Device::Cpu)?)
}

fn main() -> Result<()> {
    lors_lm::device::tune_allocator();
    let (b, t, d, h, f, v, r) = (16usize, 256usize, 384usize, 6usize, 1024usize, 4096usize, 32usize);
    let (n, hd) = (b * t, d / h);
    println!("{} threads; forward + backward, median ms and GFLOP/s", rayon::current_num_threads());
    println!("{:<34} {:>8} {:>8}", "piece", "ms", "GFLOP/s");
    for width in [d, f] {
        let x = var(&[b, t, width], 1.0)?;
        row(&format!("sum_all backward (N x {width})"), 0.0, || {
            x.as_tensor().sum_all()?.backward()?;
            Ok(())
        })?;
    }
    // Projections, y = x Wᵀ through autograd (what the model runs for each projection).
    for (name, o, i) in [("q/k/v/o", d, d), ("gate/up", f, d), ("down", d, f)] {
        let x = var(&[b, t, i], 1.0)?;
        let w = var(&[o, i], 0.02)?;
        row(&format!("linear {name} {i}->{o}"), 6.0 * (n * o * i) as f64 / 1e9, || {
            lors::linear_as(x.as_tensor(), w.as_tensor(), candle_core::DType::F32)?.sum_all()?.backward()?;
            Ok(())
        })?;
    }
    for (o, i) in [(d, d), (f, d)] {
        let (w, bb, aa) = (var(&[o, i], 0.02)?, var(&[o, r], 0.1)?, var(&[r, i], 0.1)?);
        row(&format!("lors_merge {o}x{i}, r {r}"), 0.0, || {
            ops::lors_merge(w.as_tensor(), bb.as_tensor(), aa.as_tensor(), 1.0)?.sum_all()?.backward()?;
            Ok(())
        })?;
    }
    let x = var(&[n, d], 1.0)?;
    let w = var(&[v, d], 0.02)?;
    let targets = Tensor::from_vec((0..n as u32).map(|i| (i * 7919) % v as u32).collect::<Vec<_>>(), n, &Device::Cpu)?;
    row("LM head + cross-entropy (fused)", 6.0 * (n * d * v) as f64 / 1e9, || {
        ops::linear_cross_entropy(x.as_tensor(), w.as_tensor(), &targets)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let (q, k, vv) = (var(&[b, h, t, hd], 1.0)?, var(&[b, h, t, hd], 1.0)?, var(&[b, h, t, hd], 1.0)?);
    // Causal: half of qkᵀ and P·v forward, and of the four backward products, plus qkᵀ again.
    let att_gflop = 7.0 * 2.0 * (b * h * t * t * hd) as f64 / 1e9 / 2.0;
    row("attention (causal)", att_gflop, || {
        ops::attention(q.as_tensor(), k.as_tensor(), vv.as_tensor(), 1.0 / (hd as f64).sqrt())?
            .sum_all()?
            .backward()?;
        Ok(())
    })?;
    let (x, gain) = (var(&[b, t, d], 1.0)?, var(&[d], 1.0)?);
    row("rms_norm", 0.0, || {
        ops::rms_norm(x.as_tensor(), gain.as_tensor(), 1e-5)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let x4 = var(&[b, t, h, hd], 1.0)?;
    let table = Tensor::randn(0f32, 1.0, (t, hd), &Device::Cpu)?;
    row("rope_t (one of q, k)", 0.0, || {
        ops::rope_t(x4.as_tensor(), &table, &table, 0)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let (gate, up) = (var(&[b, t, f], 1.0)?, var(&[b, t, f], 1.0)?);
    row("swiglu", 0.0, || {
        ops::swiglu(gate.as_tensor(), up.as_tensor())?.sum_all()?.backward()?;
        Ok(())
    })?;
    Ok(())
}
