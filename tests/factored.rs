//! LORS-native inference (`Model::factored`): the same logits and greedy text as the merged
//! model for every kind of sharing, the unique parameters only in memory, and the
//! `--weights` choice of `generate` and `eval`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lors_lm::config::{Config, Mode, Proj};
use lors_lm::infer::generate::{generate_tokens, Sampler};
use lors_lm::model::{Model, Ops, ParamCounts, ParamStore, Weights};
use lors_lm::rng::Rng;

const VOCAB: usize = 50;

fn tiny(mode: Mode) -> Config {
    let mut c = Config::tiny();
    c.model.vocab_size = VOCAB;
    c.lors.mode = mode;
    c
}

/// The model of `cfg` with random weights, its private factors large enough that a misplaced
/// low-rank term changes the logits well beyond float noise.
fn build(cfg: &Config, seed: u64) -> Result<Model> {
    let mut store = ParamStore::new_init(seed, DType::F32, &Device::Cpu);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)?;
    let mut rng = Rng::new(seed + 100);
    for (name, var) in store.vars() {
        if name.ends_with("lors_a") || name.ends_with("lors_b") {
            let v: Vec<f32> = (0..var.elem_count()).map(|_| (rng.normal() * 0.3) as f32).collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
    }
    Ok(model)
}

fn ids(rng: &mut Rng, b: usize, t: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(VOCAB as u64) as u32).collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Every kind of sharing the factored form has to handle, by name.
fn variants() -> Vec<(&'static str, Config)> {
    let mut out = vec![("lors", tiny(Mode::Lors)), ("shared", tiny(Mode::Shared)), ("vanilla", tiny(Mode::Vanilla))];
    let mut c = tiny(Mode::Lors);
    c.model.n_layers = 5;
    c.lors.groups = 2;
    out.push(("lors, 2 groups", c));
    let mut c = tiny(Mode::Lors);
    c.model.n_layers = 5;
    c.lors.group_size = Some(2);
    c.lors.private_layers = vec![0, 4];
    c.model.tie_embeddings = false;
    out.push(("lors, group_size 2, private first and last layers, untied head", c));
    let mut c = tiny(Mode::Lors);
    c.lors.targets = vec![Proj::Q, Proj::V, Proj::Up, Proj::Down];
    c.lors.alpha = Some(8.0);
    c.lors.attn_rank_schedule = Some(vec![2, 3, 4]);
    out.push(("lors, partial targets (k, o, gate private), alpha, rank schedule", c));
    let mut c = tiny(Mode::Shared);
    c.model.n_kv_heads = 1;
    c.lors.targets = vec![Proj::K, Proj::O, Proj::Gate];
    out.push(("shared, partial targets, one kv head", c));
    out
}

/// The logits of a prompt (prefill, matmul path) and then of single tokens decoded one by one
/// with the KV cache (matvec path), batch b: (B, T, V).
fn prefill_then_decode(model: &Model, x: &Tensor, prompt: usize) -> Result<Tensor> {
    let mut cache = model.new_cache();
    let mut steps = vec![model.forward_at(&x.narrow(1, 0, prompt)?, 0, Some(&mut cache))?];
    for p in prompt..x.dim(1)? {
        steps.push(model.forward_at(&x.narrow(1, p, 1)?, p, Some(&mut cache))?);
    }
    Ok(Tensor::cat(&steps, 1)?)
}

#[test]
fn factored_logits_equal_merged_logits_for_every_kind_of_sharing() -> Result<()> {
    for (i, (name, cfg)) in variants().into_iter().enumerate() {
        cfg.validate()?;
        let model = build(&cfg, 10 + i as u64)?;
        let (merged, factored) = (model.merged()?, model.factored()?);
        assert_eq!(factored.weights(), Some(Weights::Factored));
        let mut rng = Rng::new(3 + i as u64);
        for (b, t, prompt) in [(1, 24, 20), (3, 12, 5)] {
            let x = ids(&mut rng, b, t)?;
            let full = model.forward(&x)?; // the trainable model, no cache
            let scale = full.abs()?.max_all()?.to_scalar::<f32>()?;
            for (what, m) in [("merged", &merged), ("factored", &factored)] {
                let got = prefill_then_decode(m, &x, prompt)?;
                let err = max_abs_diff(&full, &got)?;
                assert!(err < 1e-4 * scale.max(1.0), "{name}, {what}, batch {b}: max |Δlogit| {err} (scale {scale})");
            }
            let plain = factored.clone().with_ops(Ops::Plain)?;
            let err = max_abs_diff(&full, &prefill_then_decode(&plain, &x, prompt)?)?;
            assert!(err < 1e-4 * scale.max(1.0), "{name}, factored with plain ops: {err}");
        }
    }
    Ok(())
}

#[test]
fn the_private_factors_move_the_logits_so_the_equality_above_can_fail() -> Result<()> {
    let cfg = tiny(Mode::Lors);
    let x = ids(&mut Rng::new(1), 1, 8)?;
    let with = build(&cfg, 1)?.factored()?.forward(&x)?;
    // The same seed without `build`'s perturbation: B = 0, every layer equal to its base.
    let mut store = ParamStore::new_init(1, DType::F32, &Device::Cpu);
    let without = Model::new(&cfg.model, &cfg.lors, &mut store)?.factored()?.forward(&x)?;
    assert!(max_abs_diff(&with, &without)? > 1e-2, "the private factors should change the logits");
    Ok(())
}

#[test]
fn greedy_generation_is_identical_merged_and_factored() -> Result<()> {
    for (name, cfg) in variants() {
        let model = build(&cfg, 4)?;
        let gen = |m: &Model| -> Result<Vec<u32>> {
            let mut s = Sampler::new(0.0, None, None, 0)?;
            // Past max_seq_len (32): the window slides and the cache is rebuilt.
            generate_tokens(m, &[3, 1, 4, 1, 5], 40, &mut s, &[], |_| Ok(()), || {})
        };
        assert_eq!(gen(&model.merged()?)?, gen(&model.factored()?)?, "{name}");
    }
    Ok(())
}

#[test]
fn factored_holds_exactly_the_unique_parameters() -> Result<()> {
    for (name, cfg) in variants() {
        let model = build(&cfg, 5)?;
        let counts = ParamCounts::new(&cfg.model, &cfg.lors);
        let f = model.weight_bytes(Weights::Factored);
        assert_eq!(f.distinct, 4 * counts.total() as u64, "{name}: factored distinct bytes vs unique parameters");
        let m = model.weight_bytes(Weights::Merged);
        assert!(f.read >= m.read, "{name}: factored reads the bases plus the factors");
        if cfg.lors.mode == Mode::Vanilla {
            assert_eq!((f.distinct, f.read), (m.distinct, m.read), "{name}: nothing to share");
        } else {
            assert!(f.distinct < m.distinct, "{name}: factored keeps fewer bytes than merged");
        }
    }
    Ok(())
}

#[test]
fn a_detached_model_cannot_be_detached_again() -> Result<()> {
    let model = build(&tiny(Mode::Lors), 6)?;
    let Err(err) = model.factored()?.merged() else { panic!("merging a factored model should fail") };
    let err = err.to_string();
    assert!(err.contains("already detached"), "{err}");
    Ok(())
}
