//! Decoding's products: `x (m × in) · Wᵀ` for a few rows m, through candle's matmul (gemm or
//! OpenBLAS, `device::cpu_matmul`) and through `kernels::matvec::linear_rows`, with W warm in
//! cache (one matrix again and again) and cold (rotating through copies that together exceed
//! `--cold-mib`, default 512 MiB). Prints GB/s of weights read. `cargo bench --bench matvec`
use anyhow::Result;
use candle_core::{Device, Tensor};
use lors_lm::kernels::matvec::{linear_rows, F32View, Segment};
use std::time::Instant;

fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = vec![];
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[reps / 2])
}

fn main() -> Result<()> {
    let cold_mib: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(512);
    let dev = Device::Cpu;
    println!("matmul: {}", lors_lm::device::cpu_matmul()?);
    println!(
        "{:>5} {:>5} {:>3} {:>5} | {:>12} {:>12} | {:>7}",
        "out", "in", "m", "cache", "candle GB/s", "matvec GB/s", "ratio"
    );
    for (out, inp) in [(1536, 512), (4096, 1024), (8192, 2048), (5504, 2048)] {
        let bytes = out * inp * 4;
        let copies = (cold_mib << 20).div_ceil(bytes).max(1);
        let ws: Vec<Tensor> =
            (0..copies).map(|_| Tensor::randn(0f32, 0.02, (out, inp), &dev)).collect::<candle_core::Result<_>>()?;
        for m in [1usize, 2, 4, 8, 16, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
            for (label, n) in [("warm", 1), ("cold", copies)] {
                let reps = 64;
                let mut k = 0;
                let candle = median_secs(reps, || {
                    k = (k + 1) % n;
                    x.matmul(&ws[k].t()?)?.sum_all()?.to_scalar::<f32>()?;
                    Ok(())
                })?;
                let xv = F32View::new(&x, "x")?;
                let mut k = 0;
                let mine = median_secs(reps, || {
                    k = (k + 1) % n;
                    let wv = F32View::new(&ws[k], "w")?;
                    let y = linear_rows(xv.slice()?, (m, inp), &[Segment { w: wv.slice()?, col: 0 }], None, &[], out)?;
                    std::hint::black_box(y);
                    Ok(())
                })?;
                let gbs = |s: f64| bytes as f64 / s / 1e9;
                println!(
                    "{out:>5} {inp:>5} {m:>3} {label:>5} | {:>12.1} {:>12.1} | {:>6.2}x",
                    gbs(candle),
                    gbs(mine),
                    candle / mine
                );
            }
        }
    }
    println!("ratio = candle time / matvec time (> 1: the matvec kernel is faster)");
    Ok(())
}
