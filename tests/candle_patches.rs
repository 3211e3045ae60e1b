//! The patches to candle-core in vendor/ (vendor/README.md) keep candle's results (the fourth,
//! computing the default thread count once, changes no result):
//! gradients that reach a node several times, or first through a strided view, still sum
//! correctly, and matmuls on the row-band path, batched, strided or with k = 0 match a naive
//! f64 product (where OpenBLAS is loaded, also the OpenBLAS band path and the layouts it
//! declines); weight gradients of `x wᵀ` come out right and contiguous.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use lors_lm::rng::Rng;

fn rand(rng: &mut Rng, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Naive (m×k)·(k×n) in f64.
fn naive(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let (m, k, n) = (a.len(), b.len(), b.first().map_or(0, |r| r.len()));
    (0..m).map(|i| (0..n).map(|j| (0..k).map(|l| a[i][l] as f64 * b[l][j] as f64).sum()).collect()).collect()
}

fn assert_close(got: &Tensor, want: &[Vec<f64>], what: &str) -> Result<()> {
    let got: Vec<Vec<f32>> = got.to_vec2()?;
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (j, (g, w)) in g.iter().zip(w).enumerate() {
            assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: ({i}, {j}) is {g}, want {w}");
        }
    }
    Ok(())
}

#[test]
fn matmuls_match_a_naive_product_on_every_path() -> Result<()> {
    let mut rng = Rng::new(5);
    // 517 rows: the row-band path on 2+ threads, with a last band that is not a whole tile.
    let (m, k, n) = (517, 70, 37);
    let a = rand(&mut rng, &[m, k])?;
    let b = rand(&mut rng, &[k, n])?;
    let want = naive(&a.to_vec2()?, &b.to_vec2()?);
    assert_close(&a.matmul(&b)?, &want, "contiguous")?;
    // Strided operands: a stored transposed, b stored transposed.
    let at = a.t()?.contiguous()?.t()?;
    let bt = b.t()?.contiguous()?.t()?;
    assert!(!at.is_contiguous() && !bt.is_contiguous());
    assert_close(&at.matmul(&bt)?, &want, "strided")?;
    // Few rows (gemm's own split) and a batch of three (the batched loop).
    let small = a.narrow(0, 0, 9)?;
    assert_close(&small.matmul(&b)?, &naive(&small.to_vec2()?, &b.to_vec2()?), "9 rows")?;
    let batch = Tensor::stack(&[&a, &a, &a], 0)?.matmul(&Tensor::stack(&[&b, &b, &b], 0)?)?;
    for i in 0..3 {
        assert_close(&batch.get(i)?, &want, "batched")?;
    }
    // k = 0: the product is all zeros (the destination is zero-filled only then).
    let empty =
        Tensor::zeros((300, 0), DType::F32, &Device::Cpu)?.matmul(&Tensor::zeros((0, 4), DType::F32, &Device::Cpu)?)?;
    assert_eq!(empty.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!(empty.dims(), [300, 4]);
    Ok(())
}

#[test]
fn gradients_sum_over_every_use_of_a_tensor() -> Result<()> {
    let mut rng = Rng::new(6);
    let x = Var::from_tensor(&rand(&mut rng, &[5, 3])?)?;
    let w = Var::from_tensor(&rand(&mut rng, &[4, 3])?)?;
    let xt = x.as_tensor();
    // x reaches the loss four times: through a transposed view first (the first gradient
    // stored for x is then a strided one), a matmul, a square and a sum with itself.
    // loss = 2·Σx + Σ(x wᵀ) + Σx² + Σ(x + x)
    let loss = ((xt.t()? * 2.0)?.sum_all()?
        + xt.matmul(&w.as_tensor().t()?)?.sum_all()?
        + xt.sqr()?.sum_all()?
        + (xt + xt)?.sum_all()?)?;
    let grads = loss.backward()?;
    let gx = grads.get(xt).expect("x has a gradient");
    // d/dx = 2 + Σ_rows(w) (each row of x meets every row of w) + 2x + 2
    let wsum = w.as_tensor().sum(0)?; // (3,)
    let want = ((xt * 2.0)? + 4.0)?.broadcast_add(&wsum)?;
    let diff = (gx - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "x gradient off by {diff}");
    // w is used once (through its transpose): dw = Σ_rows(x) for every row of w.
    let gw = grads.get(w.as_tensor()).expect("w has a gradient");
    let want_w = xt.sum(0)?.unsqueeze(0)?.broadcast_as((4, 3))?;
    let diff = (gw - &want_w)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "w gradient off by {diff}");
    assert!(gx.is_contiguous() && gw.is_contiguous());
    Ok(())
}

/// Weight gradients of `x wᵀ` (every linear layer) are computed in w's own layout (patch 6):
/// they must equal rᵀ x for the upstream gradient r, reach w contiguous, also for a batch of
/// weights, and still sum with w's other uses.
#[test]
fn weight_gradients_of_transposed_products_are_right_and_contiguous() -> Result<()> {
    let mut rng = Rng::new(8);
    // 300 rows: the row-band path on 2+ threads for both products of the backward pass.
    let (n, din, dout) = (300, 40, 24);
    let x = Var::from_tensor(&rand(&mut rng, &[n, din])?)?;
    let w = Var::from_tensor(&rand(&mut rng, &[dout, din])?)?;
    let r = rand(&mut rng, &[n, dout])?;
    let (xt, wt) = (x.as_tensor(), w.as_tensor());
    // loss = Σ (x wᵀ ⊙ r) + Σ w²: dw = rᵀ x + 2w, dx = r w.
    let loss = ((xt.matmul(&wt.t()?)? * &r)?.sum_all()? + wt.sqr()?.sum_all()?)?;
    let grads = loss.backward()?;
    let gw = grads.get(wt).expect("w has a gradient");
    assert!(gw.is_contiguous(), "w's gradient is not contiguous");
    let rtx = naive(&r.t()?.to_vec2()?, &xt.to_vec2()?);
    let w2: Vec<Vec<f32>> = wt.to_vec2()?;
    let want: Vec<Vec<f64>> =
        rtx.iter().zip(&w2).map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + 2.0 * *b as f64).collect()).collect();
    assert_close(gw, &want, "dw = rᵀx + 2w")?;
    let gx = grads.get(xt).expect("x has a gradient");
    assert_close(gx, &naive(&r.to_vec2()?, &w2), "dx = r w")?;

    // A batch of three weights, (3, out, in), each used through its transpose.
    let xb = rand(&mut rng, &[3, n, din])?;
    let wb = Var::from_tensor(&rand(&mut rng, &[3, dout, din])?)?;
    let rb = rand(&mut rng, &[3, n, dout])?;
    let grads = (xb.matmul(&wb.as_tensor().transpose(1, 2)?)? * &rb)?.sum_all()?.backward()?;
    let gwb = grads.get(wb.as_tensor()).expect("the batch of weights has a gradient");
    assert!(gwb.is_contiguous() && gwb.dims() == [3, dout, din]);
    for i in 0..3 {
        let want = naive(&rb.get(i)?.t()?.to_vec2()?, &xb.get(i)?.to_vec2()?);
        assert_close(&gwb.get(i)?, &want, "batched dw")?;
    }
    Ok(())
}

/// Where OpenBLAS is loaded, the row bands of f32 matmuls go through it: it must take
/// every layout candle and the fused kernels pass (row-major or transposed operands, a leading
/// dimension wider than the row), overwriting or accumulating into C, and decline, touching
/// nothing, what CBLAS cannot express. Needs OpenBLAS loaded: scripts/test.sh leaves this test
/// out (`--skip openblas_bands`, with a note) where libopenblas.so.0 is not installed, and in
/// its second pass with `LORS_LM_BLAS=gemm`.
#[cfg(feature = "openblas")]
#[test]
fn openblas_bands_match_a_naive_product_and_decline_other_layouts() -> Result<()> {
    use candle_core::cpu_backend::openblas::{backend, sgemm};
    if let Err(why) = backend() {
        panic!(
            "OpenBLAS is not loaded ({why}): install it (apt install libopenblas0), or leave this test \
             out with `-- --skip openblas_bands` (scripts/test.sh does where it is not installed)"
        );
    }
    let mut rng = Rng::new(9);
    // 300 rows: enough for the row-band path on 2 threads in the candle check at the end.
    let (m, k, n) = (300, 90, 21);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
    let rows =
        |v: &[f32], r: usize, c: usize| -> Vec<Vec<f32>> { (0..r).map(|i| v[i * c..(i + 1) * c].to_vec()).collect() };
    let want = naive(&rows(&a, m, k), &rows(&b, k, n));
    let transpose =
        |v: &[f32], r: usize, c: usize| -> Vec<f32> { (0..c * r).map(|i| v[(i % r) * c + i / r]).collect() };
    let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
    let ldc = n + 5;
    for (what, a, a_st, b, b_st) in [
        ("row-major", &a, (k, 1), &b, (n, 1)),
        ("A transposed", &at, (1, m), &b, (n, 1)),
        ("B transposed", &a, (k, 1), &bt, (1, k)),
        ("both transposed", &at, (1, m), &bt, (1, k)),
    ] {
        // Overwriting C (NaN before: every entry must be replaced) and accumulating into it
        // (C = 0.5 + A·B).
        for (accumulate, before) in [(false, f32::NAN), (true, 0.5)] {
            let mut c = vec![f32::NAN; m * ldc];
            c.chunks_mut(ldc).for_each(|row| row[..n].fill(before));
            // SAFETY: A is m×k and B k×n with the strides given, C holds m rows of ldc.
            let done = unsafe { sgemm((m, n, k), a.as_ptr(), a_st, b.as_ptr(), b_st, c.as_mut_ptr(), ldc, accumulate) };
            assert!(done, "{what}: declined");
            let add = if accumulate { 0.5 } else { 0.0 };
            for (i, row) in want.iter().enumerate() {
                for (j, w) in row.iter().enumerate() {
                    let (g, w) = (c[i * ldc + j] as f64, w + add);
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{what}/{accumulate}: ({i}, {j}) is {g}, want {w}"
                    );
                }
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()), "{what}: wrote past row {i}");
            }
        }
    }
    // A with neither stride 1 (every other column of a 2k-wide matrix): not a CBLAS layout.
    let wide: Vec<f32> = (0..m * 2 * k).map(|_| rng.normal() as f32).collect();
    let mut c = vec![f32::NAN; m * n];
    // SAFETY: element (i, p) at i * 2k + 2p lies inside `wide`.
    let done = unsafe { sgemm((m, n, k), wide.as_ptr(), (2 * k, 2), b.as_ptr(), (n, 1), c.as_mut_ptr(), n, false) };
    assert!(!done && c.iter().all(|x| x.is_nan()), "a non-unit-stride operand must be declined untouched");
    // The same product through candle: the band path falls back to gemm for it.
    let wide_t = Tensor::from_vec(wide.clone(), (m, 2 * k), &Device::Cpu)?;
    let strided = wide_t.reshape((m, k, 2))?.narrow(2, 0, 1)?.squeeze(2)?;
    let b_t = Tensor::from_vec(b.clone(), (k, n), &Device::Cpu)?;
    let want = naive(&strided.to_vec2()?, &rows(&b, k, n));
    assert_close(&strided.matmul(&b_t)?, &want, "non-unit-stride lhs")?;
    Ok(())
}
