//! The fused CPU kernels (src/kernels/): each one against a plain candle composition written
//! here (values and gradients, f32), against central finite differences (f64), and on bad
//! input; then the whole model with and without them.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use lors_lm::config::{Config, Mode};
use lors_lm::kernels as ops;
use lors_lm::model::Model;
use lors_lm::model::ParamStore;
use lors_lm::rng::Rng;

fn rand(rng: &mut Rng, shape: &[usize], scale: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * scale).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// The largest |a − b|, NaN if any element is NaN (so a `d < tol` check fails on it).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d: Vec<f64> = (a - b)?.abs()?.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    Ok(d.into_iter().fold(0.0, |m, x| if x.is_nan() || m.is_nan() { f64::NAN } else { m.max(x) }))
}

/// An op under test: inputs → output.
type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// `Σ w ⊙ f(inputs)` for a fixed random w: a scalar whose gradient exercises every output.
fn weighted(f: Op, inputs: &[Tensor], w: &Tensor) -> Result<Tensor> {
    Ok((f(inputs)? * w)?.sum_all()?)
}

/// Value and input gradients of `weighted(f)`.
fn value_and_grads(f: Op, inputs: &[Tensor], w: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let grads = (&out * w)?.sum_all()?.backward()?;
    let g = ts
        .iter()
        .map(|t| grads.get(t).cloned().ok_or_else(|| anyhow::anyhow!("no gradient")))
        .collect::<Result<_>>()?;
    Ok((out, g))
}

/// The fused op and the plain composition give the same outputs and input gradients (f32).
/// The kernels' output buffers start as NaN, so an element a kernel fails to write fails this.
fn check_against_plain(fused: Op, plain: Op, inputs: &[Tensor], tol: f64) -> Result<()> {
    ops::poison_outputs(true);
    let mut rng = Rng::new(99);
    let shape = fused(inputs)?.dims().to_vec();
    let w = rand(&mut rng, &shape, 1.0, inputs[0].dtype())?;
    let (yf, gf) = value_and_grads(fused, inputs, &w)?;
    let (yp, gp) = value_and_grads(plain, inputs, &w)?;
    let d = max_abs_diff(&yf, &yp)?;
    assert!(d < tol, "outputs differ by {d}");
    for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
        let d = max_abs_diff(a, b)?;
        assert!(d < tol, "gradient of input {i} differs by {d}");
    }
    Ok(())
}

/// Analytic gradients of the fused op match central finite differences (f64) on every
/// element of every float input.
fn check_finite_differences(f: Op, inputs: &[Tensor]) -> Result<()> {
    ops::poison_outputs(true);
    let mut rng = Rng::new(7);
    let shape = f(inputs)?.dims().to_vec();
    let w = rand(&mut rng, &shape, 1.0, DType::F64)?;
    let (_, grads) = value_and_grads(f, inputs, &w)?;
    let eps = 1e-6;
    for (i, x) in inputs.iter().enumerate() {
        let base: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let g: Vec<f64> = grads[i].flatten_all()?.to_vec1()?;
        for j in 0..base.len() {
            let at = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.shape(), &Device::Cpu)?;
                Ok(weighted(f, &xs, &w)?.to_scalar::<f64>()?)
            };
            let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
            let err = (numeric - g[j]).abs() / numeric.abs().max(1.0);
            assert!(err < 1e-6, "input {i}[{j}]: analytic {} vs numeric {numeric}", g[j]);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ plain references

fn plain_rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(g)
}

/// softmax(scale·q kᵀ + causal mask) v with the kv heads repeated for GQA, transposed to
/// (B, T, H, hd); query i sees keys ≤ S − T + i.
fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let rep = |x: &Tensor| x.unsqueeze(2)?.broadcast_as((b, hkv, h / hkv, s, hd))?.reshape((b, h, s, hd));
    let (k, v) = (rep(k)?, rep(v)?);
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j > s - t + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (t, s), q.device())?.to_dtype(q.dtype())?;
    let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// HF Llama RoPE: (B, T, H, hd) → transpose → x·cos + rotate_half(x)·sin.
fn plain_rope_t(x: &Tensor, cos: &Tensor, sin: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
    let x = x.transpose(1, 2)?.contiguous()?;
    let (_, _, t, hd) = x.dims4()?;
    let (cos, sin) = (cos.narrow(0, offset, t)?, sin.narrow(0, offset, t)?);
    let (x1, x2) = (x.narrow(D::Minus1, 0, hd / 2)?, x.narrow(D::Minus1, hd / 2, hd / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// The packed attention from its parts: split qkv (B, T, (H + 2·Hkv)·hd) into q, k, v,
/// rotate q and k, attend, and flatten the heads back to (B, T, H·hd).
fn plain_attention_qkv(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    offset: usize,
    (h, hkv): (usize, usize),
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let hd = w / (h + 2 * hkv);
    let part = |col0: usize, n: usize| qkv.narrow(2, col0 * hd, n * hd)?.contiguous()?.reshape((b, t, n, hd));
    let q = plain_rope_t(&part(0, h)?, cos, sin, offset)?;
    let k = plain_rope_t(&part(h, hkv)?, cos, sin, offset)?;
    let v = part(h + hkv, hkv)?.transpose(1, 2)?.contiguous()?;
    plain_attention(&q, &k, &v, scale)?.reshape((b, t, h * hd))
}

fn rope_tables(max_t: usize, hd: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let (mut c, mut s) = (vec![], vec![]);
    for pos in 0..max_t {
        for j in 0..hd {
            let angle = pos as f64 / 10000f64.powf(2.0 * (j % (hd / 2)) as f64 / hd as f64);
            c.push(angle.cos());
            s.push(angle.sin());
        }
    }
    let mk = |v| -> Result<Tensor> { Ok(Tensor::from_vec(v, (max_t, hd), &Device::Cpu)?.to_dtype(dtype)?) };
    Ok((mk(c)?, mk(s)?))
}

// ------------------------------------------------------------------ per-op tests

#[test]
fn cross_entropy_matches_candle_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(1);
    let targets = Tensor::new(&[3u32, 0, 10, 7, 7, 1], &Device::Cpu)?;
    let t2 = targets.clone();
    let fused = move |x: &[Tensor]| ops::cross_entropy(&x[0], &t2);
    // candle's mean cross-entropy times N is the sum of our per-row losses.
    let t3 = targets.clone();
    let plain = move |x: &[Tensor]| -> candle_core::Result<Tensor> {
        let lsm = candle_nn::ops::log_softmax(&x[0], D::Minus1)?;
        lsm.gather(&t3.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
    };
    let x = rand(&mut rng, &[6, 11], 3.0, DType::F32)?;
    check_against_plain(&fused, &plain, std::slice::from_ref(&x), 1e-5)?;
    let mean = ops::cross_entropy(&x, &targets)?.mean_all()?.to_scalar::<f32>()?;
    let want = candle_nn::loss::cross_entropy(&x, &targets)?.to_scalar::<f32>()?;
    assert!((mean - want).abs() < 1e-5, "{mean} vs candle's {want}");
    check_finite_differences(&fused, &[rand(&mut rng, &[6, 11], 3.0, DType::F64)?])
}

#[test]
fn linear_cross_entropy_matches_head_then_loss_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(8);
    // 150 rows: more than two backward blocks of 64, the last one partial.
    for (n, d, v) in [(5, 4, 7), (150, 6, 9)] {
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let targets = Tensor::from_vec(targets, n, &Device::Cpu)?;
        let t2 = targets.clone();
        let fused = move |x: &[Tensor]| ops::linear_cross_entropy(&x[0], &x[1], &t2);
        let t3 = targets.clone();
        let plain = move |x: &[Tensor]| -> candle_core::Result<Tensor> {
            let lsm = candle_nn::ops::log_softmax(&x[0].matmul(&x[1].t()?)?, D::Minus1)?;
            lsm.gather(&t3.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
        };
        let ins = |rng: &mut Rng, dtype| -> Result<Vec<Tensor>> {
            Ok(vec![rand(rng, &[n, d], 1.0, dtype)?, rand(rng, &[v, d], 1.0, dtype)?])
        };
        check_against_plain(&fused, &plain, &ins(&mut rng, DType::F32)?, 1e-4)?;
        if n < 10 {
            check_finite_differences(&fused, &ins(&mut rng, DType::F64)?)?;
        }
    }
    Ok(())
}

#[test]
fn lors_merge_matches_w_plus_scaled_ba_and_finite_differences() -> Result<()> {
    let fused = |x: &[Tensor]| ops::lors_merge(&x[0], &x[1], &x[2], 0.5);
    let plain = |x: &[Tensor]| &x[0] + (x[1].matmul(&x[2])? * 0.5)?;
    let ins = |dtype| -> Result<Vec<Tensor>> {
        let mut r = Rng::new(80);
        Ok(vec![
            rand(&mut r, &[6, 5], 1.0, dtype)?,
            rand(&mut r, &[6, 3], 1.0, dtype)?,
            rand(&mut r, &[3, 5], 1.0, dtype)?,
        ])
    };
    check_against_plain(&fused, &plain, &ins(DType::F32)?, 1e-5)?;
    check_finite_differences(&fused, &ins(DType::F64)?)?;
    let x = ins(DType::F32)?;
    let e = ops::lors_merge(&x[0], &x[2], &x[1], 1.0).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    Ok(())
}

#[test]
fn attention_matches_masked_softmax_attention_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(2);
    let fused = |x: &[Tensor]| ops::attention(&x[0], &x[1], &x[2], 0.35);
    let plain = |x: &[Tensor]| plain_attention(&x[0], &x[1], &x[2], 0.35);
    // (B, H, T, hd) queries against (B, Hkv, S, hd) keys: T = S (training), T < S (decoding
    // after a cache), Hkv < H (grouped-query attention), T = 1.
    // The last two span several 64-row query blocks (the kernel skips masked key blocks).
    for (b, h, hkv, t, s, hd) in [
        (2, 3, 3, 5, 5, 4),
        (1, 2, 2, 4, 7, 3),
        (2, 4, 2, 6, 6, 4),
        (1, 2, 1, 1, 5, 4),
        (1, 2, 1, 130, 130, 4),
        (1, 2, 2, 70, 75, 3),
    ] {
        let ins = |rng: &mut Rng, dtype| -> Result<Vec<Tensor>> {
            Ok(vec![
                rand(rng, &[b, h, t, hd], 1.5, dtype)?,
                rand(rng, &[b, hkv, s, hd], 1.5, dtype)?,
                rand(rng, &[b, hkv, s, hd], 1.0, dtype)?,
            ])
        };
        let x = ins(&mut rng, DType::F32)?;
        assert_eq!(fused(&x)?.dims(), &[b, t, h, hd]);
        check_against_plain(&fused, &plain, &x, 1e-5)?;
        // Causality: changing the last key and value moves only the last query's output
        // when T = S.
        if t == s && t > 1 {
            let y0 = fused(&x)?;
            let mut x2 = x.clone();
            for i in [1, 2] {
                let last = x2[i].narrow(2, s - 1, 1)?;
                x2[i] = x2[i].slice_assign(&[0..b, 0..hkv, s - 1..s, 0..hd], &(last + 1.0)?)?;
            }
            let y1 = fused(&x2)?;
            let early = max_abs_diff(&y0.narrow(1, 0, t - 1)?, &y1.narrow(1, 0, t - 1)?)?;
            let latest = max_abs_diff(&y0.narrow(1, t - 1, 1)?, &y1.narrow(1, t - 1, 1)?)?;
            assert!(early == 0.0 && latest > 0.0, "future keys leak: {early}, {latest}");
        }
        if t < 64 {
            check_finite_differences(&fused, &ins(&mut rng, DType::F64)?)?;
        }
    }
    Ok(())
}

#[test]
fn rms_norm_matches_composition_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(3);
    let fused = |x: &[Tensor]| ops::rms_norm(&x[0], &x[1], 1e-5);
    let plain = |x: &[Tensor]| plain_rms_norm(&x[0], &x[1], 1e-5);
    // Rows of 8 (one run of the kernels' eight running sums), 13 (eight plus a tail) and 3
    // (a tail only).
    for d in [8, 13, 3] {
        let ins = |dtype| -> Result<Vec<Tensor>> {
            let mut r = Rng::new(30);
            Ok(vec![rand(&mut r, &[3, 5, d], 1.5, dtype)?, (rand(&mut r, &[d], 0.3, dtype)? + 1.0)?])
        };
        check_against_plain(&fused, &plain, &ins(DType::F32)?, 1e-5)?;
        // More rows than one task holds, so the per-task dgain partials are summed.
        let big = vec![rand(&mut rng, &[3000, d], 1.0, DType::F32)?, rand(&mut rng, &[d], 1.0, DType::F32)?];
        check_against_plain(&fused, &plain, &big, 1e-3)?;
        check_finite_differences(&fused, &ins(DType::F64)?)?;
    }
    Ok(())
}

#[test]
fn rope_matches_rotate_half_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(4);
    let (cos32, sin32) = rope_tables(12, 8, DType::F32)?;
    for offset in [0, 3] {
        let (c, s) = (cos32.clone(), sin32.clone());
        let fused = move |x: &[Tensor]| ops::rope_t(&x[0], &c, &s, offset);
        let (c, s) = (cos32.clone(), sin32.clone());
        let plain = move |x: &[Tensor]| plain_rope_t(&x[0], &c, &s, offset);
        // (B, T, H, hd) → (B, H, T, hd)
        let x = rand(&mut rng, &[2, 5, 3, 8], 1.0, DType::F32)?;
        assert_eq!(ops::rope_t(&x, &cos32, &sin32, offset)?.dims(), &[2, 3, 5, 8]);
        check_against_plain(&fused, &plain, &[x], 1e-5)?;
        let (c, s) = rope_tables(12, 8, DType::F64)?;
        let fused64 = move |x: &[Tensor]| ops::rope_t(&x[0], &c, &s, offset);
        check_finite_differences(&fused64, &[rand(&mut rng, &[2, 5, 3, 8], 1.0, DType::F64)?])?;
    }
    Ok(())
}

#[test]
fn swiglu_matches_silu_times_up_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(5);
    let fused = |x: &[Tensor]| ops::swiglu(&x[0], &x[1]);
    let plain = |x: &[Tensor]| x[0].silu()? * &x[1];
    let ins = |dtype| -> Result<Vec<Tensor>> {
        let mut r = Rng::new(50);
        Ok(vec![rand(&mut r, &[4, 7], 2.0, dtype)?, rand(&mut r, &[4, 7], 1.0, dtype)?])
    };
    check_against_plain(&fused, &plain, &ins(DType::F32)?, 1e-5)?;
    let big = vec![rand(&mut rng, &[5, 9000], 2.0, DType::F32)?, rand(&mut rng, &[5, 9000], 1.0, DType::F32)?];
    check_against_plain(&fused, &plain, &big, 1e-4)?;
    check_finite_differences(&fused, &ins(DType::F64)?)
}

#[test]
fn packed_attention_matches_split_rope_attention_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(8);
    // (B, T, H, Hkv, hd, offset): plain, grouped-query, an offset into the tables, T spanning
    // three 64-row query blocks.
    for (b, t, h, hkv, hd, offset) in [(2, 5, 2, 2, 4, 0), (1, 6, 4, 2, 4, 0), (2, 4, 2, 1, 6, 3), (1, 150, 2, 1, 4, 0)]
    {
        let (c32, s32) = rope_tables(160, hd, DType::F32)?;
        let shape = [b, t, (h + 2 * hkv) * hd];
        let (c, s) = (c32.clone(), s32.clone());
        let fused = move |x: &[Tensor]| ops::attention_qkv(&x[0], &c, &s, offset, (h, hkv), 0.4);
        let (c, s) = (c32.clone(), s32.clone());
        let plain = move |x: &[Tensor]| plain_attention_qkv(&x[0], (&c, &s), offset, (h, hkv), 0.4);
        let x = rand(&mut rng, &shape, 1.5, DType::F32)?;
        assert_eq!(fused(std::slice::from_ref(&x))?.dims(), &[b, t, h * hd]);
        check_against_plain(&fused, &plain, &[x], 1e-5)?;
        if t < 64 {
            let (c, s) = rope_tables(160, hd, DType::F64)?;
            let fused64 = move |x: &[Tensor]| ops::attention_qkv(&x[0], &c, &s, offset, (h, hkv), 0.4);
            check_finite_differences(&fused64, &[rand(&mut rng, &shape, 1.5, DType::F64)?])?;
        }
    }
    Ok(())
}

#[test]
fn packed_swiglu_matches_split_swiglu_and_finite_differences() -> Result<()> {
    let mut rng = Rng::new(9);
    let fused = |x: &[Tensor]| ops::swiglu_packed(&x[0]);
    let plain = |x: &[Tensor]| {
        let f = x[0].dim(D::Minus1)? / 2;
        x[0].narrow(D::Minus1, 0, f)?.silu()? * x[0].narrow(D::Minus1, f, f)?
    };
    let x = rand(&mut rng, &[2, 3, 14], 2.0, DType::F32)?;
    assert_eq!(fused(std::slice::from_ref(&x))?.dims(), &[2, 3, 7]);
    check_against_plain(&fused, &plain, &[x], 1e-5)?;
    // More rows than one task holds.
    check_against_plain(&fused, &plain, &[rand(&mut rng, &[3000, 16], 2.0, DType::F32)?], 1e-5)?;
    check_finite_differences(&fused, &[rand(&mut rng, &[3, 10], 2.0, DType::F64)?])
}

#[test]
fn bad_input_is_refused_with_an_error() -> Result<()> {
    let mut rng = Rng::new(6);
    let x = rand(&mut rng, &[2, 4], 1.0, DType::F32)?;
    let e = ops::cross_entropy(&x, &Tensor::new(&[1u32, 4], &Device::Cpu)?).unwrap_err();
    assert!(e.to_string().contains("target 4 out of range for 4 classes"), "{e}");
    let e = ops::linear_cross_entropy(&x, &x, &Tensor::new(&[0u32, 2], &Device::Cpu)?).unwrap_err();
    assert!(e.to_string().contains("target 2 out of range for 2 classes"), "{e}");
    let e = ops::linear_cross_entropy(&x, &x.t()?, &Tensor::new(&[0u32, 1], &Device::Cpu)?).unwrap_err();
    assert!(e.to_string().contains("differ in width"), "{e}");
    let e = ops::cross_entropy(&x, &Tensor::new(&[1u32], &Device::Cpu)?).unwrap_err();
    assert!(e.to_string().contains("2 rows of logits but 1 targets"), "{e}");
    let q = rand(&mut rng, &[1, 2, 5, 4], 1.0, DType::F32)?;
    let kv = rand(&mut rng, &[1, 2, 3, 4], 1.0, DType::F32)?;
    let e = ops::attention(&q, &kv, &kv, 1.0).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
    let e = ops::swiglu(&x, &x.t()?).unwrap_err();
    assert!(e.to_string().contains("differ in shape"), "{e}");
    let e = ops::swiglu_packed(&rand(&mut rng, &[2, 5], 1.0, DType::F32)?).unwrap_err();
    assert!(e.to_string().contains("must be 2·ffn_hidden"), "{e}");
    // 2 query + 2·1 kv heads of width 3 (odd: RoPE needs pairs), then tables too short.
    let (cos, sin) = rope_tables(8, 4, DType::F32)?;
    let e = ops::attention_qkv(&rand(&mut rng, &[1, 4, 12], 1.0, DType::F32)?, &cos, &sin, 0, (2, 1), 1.0).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    let e = ops::attention_qkv(&rand(&mut rng, &[1, 6, 16], 1.0, DType::F32)?, &cos, &sin, 3, (2, 1), 1.0).unwrap_err();
    assert!(e.to_string().contains("at offset 3"), "{e}");
    let e = ops::rms_norm(&x, &Tensor::ones(3, DType::F32, &Device::Cpu)?, 1e-5).unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    let e = ops::swiglu(&x.to_dtype(DType::BF16)?, &x.to_dtype(DType::BF16)?).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    assert!(!ops::supported(&x.to_dtype(DType::BF16)?));
    Ok(())
}

// ------------------------------------------------------------------ the whole model

/// The model with fused kernels gives the plain model's logits, loss and every parameter's
/// gradient (f32, LORS with GQA, a KV cache prefill at an offset too).
#[test]
fn fused_model_matches_plain_model() -> Result<()> {
    ops::poison_outputs(true); // unwritten kernel outputs show up as NaN
    let mut cfg = Config::tiny();
    cfg.model.vocab_size = 50;
    cfg.lors.mode = Mode::Lors;
    let mut store = ParamStore::new_init(11, DType::F32, &Device::Cpu);
    let fused = Model::new(&cfg.model, &cfg.lors, &mut store)?;
    // B zeros at init would hide the residual path: perturb every parameter.
    let mut rng = Rng::new(12);
    for (_, var) in store.vars() {
        var.set(&(var.as_tensor() + rand(&mut rng, var.dims(), 0.05, DType::F32)?)?)?;
    }
    let plain = fused.merged()?.with_ops(lors_lm::model::Ops::Plain)?;
    let mut store_p = ParamStore::from_tensors(store.tensors(), DType::F32, &Device::Cpu);
    let plain_lors = Model::new(&cfg.model, &cfg.lors, &mut store_p)?.with_ops(lors_lm::model::Ops::Plain)?;
    let ids: Vec<u32> = (0..2 * 9).map(|_| rng.below(50) as u32).collect();
    let all = Tensor::from_vec(ids, (2, 9), &Device::Cpu)?;
    let (x, y) = (all.narrow(1, 0, 8)?, all.narrow(1, 1, 8)?);

    let lf = fused.forward(&x)?;
    let d = max_abs_diff(&lf, &plain.forward(&x)?)?;
    assert!(d < 1e-4, "logits differ by {d}");
    let loss_f = fused.forward_loss(&x, &y)?;
    let loss_p = Model::loss_with(lors_lm::model::Ops::Plain, &plain_lors.forward(&x)?, &y)?;
    let d = (loss_f.to_scalar::<f32>()? - loss_p.to_scalar::<f32>()?).abs();
    assert!(d < 1e-5, "loss differs by {d}");
    let (gf, gp) = (loss_f.backward()?, loss_p.backward()?);
    let (vars_f, vars_p) = (store.vars(), store_p.vars());
    assert_eq!(vars_f.len(), vars_p.len());
    for ((name, var), (name_p, pv)) in vars_f.iter().zip(&vars_p) {
        assert_eq!(name, name_p);
        let a = gf.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("{name}: no fused gradient"))?;
        let b = gp.get(pv.as_tensor()).ok_or_else(|| anyhow::anyhow!("{name}: no plain gradient"))?;
        let d = max_abs_diff(a, b)?;
        assert!(d < 1e-5, "{name}: gradients differ by {d}");
    }

    // Cached decoding at an offset: a prefill of 5 then 3 more tokens.
    let (mut cf, mut cp) = (fused.new_cache(), plain.new_cache());
    for (off, len) in [(0, 5), (5, 3)] {
        let part = x.narrow(1, off, len)?;
        let a = fused.forward_at(&part, off, Some(&mut cf))?;
        let b = plain.forward_at(&part, off, Some(&mut cp))?;
        let d = max_abs_diff(&a, &b)?;
        assert!(d < 1e-4, "cached logits at offset {off} differ by {d}");
    }
    Ok(())
}
