//! The LORS recipe knobs of `[lors]`: each reaches exactly the tensors it should.
//! - private_lr_mult / private_b_lr_mult / private_weight_decay: one AdamW step with known
//!   gradients moves every parameter by exactly its own lr and decay;
//! - init: "paper" and "small" produce the stated statistics;
//! - alpha: the effective weight is W + (alpha/r)·B A, in training and in the export.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lors_lm::config::{Config, Mode, PrivateInit, Proj};
use lors_lm::model::Model;
use lors_lm::model::ParamStore;
use lors_lm::train::optim::AdamW;
use std::collections::HashMap;

fn cfg(sets: &[&str]) -> Config {
    let base = "[model]\nvocab_size = 64\nd_model = 64\nn_layers = 3\nn_heads = 4\nffn_hidden = 96\nmax_seq_len = 16\n\
                [lors]\nmode = \"lors\"\nrank = 8\n[train]\nseq_len = 16\n";
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::from_toml_str(base, &sets, "test").unwrap()
}

fn build(cfg: &Config) -> Result<(Model, ParamStore)> {
    let mut store = ParamStore::new_init(cfg.train.seed, DType::F32, &Device::Cpu);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)?;
    Ok((model, store))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn lr_multipliers_and_weight_decay_reach_exactly_their_tensors() -> Result<()> {
    let c = cfg(&[
        "train.weight_decay=0.1",
        "lors.private_lr_mult=3.0",
        "lors.private_b_lr_mult=5.0",
        "lors.private_weight_decay=0.5",
    ]);
    let (_, store) = build(&c)?;
    let vars = store.vars();
    let before: HashMap<String, Vec<f32>> = vars.iter().map(|(n, v)| (n.clone(), values(v.as_tensor()))).collect();
    let mut opt = AdamW::from_config(store.vars_with_roles(), &c)?;
    // All-ones gradients: after one step m̂ = v̂ = 1, so the update is lr_i / (1 + eps) and
    // p ← p·(1 − lr_i·wd_i) − lr_i/(1 + eps).
    let grads: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().ones_like()).collect::<candle_core::Result<_>>()?;
    let lr = 0.01;
    opt.step(&grads, lr)?;
    let mut seen = HashMap::new();
    for (name, var) in &vars {
        let (lr_i, wd_i, kind) = if name.ends_with(".lors_a") {
            (3.0 * lr, 0.5, "A")
        } else if name.ends_with(".lors_b") {
            (5.0 * lr, 0.5, "B")
        } else if var.rank() >= 2 {
            (lr, 0.1, "matrix")
        } else {
            (lr, 0.0, "gain")
        };
        *seen.entry(kind).or_insert(0) += 1;
        for (p0, p1) in before[name].iter().zip(values(var.as_tensor())) {
            let want = (*p0 as f64) * (1.0 - lr_i * wd_i) - lr_i / (1.0 + 1e-8);
            assert!((p1 as f64 - want).abs() < 1e-6, "{name} ({kind}): {p1} vs {want}");
        }
    }
    // 7 projections × 3 layers of each factor; shared bases + embedding; 2 gains × 3 + final.
    assert_eq!(seen["A"], 21);
    assert_eq!(seen["B"], 21);
    assert_eq!(seen["matrix"], 8);
    assert_eq!(seen["gain"], 7);

    // Defaults are the paper's: private factors like every other matrix.
    let c = cfg(&["train.weight_decay=0.1"]);
    let (_, store) = build(&c)?;
    let opt = AdamW::from_config(store.vars_with_roles(), &c)?;
    for (i, (name, var)) in store.vars().iter().enumerate() {
        let o = opt.options(i);
        assert_eq!(o.lr_mult, 1.0, "{name}");
        assert_eq!(o.weight_decay, if var.rank() >= 2 { 0.1 } else { 0.0 }, "{name}");
    }
    Ok(())
}

fn stats(v: &[f32]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let max = v.iter().map(|&x| (x as f64).abs()).fold(0.0, f64::max);
    (mean, var.sqrt(), max)
}

/// All A (or B) values of the model, pooled, with the `in` width of each A.
fn factors(store: &ParamStore, suffix: &str) -> Vec<(String, Vec<f32>, usize)> {
    store
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with(suffix))
        .map(|(n, t)| {
            let cols = t.dims()[1];
            (n, values(&t), cols)
        })
        .collect()
}

#[test]
fn private_init_has_the_stated_statistics() -> Result<()> {
    // paper: A ~ U(±1/√in) (std = bound/√3), B = 0, so every layer equals its shared base.
    let c = cfg(&[]);
    assert_eq!(c.lors.init, PrivateInit::Paper);
    let (model, store) = build(&c)?;
    for (name, v, inp) in factors(&store, ".lors_a") {
        let bound = 1.0 / (inp as f64).sqrt();
        let (mean, std, max) = stats(&v);
        assert!(max <= bound, "{name}: |a| {max} > {bound}");
        assert!(mean.abs() < 0.1 * bound, "{name}: mean {mean}");
        assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.1, "{name}: std {std} vs {}", bound / 3f64.sqrt());
    }
    for (name, v, _) in factors(&store, ".lors_b") {
        assert!(v.iter().all(|&x| x == 0.0), "{name} is not zero");
    }
    let (w0, w1) = (model.effective_weight(0, Proj::Q)?, model.effective_weight(1, Proj::Q)?);
    assert_eq!(values(&w0), values(&w1), "paper init: layers start equal");

    // small: A and B both N(0, 0.02²); layers differ from step 0.
    let c = cfg(&["lors.init=\"small\""]);
    let (model, store) = build(&c)?;
    for suffix in [".lors_a", ".lors_b"] {
        let pooled: Vec<f32> = factors(&store, suffix).into_iter().flat_map(|(_, v, _)| v).collect();
        let (mean, std, _) = stats(&pooled);
        assert!(pooled.len() > 10_000, "{}", pooled.len());
        assert!(mean.abs() < 0.001, "{suffix}: mean {mean}"); // 5 standard errors
        assert!((std / 0.02 - 1.0).abs() < 0.03, "{suffix}: std {std}");
    }
    let (w0, w1) = (model.effective_weight(0, Proj::Q)?, model.effective_weight(1, Proj::Q)?);
    let diff = (w0 - w1)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 1e-4, "small init: layers differ at step 0 ({diff})");
    Ok(())
}

#[test]
fn alpha_scales_the_residual_in_training_and_export() -> Result<()> {
    // rank 8, alpha 32: W_l = W + 4·B A. Use small init so B A is non-zero.
    for (alpha, scale) in [(None, 1.0), (Some(32.0), 4.0), (Some(2.0), 0.25)] {
        let mut sets = vec!["lors.init=\"small\"".to_string()];
        if let Some(a) = alpha {
            sets.push(format!("lors.alpha={a:?}"));
        }
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let c = cfg(&sets);
        let (model, store) = build(&c)?;
        let t = store.tensors();
        let w = &t["shared.0.up.weight"];
        let (a, b) = (&t["layers.2.up.lors_a"], &t["layers.2.up.lors_b"]);
        let want = (w + (b.matmul(a)? * scale)?)?;
        let got = model.effective_weight(2, Proj::Up)?;
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-7, "alpha {alpha:?}: effective weight off by {err}");
        let exported: HashMap<String, Tensor> = lors_lm::formats::hf::hf_tensors(&model)?.into_iter().collect();
        let err = (&exported["model.layers.2.mlp.up_proj.weight"] - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-7, "alpha {alpha:?}: exported weight off by {err}");
        // The training forward uses the same weight as the merged (export) model.
        let x = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu)?;
        let d = (model.forward(&x)? - model.merged()?.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "alpha {alpha:?}: training vs merged forward differ by {d}");
    }
    Ok(())
}

#[test]
fn bad_recipe_values_are_refused_naming_the_key() {
    for (set, key) in [
        ("lors.private_lr_mult=0", "lors.private_lr_mult"),
        ("lors.private_b_lr_mult=-1.0", "lors.private_b_lr_mult"),
        ("lors.private_weight_decay=-0.1", "lors.private_weight_decay"),
        ("lors.alpha=0.0", "lors.alpha"),
        ("lors.init=\"kaiming\"", "kaiming"),
    ] {
        let base = "[lors]\nmode = \"lors\"\n";
        let err = Config::from_toml_str(base, &[set.to_string()], "test").unwrap_err();
        assert!(format!("{err:#}").contains(key), "{set}: {err:#}");
    }
    // The knobs mean nothing without a private term, but are harmless there.
    let c = Config::from_toml_str("[lors]\nmode = \"shared\"\nprivate_lr_mult = 2.0\n", &[], "test").unwrap();
    assert_eq!(c.lors.mode, Mode::Shared);
}
