//! The fused training path (`Ops::Fused`: packed q/k/v matmul + `attention_qkv` with RoPE,
//! packed gate/up + `swiglu_packed`, RMSNorm, the LORS merge, and the LM head fused with the
//! loss in `linear_cross_entropy`) against central finite differences in f64: the gradient of
//! `Model::forward_loss`, the loss the Trainer minimises, w.r.t. every parameter tensor.
//!
//! T = 150 > QBLOCK = 64 (src/kernels), so the attention runs three query blocks, the last one
//! partial; GQA (4 heads over 2 kv heads); LORS with 2 groups and α scaling; private factors
//! off zero (B = 0, as at the paper's init, would make A's gradient exactly zero).
//! tests/ops.rs checks each kernel alone on small shapes; this checks them composed, at a
//! length where the blocking matters.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use lors_lm::config::{Config, Mode, PrivateInit};
use lors_lm::model::{Model, Ops, ParamStore};
use lors_lm::rng::Rng;

const T: usize = 150;
const VOCAB: usize = 40;

/// (a) tied head, 3 layers in 2 groups; (b) untied head, 4 layers: 0-2 in 2 groups, layer 3
/// private (full weights).
fn config(tied: bool) -> Config {
    let mut c = Config::tiny();
    let m = &mut c.model;
    (m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.max_seq_len) = (VOCAB, 16, 4, 2, 24, 160);
    m.tie_embeddings = tied;
    m.n_layers = if tied { 3 } else { 4 };
    c.lors.mode = Mode::Lors;
    c.lors.rank = 3;
    c.lors.groups = 2;
    c.lors.alpha = Some(6.0); // residual scale α/r = 2
    c.lors.init = PrivateInit::Small;
    if !tied {
        c.lors.private_layers = vec![3];
    }
    c
}

fn ids(rng: &mut Rng, b: usize, t: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(VOCAB as u64) as u32).collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

/// The model in f64 on the given ops, with weights from `seed`, moved away from the init so
/// that every gradient is sizeable: matrices ×5 (N(0, 0.1²)), private B factors ×25 (the
/// residual B·A then is about as large as its base; A's gradient is Bᵀ·dW), gains 1 + N(0, 0.1²).
fn build(cfg: &Config, seed: u64, ops: Ops) -> Result<(Model, ParamStore)> {
    let mut store = ParamStore::new_init(seed, DType::F64, &Device::Cpu);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)?.with_ops(ops)?;
    let mut rng = Rng::new(seed ^ 0xABCD);
    for (name, var) in store.vars() {
        let t = var.as_tensor();
        let new = if name.ends_with("norm.weight") {
            let noise: Vec<f64> = (0..t.elem_count()).map(|_| 0.1 * rng.normal()).collect();
            (t + Tensor::from_vec(noise, t.shape(), &Device::Cpu)?)?
        } else {
            (t * if name.ends_with("lors_b") { 25.0 } else { 5.0 })?
        };
        var.set(&new)?;
    }
    Ok((model, store))
}

fn grads_of(model: &Model, vars: &[(String, Var)], x: &Tensor, y: &Tensor) -> Result<Vec<Vec<f64>>> {
    let g = model.forward_loss(x, y)?.backward()?;
    vars.iter()
        .map(|(name, v)| {
            let g = g.get(v.as_tensor()).ok_or_else(|| anyhow::anyhow!("{name} received no gradient"))?;
            Ok(g.flatten_all()?.to_vec1()?)
        })
        .collect()
}

/// Finite differences: the five-point central stencil
/// f'(x) ≈ (8 (f(x+h) − f(x−h)) − (f(x+2h) − f(x−2h))) / 12h, whose truncation error is
/// O(h⁴). The two-point one (O(h²)) was measured off by 5e-7 relative on the private A factors
/// (large third derivatives through B·A with B ~ 0.5), too close to a useful tolerance. With
/// h = 1e-4 and a loss of ~4 computed in f64, rounding contributes ~1e-16·4/h ≈ 4e-12 per
/// evaluation, a few 1e-11 in all. Measured over both configs: at most 3.3e-11 absolute on
/// small entries and 2.3e-8 relative on large ones, so ATOL = 3e-10 plus RTOL = 3e-7 leaves a
/// margin of ~10, while an error in a backward pass shows up at 1e-3 relative or more.
const H: f64 = 1e-4;
const RTOL: f64 = 3e-7;
const ATOL: f64 = 3e-10;

/// For every parameter tensor: the entry with the largest autodiff gradient and two random
/// entries, autodiff (fused backward) vs central differences of the fused forward.
#[test]
fn fused_training_path_gradients_match_f64_finite_differences() -> Result<()> {
    for tied in [true, false] {
        let cfg = config(tied);
        let (model, store) = build(&cfg, 3, Ops::Fused)?;
        assert_eq!(model.ops(), Ops::Fused);
        let mut rng = Rng::new(17);
        let (x, y) = (ids(&mut rng, 2, T)?, ids(&mut rng, 2, T)?);
        let vars = store.vars();
        // Every kind of parameter is here (and so checked).
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        let has = |pat: &str| names.iter().any(|n| n.contains(pat));
        for pat in ["embed.weight", "attn_norm", "ffn_norm", "norm.weight", "shared.1.", "lors_a", "lors_b"] {
            assert!(has(pat), "no parameter {pat}");
        }
        for p in ["q", "k", "v", "o", "gate", "up", "down"] {
            assert!(has(&format!("shared.0.{p}.weight")) && has(&format!(".{p}.lors_a")), "projection {p}");
        }
        assert_eq!(has("lm_head.weight"), !tied);
        assert_eq!(has("layers.3.q.weight"), !tied);

        let grads = grads_of(&model, &vars, &x, &y)?;
        let loss_at = || -> Result<f64> { Ok(model.forward_loss(&x, &y)?.to_scalar::<f64>()?) };
        let (mut worst, mut smallest) = (0.0f64, f64::MAX);
        for ((name, var), g) in vars.iter().zip(&grads) {
            let base: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
            let largest = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap_or(0);
            let picks = [largest, rng.below(g.len() as u64) as usize, rng.below(g.len() as u64) as usize];
            for i in picks {
                let at = |delta: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                    loss_at()
                };
                let fd = (8.0 * (at(H)? - at(-H)?) - (at(2.0 * H)? - at(-2.0 * H)?)) / (12.0 * H);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
                let err = (fd - g[i]).abs();
                let tol = ATOL + RTOL * fd.abs().max(g[i].abs());
                assert!(
                    err <= tol,
                    "tied={tied}: {name}[{i}]: finite difference {fd} vs fused backward {} (err {err:.2e})",
                    g[i]
                );
                worst = worst.max(err / tol);
            }
            assert!(
                g[largest].abs() >= 1e-4,
                "tied={tied}: {name}: largest gradient {} is too small to test",
                g[largest]
            );
            smallest = smallest.min(g[largest].abs());
        }
        eprintln!(
            "tied={tied}: {} tensors, worst error {worst:.2e} of the tolerance, smallest largest entry {smallest:.2e}",
            vars.len()
        );
    }
    Ok(())
}

/// Every entry of every gradient: the fused path against the plain candle composition
/// (`Ops::Plain`, independent code), both f64 on the same weights. The two differ only by
/// summation order: 1e-10 of the tensor's largest entry is ~1e5 ulps of room, while a
/// wrong entry anywhere (a missed query block, a mis-indexed head) would be off by O(1).
#[test]
fn fused_training_path_gradients_equal_the_plain_path_on_every_entry() -> Result<()> {
    for tied in [true, false] {
        let cfg = config(tied);
        let (fused, store) = build(&cfg, 5, Ops::Fused)?;
        // The same weights in a second model on the plain ops.
        let mut store_plain = ParamStore::from_tensors(store.tensors(), DType::F64, &Device::Cpu);
        let plain = Model::new(&cfg.model, &cfg.lors, &mut store_plain)?.with_ops(Ops::Plain)?;
        let mut rng = Rng::new(23);
        let (x, y) = (ids(&mut rng, 2, T)?, ids(&mut rng, 2, T)?);
        let lf = fused.forward_loss(&x, &y)?.to_scalar::<f64>()?;
        let lp = plain.forward_loss(&x, &y)?.to_scalar::<f64>()?;
        assert!((lf - lp).abs() < 1e-12 * lp.abs(), "loss fused {lf} vs plain {lp}");
        let gf = grads_of(&fused, &store.vars(), &x, &y)?;
        let gp = grads_of(&plain, &store_plain.vars(), &x, &y)?;
        let mut worst = 0.0f64;
        for (((name, _), a), b) in store.vars().iter().zip(&gf).zip(&gp) {
            let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: zero gradient");
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                let err = (a - b).abs() / scale;
                assert!(
                    err <= 1e-10,
                    "tied={tied}: {name}[{i}]: fused {a} vs plain {b} (err {err:.2e} of the largest)"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("tied={tied}: fused vs plain gradients, worst {worst:.2e} of each tensor's largest entry");
    }
    Ok(())
}
