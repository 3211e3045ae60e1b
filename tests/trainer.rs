//! The optimizer step of `lors_lm::train::Trainer` (src/train/trainer.rs), on CPU with tiny
//! configs: gradient accumulation, clipping, the non-finite-step guard, and two whole steps
//! (warmup, clipping, AdamW with LORS parameter groups) against `torch.optim.AdamW`.
//!
//! The Trainer keeps its parameters in f32, so these tests compare f32 results. Two choices
//! make them sensitive to what they test:
//! * AdamW's first update is `lr · g / (|g| + eps)`, i.e. `lr · sign(g)` for the default eps,
//!   whatever the gradient's scale: a missing `1/k` or a skipped clip would not show. The
//!   tests that are about the gradient's scale use a large eps (1 here, 1e-2 in the reference
//!   case, comparable to the gradient entries), where the update grows with the gradient.
//! * Updates are compared as changes `Δ = p_after − p_before`, not as parameters, so the
//!   tolerances are relative to what the step did.
//!
//! The reference case's gradients are not the model's: a [`GradSync`] (the hook where
//! data-parallel training combines gradients) replaces them with closed-form values, so the
//! reference needs no model and depends on nothing of ours (scripts/trainer_step_reference.py).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lors_lm::config::{Config, LorsConfig, Mode, PrivateInit};
use lors_lm::rng::Rng;
use lors_lm::train::{GradSync, Source, Trainer};
use std::collections::HashMap;

const VOCAB: usize = 50;

/// Config::tiny (3 layers, d 32, 4 heads over 2 kv heads, LORS rank 4) with private factors
/// initialised off zero, so that A gets a gradient at the first step too.
fn tiny() -> Config {
    let mut c = Config::tiny();
    c.model.vocab_size = VOCAB;
    c.lors.groups = 2;
    c.lors.init = PrivateInit::Small;
    c
}

fn trainer(cfg: &Config) -> Result<Trainer> {
    Trainer::new(cfg.clone(), Source::Random { vocab: cfg.model.vocab_size }, &Device::Cpu)
}

/// Inputs and targets (B, T) of random ids.
fn batch(rng: &mut Rng, b: usize, t: usize, vocab: usize) -> Result<(Tensor, Tensor)> {
    let v: Vec<u32> = (0..b * (t + 1)).map(|_| rng.below(vocab as u64) as u32).collect();
    let all = Tensor::from_vec(v, (b, t + 1), &Device::Cpu)?; // (B, T + 1)
    Ok((all.narrow(1, 0, t)?.contiguous()?, all.narrow(1, 1, t)?.contiguous()?))
}

/// (name, values) of every parameter, in the Trainer's order.
type Snapshot = Vec<(String, Vec<f64>)>;

/// Every parameter's values (f64), in the Trainer's order.
fn snapshot(tr: &Trainer) -> Result<Snapshot> {
    tr.params()
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)))
        .collect()
}

/// Compare the updates `a − p0` and `b − p0` tensor by tensor: each difference must be within
/// `rtol` of the tensor's largest update (a norm-wise test: an entry whose gradient nearly
/// cancels has an error on the scale of the others), plus |p|·ε_f32 for the f32 rounding of
/// the two updated parameters. Returns the worst ratio (difference − rounding) / (largest
/// update).
fn compare_updates(what: &str, p0: &Snapshot, a: &Snapshot, b: &Snapshot, rtol: f64) -> f64 {
    let mut worst = 0.0f64;
    for ((name, p), ((_, pa), (_, pb))) in p0.iter().zip(a.iter().zip(b)) {
        let scale = p.iter().zip(pb).map(|(p, b)| (b - p).abs()).fold(0.0, f64::max);
        assert!(scale > 0.0, "{what}: {name} did not move");
        for (i, ((p, x), y)) in p.iter().zip(pa).zip(pb).enumerate() {
            let err = (((x - p) - (y - p)).abs() - y.abs() * f32::EPSILON as f64).max(0.0) / scale;
            assert!(
                err <= rtol,
                "{what}: {name}[{i}]: update {} vs {} (err {err:.2e} of the largest update)",
                x - p,
                y - p
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// Σ |p − p0| over every parameter: how far a step moved the model.
fn moved(p0: &Snapshot, s: &Snapshot) -> f64 {
    p0.iter().zip(s).flat_map(|((_, p), (_, q))| p.iter().zip(q).map(|(p, q)| (q - p).abs())).sum()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

// ---------------------------------------------------------------- gradient accumulation

/// k micro-batches of b sequences (`train.grad_accum = k`) take the same step as one batch of
/// k·b sequences (`grad_accum = 1`) on the same windows: the mean loss, the gradient norm and
/// every parameter's update agree.
///
/// Tolerance: the two runs sum the same 6·16 per-token gradient terms in different groupings,
/// in f32, so they differ by rounding: ~1e-6 of the largest entry at most (measured: 1.2e-7
/// of the largest update, beyond the f32 rounding of the parameters). 1e-5 leaves room; a
/// missing or doubled 1/k changes the update by a factor ~k (eps = 1: the update is nearly
/// linear in the gradient).
#[test]
fn k_micro_batches_take_the_same_step_as_one_batch_of_k_times_b() -> Result<()> {
    let (k, b) = (3, 2);
    let mut cfg = tiny();
    cfg.train.grad_clip = 0.0; // the gradient's scale reaches the update
    cfg.train.eps = 1.0;
    cfg.train.weight_decay = 0.0; // the update is the gradient's alone
    cfg.train.lr = 0.05;
    let mut micro = cfg.clone();
    micro.train.grad_accum = k;
    micro.train.batch_size = b;
    let mut whole = cfg.clone();
    whole.train.grad_accum = 1;
    whole.train.batch_size = k * b;

    // `step` draws from `Rng::new(seed).fork(1)`: k draws of b windows are the k·b windows of
    // one draw.
    let source = Source::Random { vocab: VOCAB };
    let t = cfg.train.seq_len;
    let data_rng = || Rng::new(cfg.train.seed).fork(1);
    let mut rng = data_rng();
    let parts = (0..k).map(|_| source.sample(&mut rng, b, t, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
    let (x, y) = source.sample(&mut data_rng(), k * b, t, &Device::Cpu)?;
    let xs: Vec<Tensor> = parts.iter().map(|(x, _)| x.clone()).collect();
    let ys: Vec<Tensor> = parts.iter().map(|(_, y)| y.clone()).collect();
    assert_eq!(Tensor::cat(&xs, 0)?.to_vec2::<u32>()?, x.to_vec2::<u32>()?, "not the same windows");
    assert_eq!(Tensor::cat(&ys, 0)?.to_vec2::<u32>()?, y.to_vec2::<u32>()?);

    let (mut tm, mut tw) = (trainer(&micro)?, trainer(&whole)?);
    let p0 = snapshot(&tm)?;
    assert_eq!(p0, snapshot(&tw)?, "both start from the seed's weights");
    let (sm, sw) = (tm.step()?, tw.step()?);
    assert_eq!((sm.tokens, sm.skipped, sw.skipped), (sw.tokens, false, false));
    assert!(rel(sm.loss, sw.loss) < 1e-6, "mean loss {} (k = {k}) vs {} (one batch)", sm.loss, sw.loss);
    assert!(rel(sm.grad_norm, sw.grad_norm) < 1e-5, "grad norm {} (k = {k}) vs {}", sm.grad_norm, sw.grad_norm);
    let worst = compare_updates("k micro-batches vs one batch", &p0, &snapshot(&tm)?, &snapshot(&tw)?, 1e-5);
    eprintln!(
        "accumulation: loss {:.3e}, grad norm {:.3e}, update {worst:.2e} (relative differences)",
        rel(sm.loss, sw.loss),
        rel(sm.grad_norm, sw.grad_norm)
    );
    Ok(())
}

// ---------------------------------------------------------------- clipping

/// Multiplies every gradient by a constant before the Trainer's norm and clip (as a rank that
/// rescaled would).
struct Scale(f64);

impl GradSync for Scale {
    fn all_reduce(&mut self, grads: &mut [Tensor], _losses: &mut [f64]) -> Result<()> {
        for g in grads.iter_mut() {
            *g = (&*g * self.0)?;
        }
        Ok(())
    }
}

/// Above `train.grad_clip`, the step is exactly the unclipped step on gradients scaled by
/// clip / norm (torch's clip_grad_norm_ factor, clip / (norm + 1e-6)); below it, the step is
/// the unclipped one. The reported gradient norm is the norm before clipping.
///
/// Tolerance: the clipped trainer multiplies by the factor after the norm, the reference
/// before it: the same f32 products, so the updates agree to rounding (1e-6 of the largest
/// update; measured: identical). With eps = 1 and no decay the update is nearly proportional
/// to the gradient, so clipping by 4 (or scaling by 4 where it should not) changes it ~4x.
#[test]
fn clipping_scales_the_step_above_the_threshold_and_only_there() -> Result<()> {
    let mut cfg = tiny();
    cfg.train.eps = 1.0;
    cfg.train.weight_decay = 0.0; // the update is the gradient's alone
    cfg.train.lr = 0.05;
    let mut rng = Rng::new(3);
    let micro = [batch(&mut rng, 2, 16, VOCAB)?, batch(&mut rng, 2, 16, VOCAB)?];
    let run = |clip: f64, scale: Option<f64>| -> Result<(Snapshot, f64)> {
        let mut c = cfg.clone();
        c.train.grad_clip = clip;
        let mut tr = trainer(&c)?;
        if let Some(s) = scale {
            tr.set_grad_sync(Box::new(Scale(s)));
        }
        let stats = tr.step_on(&micro)?;
        assert!(!stats.skipped);
        Ok((snapshot(&tr)?, stats.grad_norm))
    };
    let p0 = snapshot(&trainer(&cfg)?)?;
    let (free, norm) = run(0.0, None)?;
    assert!(norm.is_finite() && norm > 0.0);

    // Above the threshold.
    let clip = norm / 4.0;
    let (clipped, reported) = run(clip, None)?;
    assert_eq!(reported, norm, "grad_norm is the norm before clipping");
    let factor = clip / (norm + 1e-6);
    let (scaled, scaled_norm) = run(0.0, Some(factor))?;
    assert!(rel(scaled_norm, clip) < 1e-5, "the scaled gradients have norm {scaled_norm}, not the clip {clip}");
    let worst = compare_updates("clipped vs pre-scaled", &p0, &clipped, &scaled, 1e-6);
    // The clip is visible: the clipped step is ~1/4 of the free one.
    let ratio = moved(&p0, &clipped) / moved(&p0, &free);
    assert!(ratio < 0.3, "the clipped step is {ratio} of the unclipped one");

    // Below the threshold: untouched.
    let (below, reported) = run(4.0 * norm, None)?;
    assert_eq!(reported, norm);
    let worst_below = compare_updates("below the clip vs no clip", &p0, &below, &free, 1e-6);
    eprintln!("clipping: above {worst:.2e}, below {worst_below:.2e} (of the largest update); clipped/free {ratio:.3}");
    Ok(())
}

// ---------------------------------------------------------------- non-finite steps

/// What a [`Poison`] does to one step.
#[derive(Clone, Copy, PartialEq)]
enum Bad {
    No,
    /// The loss is NaN (as after an overflow in the forward pass).
    Loss,
    /// One gradient is +inf.
    Grad,
}

/// Spoils the steps that `plan` says (one entry per step).
struct Poison {
    plan: Vec<Bad>,
    step: usize,
}

impl GradSync for Poison {
    fn all_reduce(&mut self, grads: &mut [Tensor], losses: &mut [f64]) -> Result<()> {
        match self.plan[self.step] {
            Bad::No => {}
            Bad::Loss => losses[0] = f64::NAN,
            Bad::Grad => grads[0] = (grads[0].ones_like()? * f64::INFINITY)?,
        }
        self.step += 1;
        Ok(())
    }
}

/// Bit patterns, so that NaN compares equal to itself.
fn bits(s: &Snapshot) -> Vec<Vec<u64>> {
    s.iter().map(|(_, v)| v.iter().map(|x| x.to_bits()).collect()).collect()
}

/// A step with a non-finite loss or gradient norm changes nothing (weights, AdamW moments and
/// count) and is counted; a finite step resets the count; `train.max_bad_steps` of them in a
/// row are tolerated, one more is an error that names train.lr.
#[test]
fn non_finite_steps_are_skipped_and_too_many_in_a_row_stop_training() -> Result<()> {
    let mut cfg = tiny();
    cfg.train.max_bad_steps = 2;
    // A constant learning rate: skipped steps still advance the step count.
    cfg.train.warmup_steps = 0;
    cfg.train.min_lr = cfg.train.lr;
    let mut rng = Rng::new(5);
    let micro = [batch(&mut rng, 2, 16, VOCAB)?];

    // Bad, bad, good, bad, bad, good: never three in a row, so no error.
    use Bad::*;
    let mut tr = trainer(&cfg)?;
    let p0 = snapshot(&tr)?;
    tr.set_grad_sync(Box::new(Poison { plan: vec![Loss, Grad, No, Grad, Loss, No], step: 0 }));
    let mut seen = vec![];
    for i in 0..6 {
        let before = snapshot(&tr)?;
        let s = tr.step_on(&micro)?;
        assert_eq!(s.step, i + 1);
        seen.push((s.skipped, s.bad_steps));
        if s.skipped {
            assert_eq!(bits(&snapshot(&tr)?), bits(&before), "a skipped step changed the weights");
        }
        if i == 2 {
            // The first good step equals a fresh trainer's first step: the skipped ones left
            // the AdamW moments and bias-correction count alone.
            let mut fresh = trainer(&cfg)?;
            fresh.step_on(&micro)?;
            compare_updates("after two skipped steps vs fresh", &p0, &snapshot(&tr)?, &snapshot(&fresh)?, 1e-6);
        }
    }
    assert_eq!(seen, [(true, 1), (true, 2), (false, 0), (true, 1), (true, 2), (false, 0)]);
    assert_eq!(tr.state().step, 6);

    // NaN weights: every step is bad; the third in a row is an error.
    let mut w: HashMap<String, Tensor> = trainer(&cfg)?.store().tensors();
    let gain = w["norm.weight"].clone();
    w.insert("norm.weight".into(), (gain.ones_like()? * f64::NAN)?);
    let mut tr = Trainer::with_weights(cfg.clone(), w, Source::Random { vocab: VOCAB }, &Device::Cpu)?;
    let start = bits(&snapshot(&tr)?);
    for i in 1..=2 {
        let s = tr.step_on(&micro)?;
        assert!(s.skipped && s.loss.is_nan() && s.bad_steps == i, "step {i}: {s:?}");
    }
    assert_eq!(bits(&snapshot(&tr)?), start);
    let err = format!("{:#}", tr.step_on(&micro).expect_err("a third bad step in a row must fail"));
    assert!(err.contains("3 consecutive steps") && err.contains("train.lr"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------- against torch.optim.AdamW

/// One parameter of the reference case: its change after each step at `ref_samples(n)`, and
/// over the whole tensor [Σ Δ, Σ |Δ|, Σ Δ²] after each step (Δ = p − p0, cumulative).
struct RefParam {
    name: &'static str,
    shape: &'static [usize],
    delta: [[f64; 4]; 2],
    sums: [[f64; 3]; 2],
}

/// The indices of a tensor of n elements at which the script samples Δ.
fn ref_samples(n: usize) -> [usize; 4] {
    [0, n / 3, 2 * n / 3, n - 1]
}

/// As the script's constants: LORS with GQA (2 heads, 1 kv head), 2 groups over layers 0-2,
/// layer 3 private, untied head; lr 0.4 with 4 warmup steps (step 1 at 0.1, step 2 at 0.2),
/// AdamW betas (0.9, 0.95), eps 1e-2, decay 0.1; private A at 2x lr, B at 4x, decay 0.03.
fn ref_config() -> Result<Config> {
    let mut c = Config::tiny();
    let m = &mut c.model;
    (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden) = (16, 8, 4, 2, 1, 16);
    m.max_seq_len = 16;
    m.tie_embeddings = false;
    c.lors = LorsConfig {
        mode: Mode::Lors,
        rank: 2,
        groups: 2,
        private_layers: vec![3],
        private_lr_mult: 2.0,
        private_b_lr_mult: Some(4.0),
        private_weight_decay: Some(0.03),
        ..LorsConfig::default()
    };
    let t = &mut c.train;
    (t.lr, t.min_lr, t.warmup_steps, t.max_steps) = (0.4, 0.0, 4, 100);
    (t.weight_decay, t.beta1, t.beta2, t.eps, t.grad_clip) = (0.1, 0.9, 0.95, 1e-2, 1.0);
    (t.batch_size, t.seq_len) = (2, 8);
    c.validate()?;
    Ok(c)
}

/// The script's `weight`: element i of the k-th parameter (name order).
fn ref_weight(name: &str, i: i64, k: i64) -> f64 {
    let u = ((31 * i * i + 17 * i + 101 * k + 7) % 997 - 498) as f64 / 498.0;
    if name.ends_with("norm.weight") {
        0.5 + 0.1 * u
    } else {
        0.3 * u
    }
}

/// The script's `grad`: element i of the k-th parameter's gradient at step s (0-based).
fn ref_grad(i: i64, k: i64, s: usize) -> f64 {
    const AMP: [f64; 2] = [0.2, 0.02];
    AMP[s] * (((37 * i * i + 11 * i + 53 * k + 211 * s as i64 + 3) % 991 - 495) as f64 / 495.0)
}

/// The tensor of `shape` whose element i is f(i, k), in f32 (rounded as the script rounds).
fn ref_tensor(shape: &[usize], f: impl Fn(i64) -> f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n as i64).map(f).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// Replaces the model's gradients with the reference case's fixed ones, step by step.
struct FixedGrads {
    steps: Vec<Vec<Tensor>>,
    next: usize,
}

impl GradSync for FixedGrads {
    fn all_reduce(&mut self, grads: &mut [Tensor], _losses: &mut [f64]) -> Result<()> {
        grads.clone_from_slice(&self.steps[self.next]);
        self.next += 1;
        Ok(())
    }
}

/// Relative tolerance on each update Δ: f32 arithmetic in the update (a few roundings, ~1e-7),
/// and the clip factor from a gradient norm summed in f32 (~1e-6; the update's sensitivity to
/// the gradient's scale is at most 1). On top, each parameter is stored in f32: ±|p|·2⁻²⁴
/// (the tolerance allows |p|·ε_f32 = |p|·2⁻²³).
const REF_RTOL: f64 = 1e-5;

/// Two `Trainer::step_on` calls with fixed gradients against torch's AdamW, clip_grad_norm_ and
/// LambdaLR warmup (scripts/trainer_step_reference.py): step 1 with a gradient norm above the
/// clip, step 2 below it; four parameter groups (matrices, gains without decay, private A and
/// B with their own lr multipliers and decay). Compares the learning rate, the gradient norm
/// and, per parameter, Δ at four entries and Σ Δ, Σ |Δ|, Σ Δ² over the tensor.
///
/// Tolerance per entry: REF_RTOL·|Δ| + |p|·ε_f32; for the sums, the same bounds summed over
/// the tensor (if every entry is within its bound, each sum is within the summed bound).
#[test]
fn two_steps_match_torch_adamw_with_groups_warmup_and_clipping() -> Result<()> {
    let cfg = ref_config()?;
    let weights = REF
        .iter()
        .enumerate()
        .map(|(k, r)| Ok((r.name.to_string(), ref_tensor(r.shape, |i| ref_weight(r.name, i, k as i64))?)))
        .collect::<Result<HashMap<_, _>>>()?;
    // with_weights refuses missing and unused tensors: the script's parameters are the model's.
    let mut tr = Trainer::with_weights(cfg, weights, Source::Random { vocab: 16 }, &Device::Cpu)?;
    let order: Vec<&str> = tr.params().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(order, REF.iter().map(|r| r.name).collect::<Vec<_>>(), "the gradients' order is the script's");
    let steps = (0..2)
        .map(|s| REF.iter().enumerate().map(|(k, r)| ref_tensor(r.shape, |i| ref_grad(i, k as i64, s))).collect())
        .collect::<Result<Vec<Vec<Tensor>>>>()?;
    tr.set_grad_sync(Box::new(FixedGrads { steps, next: 0 }));
    let p0 = snapshot(&tr)?;
    let mut rng = Rng::new(7);
    let micro = [batch(&mut rng, 2, 8, 16)?];

    let mut worst = 0.0f64;
    for s in 0..2 {
        let stats = tr.step_on(&micro)?;
        assert!(!stats.skipped);
        assert!(rel(stats.lr, REF_LR[s]) < 1e-12, "step {}: lr {} vs torch {}", s + 1, stats.lr, REF_LR[s]);
        assert!(rel(stats.grad_norm, REF_GRAD_NORM[s]) < 1e-6, "step {}: grad norm {}", s + 1, stats.grad_norm);
        let now = snapshot(&tr)?;
        for (r, ((name, p), (_, q))) in REF.iter().zip(p0.iter().zip(&now)) {
            let at = |what: &str| format!("step {}: {name} {what}", s + 1);
            assert_eq!(p.len(), r.shape.iter().product::<usize>(), "{}", at("size"));
            let d: Vec<f64> = p.iter().zip(q).map(|(p, q)| q - p).collect();
            let tol: Vec<f64> =
                d.iter().zip(q).map(|(d, q)| REF_RTOL * d.abs() + q.abs() * f32::EPSILON as f64).collect();
            for (j, want) in ref_samples(d.len()).into_iter().zip(r.delta[s]) {
                let err = (d[j] - want).abs();
                assert!(err <= tol[j], "{}: Δ {} vs torch {want} (err {err:.2e})", at(&format!("[{j}]")), d[j]);
                worst = worst.max(err / tol[j]);
            }
            let got = [d.iter().sum::<f64>(), d.iter().map(|x| x.abs()).sum(), d.iter().map(|x| x * x).sum()];
            let bound = [
                tol.iter().sum::<f64>(),
                tol.iter().sum(),
                d.iter().zip(&tol).map(|(d, t)| t * (2.0 * d.abs() + t)).sum(),
            ];
            for (what, ((g, w), b)) in ["Σ Δ", "Σ |Δ|", "Σ Δ²"].into_iter().zip(got.iter().zip(r.sums[s]).zip(bound))
            {
                assert!((g - w).abs() <= b, "{}: {g} vs torch {w} (bound {b:.2e})", at(what));
                worst = worst.max((g - w).abs() / b);
            }
        }
    }
    eprintln!("torch reference: worst error {worst:.2e} of its tolerance");
    Ok(())
}

// ---- output of scripts/trainer_step_reference.py
// torch 2.15.0+cu132 (CPU), numpy 2.4.6; gradient norms 6.1514 (clipped to 1.0), 0.6138
const REF_LR: [f64; 2] = [0.1, 0.2];
const REF_GRAD_NORM: [f64; 2] = [6.151390708277104, 0.6137897657863011];
#[rustfmt::skip]
const REF: [RefParam; 74] = [
    RefParam { name: "embed.weight", shape: &[16, 8], delta: [[0.07932606347476773, 0.052025782762339184, -0.05416407200680917, -0.04187705252491006], [0.20893626091321282, 0.09856841187632304, -0.16761661194542626, -0.14139169969561038]], sums: [[0.09055603473477469, 6.922588761479885, 0.4307338677406038], [-0.7452593417550739, 16.309629954554545, 2.4419811137457073]] },
    RefParam { name: "layers.0.attn_norm.weight", shape: &[8], delta: [[0.07424985510698068, 0.06385803057851369, 0.07472018036634098, -0.07513308280955533], [0.19296186696038609, 0.1494209093688731, 0.19489691793289454, -0.12058636007500628]], sums: [[0.20303940771547208, 0.4661197319753581, 0.030533063511390755], [0.42925397807043614, 1.0597822390504548, 0.17750744210256036]] },
    RefParam { name: "layers.0.down.lors_a", shape: &[2, 16], delta: [[0.1444731664518139, -0.1494880265245838, -0.1327608794261495, 0.1032862957001115], [0.3663414727989778, -0.23352086472977043, -0.12203264449803664, 0.1942228154534541]], sums: [[-0.27169082860695765, 3.564946782520029, 0.4368247478355578], [-0.8861170310911285, 8.339392820050744, 2.5165477661781956]] },
    RefParam { name: "layers.0.down.lors_b", shape: &[8, 2], delta: [[0.2758584497633554, 0.27963069966515014, 0.3040757316082547, -0.24071964082237796], [0.6757052222955588, 0.6902540803746264, 0.794305387464586, -0.7333833803532883]], sums: [[0.0977467048620908, 3.598185978175951, 0.8677513934470267], [-0.154540462084779, 8.93431923033636, 5.447714463067229]] },
    RefParam { name: "layers.0.ffn_norm.weight", shape: &[8], delta: [[0.0647777860754487, 0.041945198499329095, 0.06565189069261468, 0.07095892647169832], [0.1533245780948742, 0.05805059329541573, 0.1570276014388845, 0.17932675706964651]], sums: [[0.15209048904050448, 0.4553327903008949, 0.027224017989279384], [0.32053833535313214, 1.0441213436593413, 0.14772032700502116]] },
    RefParam { name: "layers.0.gate.lors_a", shape: &[2, 8], delta: [[0.11966031424502585, 0.12241862874504557, 0.14183911085134648, -0.13846510710418475], [0.2631552096686779, 0.27426202653219245, 0.35785633587875865, -0.1514984446836377]], sums: [[-0.3664740983692509, 1.8955830683639383, 0.23357716005300225], [-1.1589572104106027, 4.283512548534752, 1.3312778295072318]] },
    RefParam { name: "layers.0.gate.lors_b", shape: &[16, 2], delta: [[0.21250400586625706, 0.2703445901725777, 0.3012630921294161, -0.09245510725026507], [0.41082408622809496, 0.657726935255448, 0.7836074759192423, -0.3978584556438334]], sums: [[-0.5585909290616797, 7.481388278145005, 1.9318566046217192], [-0.058431516663438154, 15.318401303404379, 8.74119309990471]] },
    RefParam { name: "layers.0.k.lors_a", shape: &[2, 8], delta: [[0.08778385310236664, 0.09259144676512565, 0.12694201587834308, -0.1503612826098706], [0.13107109785944915, 0.1498553895154655, 0.2962611616681621, -0.23214901027257767]], sums: [[-0.221648771166146, 1.8050967172781507, 0.23118646532867773], [-0.02013841782708456, 3.354034991079264, 0.8751334286450669]] },
    RefParam { name: "layers.0.k.lors_b", shape: &[4, 2], delta: [[0.12120617570106351, -0.16390764367083527, 0.1353492508830424, 0.20524790889205613], [0.06495384143287092, -0.5562777680477273, 0.11120122728451348, 0.3790568976193573]], sums: [[0.10174751922164932, 1.4994181432497078, 0.3340598452312529], [0.10057016197460872, 2.5207938372509213, 1.1945196363403383]] },
    RefParam { name: "layers.0.o.lors_a", shape: &[2, 8], delta: [[0.016426703430184653, 0.028157347736350036, 0.10629934537388602, 0.1501171214202448], [-0.08101722468350653, -0.05494461588049869, 0.20504669913819223, 0.3894566637854967]], sums: [[-0.4338616551587693, 1.765182786931795, 0.22879524529359785], [-0.8009003434097259, 3.626752341732574, 0.9662743457830603]] },
    RefParam { name: "layers.0.o.lors_b", shape: &[8, 2], delta: [[-0.07644073643308269, -0.06301351800341137, 0.17441349473124326, 0.2895395013836052], [-0.3652958471887324, -0.34478178623853023, 0.25261676510653486, 0.7321833853321075]], sums: [[0.40614139486912315, 3.6198121738412996, 0.9336520322779229], [0.7338404138278037, 8.580486719677275, 5.3478425052449285]] },
    RefParam { name: "layers.0.q.lors_a", shape: &[2, 8], delta: [[-0.07345843265893931, -0.07063797240559516, 0.05889163299509659, 0.1383451129094735], [-0.25790094485250653, -0.25420913700618425, 0.027580924089242162, 0.3415163626481822]], sums: [[0.5627735064605494, 1.8260845358959399, 0.23663313255058183], [0.969416109467186, 4.787467448680939, 1.5978687984967759]] },
    RefParam { name: "layers.0.q.lors_b", shape: &[8, 2], delta: [[-0.19243720493225114, -0.1835195199796582, 0.02463209132574198, 0.26090295784887474], [-0.6171233801666116, -0.5959208731520031, -0.1762425739656595, 0.6144075006729823]], sums: [[1.2558692055946616, 3.711875289716048, 0.9471206029245921], [2.458705714365215, 9.530420083920987, 6.1765155433574135]] },
    RefParam { name: "layers.0.up.lors_a", shape: &[2, 8], delta: [[-0.11218162853268118, -0.10885111147586835, -0.04442268677682778, 0.12048097706932961], [-0.34775711251853336, -0.33945965776205567, -0.19772738769267723, 0.2669307511083352]], sums: [[0.40594085194095164, 1.906484660480883, 0.23805750115053248], [0.8469191220386905, 4.560070264703016, 1.397249578562748]] },
    RefParam { name: "layers.0.up.lors_b", shape: &[16, 2], delta: [[-0.24806856254664383, -0.15616661152843303, 0.09742169529483828, -0.3048588703447229], [-0.750906590165659, -0.5376513965509564, -0.005949226627739224, -0.4972221237493261]], sums: [[0.8132186350282784, 6.915392624505598, 1.6715325446011116], [0.48182210197187064, 15.157524368454387, 8.797964466906299]] },
    RefParam { name: "layers.0.v.lors_a", shape: &[2, 8], delta: [[-0.13321215840614356, -0.1310608251288483, -0.10002818995068463, 0.08956221281047816], [-0.12212261140140497, -0.11114197669516054, -0.3199774270085964, 0.1383917848891208]], sums: [[0.007419388866280768, 1.84197559613933, 0.22498121644755675], [0.2539802126235483, 3.320093665221601, 0.8602192307658649]] },
    RefParam { name: "layers.0.v.lors_b", shape: &[4, 2], delta: [[-0.28110406766774754, 0.2992705949558613, -0.27746304084359413, -0.25204736526921023], [-0.33037968017288244, 0.7762916390406097, -0.30995567114093703, -0.7601932036859625]], sums: [[-0.31409744098025383, 1.8915236813481386, 0.5141245129251786], [-0.14914599123220784, 3.901176674689904, 2.2042053606466823]] },
    RefParam { name: "layers.1.attn_norm.weight", shape: &[8], delta: [[-0.07287344748595109, 0.07301767437524065, -0.07233116105448889, -0.06755504945623214], [-0.10347361825474588, 0.1878758387016204, -0.09952031854886606, -0.06766900303455575]], sums: [[-0.1288020984480553, 0.4991028969086931, 0.03304999423714851], [-0.0771667961017915, 0.9178423452087361, 0.11355558358737718]] },
    RefParam { name: "layers.1.down.lors_a", shape: &[2, 16], delta: [[-0.15162086990787488, -0.13243878410272902, -0.10485677877495497, 0.13463327734334798], [-0.24419252290797452, -0.12191270859457493, -0.3315298200159291, 0.3253626026563582]], sums: [[-0.5037096300351162, 3.2600409571619338, 0.3917260111751972], [-1.8181868739381168, 7.319507881751408, 2.0526633870909228]] },
    RefParam { name: "layers.1.down.lors_b", shape: &[8, 2], delta: [[0.2999498801418585, 0.3026082617074082, -0.27927134997441655, -0.14211088994210674], [0.7802084345863043, 0.789938197039667, -0.3292829834950156, -0.5038871806086318]], sums: [[0.6339871550345652, 3.018584288912961, 0.7398705029002234], [0.5731755822458431, 7.3720470505291775, 4.346646311063791]] },
    RefParam { name: "layers.1.ffn_norm.weight", shape: &[8], delta: [[0.07353363706525706, 0.062431068355904284, 0.0740302372775482, -0.07576638567915661], [0.1900084312811603, 0.1433520376257933, 0.1920570917703891, -0.12554559539137022]], sums: [[0.18378638820370152, 0.4519525786353812, 0.029817825190526545], [0.3701719135661424, 1.0555740008153534, 0.17558528207133006]] },
    RefParam { name: "layers.1.gate.lors_a", shape: &[2, 8], delta: [[0.14301108136427695, 0.14110537585621974, -0.15052112808354795, -0.11113939754378804], [0.35995719402779397, 0.35566393571332, -0.24283157883016065, -0.3453760802618466]], sums: [[-0.06430099504302794, 1.6896028767320777, 0.2046415862918946], [-0.7883835984741614, 4.700217966179521, 1.4761469175308224]] },
    RefParam { name: "layers.1.gate.lors_b", shape: &[16, 2], delta: [[0.27212140264937623, 0.30217222007392136, -0.2831014916369349, 0.1526443014454591], [0.6594257789506074, 0.7859704441040616, -0.3528495227142749, 0.1721230516120439]], sums: [[-1.191452256963802, 7.33450473253773, 1.8388219730152735], [-2.5958073607205647, 16.311577608699665, 9.553828464284127]] },
    RefParam { name: "layers.1.k.lors_a", shape: &[2, 8], delta: [[0.1274333212033641, 0.12981189539232202, 0.14618025963680498, -0.13269349071934544], [0.29537940314168587, 0.30483636165593114, 0.37507671416684235, -0.11849075085384357]], sums: [[-0.2242601214811773, 1.8918619230383185, 0.23053977350108426], [-0.6607598153866214, 4.320663303391242, 1.301232724662761]] },
    RefParam { name: "layers.1.k.lors_b", shape: &[4, 2], delta: [[0.23278978452921076, 0.08416430136357997, 0.23870780752252282, 0.26924359390510155], [0.49503709083445413, -0.04185826783296903, 0.5188955373779642, 0.646002640367756]], sums: [[0.31087031177635505, 1.7527725971100936, 0.41091605265902376], [0.24101477979355934, 3.851358095822903, 2.1633593446663104]] },
    RefParam { name: "layers.1.o.lors_a", shape: &[2, 8], delta: [[0.10170976973623849, 0.10556561042346278, 0.13325821145333838, -0.14631103285932268], [0.1872777771685002, 0.20285429910632757, 0.32212350885018015, -0.20477599860782955]], sums: [[-0.6562108826129209, 1.832152829544603, 0.23254437382448148], [-1.0274721198799752, 3.2527493422203935, 0.8057440860071308]] },
    RefParam { name: "layers.1.o.lors_b", shape: &[8, 2], delta: [[0.16224796927660973, 0.172946024810839, 0.2488806222056723, -0.30287627062965966], [0.20789411033904692, 0.2482495746234118, 0.567657682499979, -0.47977198022373796]], sums: [[-0.6023384512335968, 3.6457276354460975, 0.930479258926895], [-0.5760947292720544, 6.737486205965011, 3.554457051415858]] },
    RefParam { name: "layers.1.q.lors_a", shape: &[2, 8], delta: [[0.050044055248245733, 0.05815789804467335, 0.1167249504330296, 0.1501335305653672], [0.0012346514117890783, 0.025388524057377515, 0.24841999362276201, 0.3927956875824248]], sums: [[-0.24517304574293686, 1.781286520983491, 0.22968369098558464], [-0.20288793238222946, 3.3675452214472203, 0.9040206977035719]] },
    RefParam { name: "layers.1.q.lors_b", shape: &[8, 2], delta: [[-0.005089684364936953, 0.02316462143886533, 0.20320425164821423, 0.29796004304131884], [-0.23500685772925362, -0.18060976434900441, 0.36767294942628115, 0.7653877002370217]], sums: [[-0.42866696396397413, 3.5021236938761877, 0.9211456864741974], [-0.7825273875066325, 7.7278731186966025, 4.340474780057388]] },
    RefParam { name: "layers.1.up.lors_a", shape: &[2, 8], delta: [[-0.0539692307813433, -0.04515642168254755, 0.0802777438966935, 0.14333990243420153], [-0.21858018570369822, -0.19991978759096787, 0.1005504922115988, 0.3615850524154537]], sums: [[0.42969268689043505, 1.8334045449340137, 0.23542980507791236], [0.8008903366097806, 4.54143113137981, 1.4732538598499505]] },
    RefParam { name: "layers.1.up.lors_b", shape: &[16, 2], delta: [[-0.16182608278455046, 0.09560587329678426, 0.22585710831904426, -0.27313821075632966], [-0.5466274747236468, -0.010696583245195984, 0.4627199360802362, -0.2831919097572279]], sums: [[1.5901252013308336, 7.332748359336516, 1.8281324755361845], [2.781285684754083, 17.510770212213327, 10.65628576785397]] },
    RefParam { name: "layers.1.v.lors_a", shape: &[2, 8], delta: [[-0.10121431592197261, -0.09715831052611262, -0.007322843867065873, 0.12807750694904663], [-0.32123145447081525, -0.3114022272879753, -0.12464722176561116, 0.2983892260304156]], sums: [[0.5614969385481964, 1.8619561048641948, 0.23721896414244284], [1.049196996006855, 4.818780352409936, 1.5571613726043796]] },
    RefParam { name: "layers.1.v.lors_b", shape: &[4, 2], delta: [[-0.23145960916428432, -0.2855579635297249, -0.22529188762492725, -0.17995565799601973], [-0.7096287083108692, -0.367075152622057, -0.6941779863666063, -0.5918473497188452]], sums: [[-0.4073573435698833, 1.939519297937979, 0.4832602315654664], [-1.3457957490722963, 4.89589899421063, 3.2050557918283262]] },
    RefParam { name: "layers.2.attn_norm.weight", shape: &[8], delta: [[-0.06359879025481585, -0.07411853209475405, -0.06261557071782381, -0.053333832789711044], [-0.19323519371271192, -0.11278252879092687, -0.1907750334486007, -0.1681023029012585]], sums: [[-0.14627683785906115, 0.49574918313030564, 0.031704012514865355], [-0.35053798256818036, 1.112058321433476, 0.17906051060347927]] },
    RefParam { name: "layers.2.down.lors_a", shape: &[2, 16], delta: [[-0.13521199957244143, -0.10485485662651742, -0.023301991855451384, 0.1481391558724715], [-0.13487655794876255, -0.33114261247870835, -0.15537838144399266, 0.38411255141468814]], sums: [[-0.051043829830672155, 3.3261347230359486, 0.3973402261180199], [-0.2891484804965935, 6.73503841422443, 1.7483022930529704]] },
    RefParam { name: "layers.2.down.lors_b", shape: &[8, 2], delta: [[-0.2842188384339335, -0.2807388199199665, -0.2379184868412864, 0.10676457539860706], [-0.3535732291664487, -0.33365017405297226, -0.7276111277512343, 0.020605600289188314]], sums: [[-0.07307051838178936, 3.3896589006083016, 0.8294674398683884], [-0.5299859649091119, 6.873933208444373, 3.5721369597680814]] },
    RefParam { name: "layers.2.ffn_norm.weight", shape: &[8], delta: [[-0.07362533499730778, 0.07223022422879632, -0.07311297778068804, -0.0686248534039402], [-0.10905785409325047, 0.18461330778584362, -0.10523987727034523, -0.07432329925784137]], sums: [[-0.14241636134356817, 0.5026031842551885, 0.0332411833592768], [-0.13277725110494, 0.9307435494591325, 0.1154201871557523]] },
    RefParam { name: "layers.2.gate.lors_a", shape: &[2, 8], delta: [[-0.1526082609655039, -0.15125486301161944, -0.13439036908408747, -0.04692169102190613], [-0.25323773334869226, -0.2450239787952383, -0.13456812683743097, -0.2008615087738314]], sums: [[-0.040021517633231835, 1.5725288192013887, 0.18841044741471766], [-0.3336035350449032, 3.1404305101978496, 0.8427182601536728]] },
    RefParam { name: "layers.2.gate.lors_b", shape: &[16, 2], delta: [[0.2979588373403065, -0.2823162834930326, -0.24459086992540235, 0.24563243813865643], [0.7714997139422366, -0.35224472777879157, -0.7442411689611494, 0.5479524635846341]], sums: [[-0.21944001223022813, 6.702213320173229, 1.6355887902786823], [-2.304813010555973, 16.902246384846507, 10.356950890070767]] },
    RefParam { name: "layers.2.k.lors_a", shape: &[2, 8], delta: [[0.14390106704434646, 0.1454465247310852, -0.14676027901942157, -0.09985146344399909], [0.3670724647825018, 0.37288431426855173, -0.216933665639149, -0.31817123554538224]], sums: [[-0.15170429826049325, 1.6092994320121048, 0.19499079165047256], [-0.8979723263776024, 4.255379019303704, 1.2849162542878698]] },
    RefParam { name: "layers.2.k.lors_b", shape: &[4, 2], delta: [[0.28287888423961133, 0.22091807392152016, 0.27922025798689876, 0.29674437511176177], [0.7027953754651046, 0.44274951603505086, 0.6949195685147098, 0.7653050170147919]], sums: [[0.9588786953752745, 1.7405072818970186, 0.4468093578280634], [1.7787859694183696, 4.7309919696084455, 3.0434796516402667]] },
    RefParam { name: "layers.2.o.lors_a", shape: &[2, 8], delta: [[0.1340411151372467, 0.13612809096731732, 0.15006991445060075, -0.12600226388813282], [0.32252054006026637, 0.33069870883794916, 0.3903432865863464, -0.381808126580089]], sums: [[-0.07838953609917568, 1.8563028386841183, 0.22453295904386092], [-0.46522418394563736, 4.5754144247096304, 1.4140738674763802]] },
    RefParam { name: "layers.2.o.lors_b", shape: &[8, 2], delta: [[0.24956023820887732, 0.2546203814124441, 0.2898197681102678, -0.26948634337029187], [0.5645633197933658, 0.5847392058993319, 0.7355732153845459, -0.2594483148083659]], sums: [[-0.5742514356961772, 3.7925233121530026, 0.9287080163000783], [-1.7523385599181904, 8.576180362993009, 5.21035411401963]] },
    RefParam { name: "layers.2.q.lors_a", shape: &[2, 8], delta: [[0.11280356913745912, 0.11599121552730987, 0.1387358529887699, -0.14177422122592015], [0.23330301546986432, 0.2462275937244714, 0.3443063489626855, -0.17531844224892396]], sums: [[-0.4880414547151294, 1.8731813943420468, 0.23429121814111814], [-1.304565375566398, 4.029084919373286, 1.2114456022287419]] },
    RefParam { name: "layers.2.q.lors_b", shape: &[8, 2], delta: [[0.19328814912854883, 0.20173678174736775, 0.2623762608224426, -0.2951409958492929], [0.32958828169467314, 0.363305759001362, 0.6230049935932238, -0.4269368526606341]], sums: [[-1.4590158995971767, 3.66332630421451, 0.9334967295886519], [-2.55499034135631, 6.618403408921213, 3.2631952644693385]] },
    RefParam { name: "layers.2.up.lors_a", shape: &[2, 8], delta: [[0.07354476582774858, 0.07954400899097375, 0.12171411588902159, -0.15244600386867266], [0.07672372263468803, 0.09835809231330817, 0.27340395835817677, -0.25086880202991985]], sums: [[-0.3720342171141322, 1.8236392263770091, 0.23222475940455345], [-0.5400383018568501, 3.428341067874807, 0.9144777527988237]] },
    RefParam { name: "layers.2.up.lors_b", shape: &[16, 2], delta: [[0.07528803688002861, 0.21883778210486882, 0.2733012986004403, -0.2169070420349506], [-0.06472472023958492, 0.44053220232611534, 0.6687122803752175, -0.6739404304403348]], sums: [[0.09370523686786808, 7.319783119196554, 1.8800425941813348], [0.1368958751221272, 15.678397195570714, 9.375494443578837]] },
    RefParam { name: "layers.2.v.lors_a", shape: &[2, 8], delta: [[-0.02105766394503522, -0.008056578817489113, 0.09635525243938875, 0.14776305953396293], [-0.1519849718847211, -0.12683962179747582, 0.16310399310018517, 0.3791616530392782]], sums: [[-0.3054789325895294, 1.7803745512670213, 0.23349691322004335], [-0.6565542310238726, 3.9953694220353757, 1.1425104664198953]] },
    RefParam { name: "layers.2.v.lors_b", shape: &[4, 2], delta: [[-0.12865345484425553, -0.2413461868172554, -0.11339470126883687, 0.05040906273705011], [-0.478950595908942, -0.7328876328009044, -0.4458701257234783, -0.12242803856327286]], sums: [[-0.9440672568432535, 1.5672551534470773, 0.36677387068874256], [-2.676664444517137, 3.907157479628656, 2.132198074160305]] },
    RefParam { name: "layers.3.attn_norm.weight", shape: &[8], delta: [[-0.0446871450340649, -0.06580617892417284, -0.04238459549959306, -0.016917061888270912], [-0.14784992777637723, -0.057389372426216334, -0.14259434422664768, -0.08820051072195262]], sums: [[-0.1634019182298152, 0.4345048568384038, 0.026320313499984684], [-0.4011769853007914, 1.0638959986423955, 0.15476202557664787]] },
    RefParam { name: "layers.3.down.weight", shape: &[8, 16], delta: [[-0.05105190395217496, 0.07550619229849229, 0.047062062776996566, 0.05742781453027454], [-0.16006248510274013, 0.19751322101121338, 0.07543388382217725, 0.12270295269737974]], sums: [[0.4321713758560757, 7.2907117749736114, 0.4493222474965316], [0.41661069719049615, 16.380984992234207, 2.4302772021358026]] },
    RefParam { name: "layers.3.ffn_norm.weight", shape: &[8], delta: [[-0.06006605478032606, -0.07238135295689652, -0.05887962170138089, -0.047364373204414556], [-0.18444859665745106, -0.09988352823342783, -0.18153029283203417, -0.15403291860043977]], sums: [[-0.11572364495632342, 0.49072239798300127, 0.030887306120143457], [-0.3843574744222322, 1.246592893735564, 0.20880358677448657]] },
    RefParam { name: "layers.3.gate.weight", shape: &[16, 8], delta: [[-0.06359061086274259, 0.0696194773667595, 0.011854124590446602, 0.03971592091138959], [-0.19128958637560622, 0.17473294809029438, -0.031564968634237744, 0.05095719557494044]], sums: [[0.0786514963915797, 7.047090470078551, 0.4349063614607933], [-0.4776121594378629, 15.44159569490485, 2.243882950774802]] },
    RefParam { name: "layers.3.k.weight", shape: &[4, 8], delta: [[-0.06801267399937039, -0.0552538361327214, -0.018804539329591488, 0.0723133697412418], [-0.0715601208462906, -0.17216466933815974, -0.0913136325928744, 0.18546022176664512]], sums: [[0.03586810540954191, 1.6466474854636255, 0.09699196489113276], [-0.09840865731948834, 3.4357441629544505, 0.45369667358069354]] },
    RefParam { name: "layers.3.o.weight", shape: &[8, 8], delta: [[-0.07168647910960071, -0.03718081664551963, 0.06744309780906144, -0.06713667055566286], [-0.09401498487513694, -0.1304101448493024, 0.15987031614126085, -0.20213228837696728]], sums: [[0.3291162092239557, 3.2879835401427666, 0.1986365314931119], [0.19516412436595518, 7.030647776104972, 0.993757124554348]] },
    RefParam { name: "layers.3.q.weight", shape: &[8, 8], delta: [[-0.07481256897398361, -0.04915637464143151, 0.061887880081668734, -0.065671689625931], [-0.1143762044596133, -0.1578255920361776, 0.1370964779699117, -0.06306876926201199]], sums: [[0.013019373037773035, 3.1994677308295767, 0.19322645885080297], [-0.5348515495265926, 7.040276859088991, 0.9920721630508119]] },
    RefParam { name: "layers.3.up.weight", shape: &[16, 8], delta: [[-0.07752570442695114, 0.05472047514640008, -0.05757671332971859, -0.03874007677577462], [-0.1325990221662925, 0.10749346566950832, -0.1781498561002672, -0.1329268703209076]], sums: [[-0.38470644863988196, 6.947040539911553, 0.4348470268640846], [-1.8135622130198485, 16.20784223175455, 2.4026461047743988]] },
    RefParam { name: "layers.3.v.weight", shape: &[4, 8], delta: [[0.07277301859455329, -0.0694449024197078, -0.06407620409789364, 0.06117454222875521], [0.1873169479026714, -0.08840631061321186, -0.19420722195827617, 0.1344254113894246]], sums: [[-0.13118527729725532, 1.6975627245558589, 0.10272791597193191], [-0.6358734819789049, 4.1449163107459, 0.6259666797852974]] },
    RefParam { name: "lm_head.weight", shape: &[16, 8], delta: [[0.06967342958219414, 0.030872401504389895, -0.06915240241329301, -0.05781548731041644], [0.17525527745856317, 0.01799776310197556, -0.06728285438139778, -0.17794605467885163]], sums: [[0.23578419467464656, 7.160010053860567, 0.44266254113084497], [0.03612119969446978, 16.506607084853243, 2.4721823741535003]] },
    RefParam { name: "norm.weight", shape: &[8], delta: [[0.06894484560419989, 0.05245951771574264, 0.06962636023869628, 0.07385182626036124], [0.17090511944993736, 0.10091013239178026, 0.17376089083220936, 0.19132152370601363]], sums: [[0.21754975725444858, 0.44336379034998796, 0.027701801133630456], [0.5307561086228455, 1.0564369608593602, 0.15547665312571846]] },
    RefParam { name: "shared.0.down.weight", shape: &[8, 16], delta: [[0.06766851055334461, -0.02129609696396914, -0.07078113839979205, -0.06873573225219046], [0.1611422359776497, -0.09751157168691804, -0.09493838128549714, -0.0687716976493653]], sums: [[-0.4926977202934705, 7.330488800233838, 0.45448763546456733], [-1.3287080228617598, 15.831334544213302, 2.3020114617106557]] },
    RefParam { name: "shared.0.gate.weight", shape: &[16, 8], delta: [[0.062257355963682814, -0.03917884524333373, -0.07376242732572938, -0.07270446201893577], [0.138993716584364, -0.13575622254886494, -0.11461012834420423, -0.09207286172718843]], sums: [[-0.556714117767434, 7.228997436809079, 0.4544927639760518], [-1.262040824773548, 15.331645389413671, 2.2067290524091128]] },
    RefParam { name: "shared.0.k.weight", shape: &[4, 8], delta: [[0.05530931885261656, 0.06821521485753301, 0.07669268465347968, -0.023210138525223245], [0.1102956549560735, 0.16696895922540167, 0.2005176494745325, -0.10166241260692316]], sums: [[-0.12544813785463077, 1.8795856252545389, 0.12078112497690996], [0.03529327634313689, 3.8227272564925396, 0.5470735212435778]] },
    RefParam { name: "shared.0.o.weight", shape: &[8, 8], delta: [[0.04594616664228915, 0.07386629884375284, -0.059260457634794206, 0.0588457750732993], [0.07230952309972766, 0.1896325765530827, -0.18280384111682157, 0.12972404400464954]], sums: [[-0.6777379664593391, 3.685318616038117, 0.2365610029457072], [-1.1712059314299255, 7.6586498297119725, 1.0656927610786588]] },
    RefParam { name: "shared.0.q.weight", shape: &[8, 8], delta: [[0.032463090923684775, 0.07059145660959487, -0.05957606296088097, 0.052140013488254644], [0.023199442635319943, 0.17681251835114425, -0.18065256765001636, 0.1020360003926798]], sums: [[-0.37456272813748, 3.704663006547199, 0.23843068365358008], [-0.7444319918108666, 8.002601076739454, 1.1732442141923696]] },
    RefParam { name: "shared.0.up.weight", shape: &[16, 8], delta: [[0.011057020015877439, -0.06457034214071794, 0.06668470193877571, 0.0745467126744869], [-0.034362120800077445, -0.054671337956735844, 0.16145039632655206, 0.19108032578723436]], sums: [[0.32077499789809927, 6.900925526090542, 0.4342832332331862], [0.26006430803083935, 15.479837447512608, 2.2817320513981763]] },
    RefParam { name: "shared.0.v.weight", shape: &[4, 8], delta: [[-0.01897670991875401, 0.04143891459139215, 0.06201445290110952, -0.06023002862311633], [-0.09311057846602126, 0.05787443787713742, 0.14232611368829945, -0.1824138065920159]], sums: [[0.44373058075420335, 1.7964216192351712, 0.11438751058042199], [0.9464008264734546, 4.244572991287091, 0.6526964839597542]] },
    RefParam { name: "shared.1.down.weight", shape: &[8, 16], delta: [[-0.03786808394657007, -0.07207832125756702, 0.05618226844150992, 0.06713746433463247], [-0.1330881831960093, -0.09985672156853964, 0.11856538052183396, 0.1616966590891309]], sums: [[0.4049220017647985, 7.193999841266483, 0.4456618108935726], [0.4354132954293554, 16.705207108725318, 2.4900171745344166]] },
    RefParam { name: "shared.1.gate.weight", shape: &[16, 8], delta: [[-0.05010534046293358, -0.07501939628475103, 0.04858193326611515, 0.062224004448724085], [-0.1610101064036161, -0.11932572544430464, 0.08720636217637756, 0.14171829270108563]], sums: [[0.48162526402374733, 7.2971370854052555, 0.4526653845089263], [0.6516759138039807, 16.632387467434633, 2.4822657852471397]] },
    RefParam { name: "shared.1.k.weight", shape: &[4, 8], delta: [[-0.05876186757391694, -0.018636690085186036, 0.04386977364585229, -0.07255273681162622], [-0.18175614557077646, -0.08998939034482398, 0.062371112872072615, -0.10210809962692718]], sums: [[0.33542629402089874, 1.8243173786984783, 0.11165906582222473], [0.5718793223076539, 4.025446547409542, 0.5944684125602185]] },
    RefParam { name: "shared.1.o.weight", shape: &[8, 8], delta: [[-0.059264843930752154, 0.028170157586707018, 0.07250561998628208, -0.046932470377713864], [-0.18001673884558805, 0.009721359230455973, 0.1854222048585702, -0.1524290832270973]], sums: [[0.16737073268869396, 3.5893485788981407, 0.22198276650443902], [0.11465899718047975, 7.621954538104078, 1.0742272224039633]] },
    RefParam { name: "shared.1.q.weight", shape: &[8, 8], delta: [[-0.06438469716064493, 0.0020320596391315837, 0.06920142134146196, -0.05595835451450023], [-0.05286769783094164, -0.05041892106974841, 0.1724748668939166, -0.17394120132889593]], sums: [[0.3915898131532065, 3.468776599508362, 0.21304301494717331], [0.7296050923003052, 7.252260893351768, 0.996372341390072]] },
    RefParam { name: "shared.1.up.weight", shape: &[16, 8], delta: [[-0.06855429901216212, 0.0652869631864636, -0.024119842650307033, 0.01919809028074687], [-0.07665550784175545, 0.15686928150819313, -0.10186351086832973, -0.016152970190388027]], sums: [[-0.12880991671362324, 6.955547233105078, 0.42860423795021396], [-0.06564109310358712, 14.261198311822142, 1.943656354413545]] },
    RefParam { name: "shared.1.v.weight", shape: &[4, 8], delta: [[-0.07204527546357972, -0.06324726114652388, -0.040654160978124215, 0.06869241392347103], [-0.09849423709355426, -0.19164047522335284, -0.13774748288618857, 0.1706934136783685]], sums: [[-0.06873895230840166, 1.630768688838252, 0.0965054779895393], [-0.3912616683599245, 3.4756657957174375, 0.468588502612714]] },
];
