//! Model-level tests on CPU with tiny configs: parameter counts, the LORS layer, gradients
//! (finite differences in f64), overfitting, checkpoints and generation.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use lors_lm::config::{Config, Mode, Proj};
use lors_lm::infer::generate::{generate_tokens, Sampler};
use lors_lm::model::LorsLinear;
use lors_lm::model::ParamCounts;
use lors_lm::model::ParamStore;
use lors_lm::model::{Model, Ops};
use lors_lm::rng::Rng;
use lors_lm::train::checkpoint::Contents;
use lors_lm::train::optim::AdamW;
use lors_lm::train::run_dir::load_model;
use lors_lm::train::{RunDir, TrainState};

fn tiny(mode: Mode) -> Config {
    let mut c = Config::tiny();
    c.model.vocab_size = 50;
    c.lors.mode = mode;
    c
}

fn build(cfg: &Config, dtype: DType, seed: u64) -> Result<(Model, ParamStore)> {
    let mut store = ParamStore::new_init(seed, dtype, &Device::Cpu);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)?;
    Ok((model, store))
}

fn rand_tensor(rng: &mut Rng, shape: &[usize], scale: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() * scale).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn ids(rng: &mut Rng, b: usize, t: usize, vocab: u64) -> Result<Tensor> {
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(vocab) as u32).collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

// ---------------------------------------------------------------- parameter counts

/// Closed forms for the tiny config: V=50, d=32, L=3, H=4, Hkv=2 (kv dim 16), ffn=64, r=4.
#[test]
fn param_counts_match_closed_forms_and_the_built_model() -> Result<()> {
    let (v, d, l, kv, f, r) = (50usize, 32usize, 3usize, 16usize, 64usize, 4usize);
    // Per-block weights: q,o: d·d; k,v: kv·d; gate,up: f·d; down: d·f.
    let block = 2 * d * d + 2 * kv * d + 3 * f * d;
    // LORS factors per layer: r·(in+out) summed over the seven projections.
    let lors = r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3);
    let norm = 2 * d * l + d;
    let embed = v * d;
    let vanilla = embed + l * block + norm;

    for (mode, groups, shared, private) in [
        (Mode::Vanilla, 1, 0, l * block),
        (Mode::Shared, 1, block, 0),
        (Mode::Lors, 1, block, l * lors),
        (Mode::Lors, 3, 3 * block, l * lors),
    ] {
        let mut cfg = tiny(mode);
        cfg.lors.groups = groups;
        let c = ParamCounts::new(&cfg.model, &cfg.lors);
        assert_eq!((c.embedding, c.shared, c.private, c.norm, c.head), (embed, shared, private, norm, 0), "{mode:?}");
        assert_eq!(c.vanilla_total, vanilla);
        assert_eq!(c.total(), embed + shared + private + norm);
        let (_, store) = build(&cfg, DType::F32, 0)?;
        assert_eq!(store.num_params(), c.total(), "{mode:?} groups={groups}: built model differs from the formula");
    }

    // Untied head, a per-layer schedule and partial targets.
    let mut cfg = tiny(Mode::Lors);
    cfg.model.tie_embeddings = false;
    cfg.lors.attn_rank_schedule = Some(vec![2, 4, 6]);
    cfg.lors.ffn_rank = Some(8);
    cfg.lors.targets = vec![Proj::Q, Proj::Up];
    let c = ParamCounts::new(&cfg.model, &cfg.lors);
    let shared = d * d + f * d;
    let private = (2 + 4 + 6) * (d + d) + l * 8 * (d + f) // LORS factors of q and up
        + l * (2 * kv * d + d * d + f * d + d * f); // private k, v, o, gate, down
    assert_eq!((c.shared, c.private, c.head), (shared, private, v * d));
    let (_, store) = build(&cfg, DType::F32, 0)?;
    assert_eq!(store.num_params(), c.total());
    assert!((c.reduction_pct() - 100.0 * (1.0 - c.total() as f64 / c.vanilla_total as f64)).abs() < 1e-12);
    Ok(())
}

// ---------------------------------------------------------------- the LORS layer

#[test]
fn lors_layer_computes_x_times_w_plus_ba_transposed() -> Result<()> {
    let mut rng = Rng::new(3);
    let (out, inp, r) = (6, 5, 2);
    let w = rand_tensor(&mut rng, &[out, inp], 1.0, DType::F64)?;
    let a = rand_tensor(&mut rng, &[r, inp], 1.0, DType::F64)?;
    let b = rand_tensor(&mut rng, &[out, r], 1.0, DType::F64)?;
    let x = rand_tensor(&mut rng, &[2, 3, inp], 1.0, DType::F64)?;
    let layer = LorsLinear::from_parts(w.clone(), Some((a.clone(), b.clone())));
    // Reference by explicit loops: y[n, o] = sum_i x[n, i] (W[o, i] + sum_k B[o, k] A[k, i]).
    type Mat = Vec<Vec<f64>>;
    let (wv, av, bv): (Mat, Mat, Mat) = (w.to_vec2()?, a.to_vec2()?, b.to_vec2()?);
    let xv: Vec<Vec<f64>> = x.reshape((6, inp))?.to_vec2()?;
    let mut want = vec![];
    for row in &xv {
        for o in 0..out {
            let mut s = 0.0;
            for i in 0..inp {
                let ba: f64 = (0..r).map(|k| bv[o][k] * av[k][i]).sum();
                s += row[i] * (wv[o][i] + ba);
            }
            want.push(s);
        }
    }
    let want = Tensor::from_vec(want, (2, 3, out), &Device::Cpu)?;
    assert!(max_abs_diff(&layer.forward(&x)?, &want)? < 1e-12);
    assert!(max_abs_diff(&layer.forward_factored(&x)?, &want)? < 1e-12);
    assert!(max_abs_diff(&layer.merged()?.forward(&x)?, &want)? < 1e-12);
    Ok(())
}

#[test]
fn at_init_every_layer_of_a_group_has_the_same_effective_weights() -> Result<()> {
    let mut cfg = tiny(Mode::Lors);
    cfg.model.n_layers = 4;
    cfg.lors.groups = 2;
    let (model, store) = build(&cfg, DType::F32, 1)?;
    for p in Proj::ALL {
        let w: Vec<Tensor> = (0..4).map(|l| model.effective_weight(l, p)).collect::<Result<_>>()?;
        assert_eq!(max_abs_diff(&w[0], &w[1])?, 0.0, "{p}: layers 0 and 1 differ at init");
        assert_eq!(max_abs_diff(&w[2], &w[3])?, 0.0, "{p}: layers 2 and 3 differ at init");
        assert!(max_abs_diff(&w[0], &w[2])? > 0.0, "{p}: the two groups should own different bases");
    }
    // A is Kaiming-uniform U(±1/sqrt(in)), B is zero.
    let t = store.tensors();
    let a = &t["layers.1.down.lors_a"];
    let bound = 1.0 / (cfg.model.ffn_hidden as f64).sqrt();
    let amax = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    assert!(amax <= bound && amax > 0.8 * bound, "A bound {amax} vs {bound}");
    assert_eq!(t["layers.1.down.lors_b"].abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    // N(0, 0.02) for bases and embeddings.
    let e = t["embed.weight"].flatten_all()?;
    let std = e.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
    assert!((std - 0.02).abs() < 0.003, "embedding std {std}");
    Ok(())
}

// ---------------------------------------------------------------- gradients

/// Central finite differences on a few entries of each variable vs autodiff, in f64.
fn check_grads(vars: &[(String, Var)], loss_fn: &dyn Fn() -> Result<Tensor>, per_var: usize) -> Result<()> {
    let loss = loss_fn()?;
    let grads = loss.backward()?;
    let mut rng = Rng::new(11);
    let eps = 1e-6;
    for (name, var) in vars {
        let g: Vec<f64> = grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
        let base: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
        for _ in 0..per_var {
            let i = rng.below(base.len() as u64) as usize;
            let eval_at = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                Ok(loss_fn()?.to_scalar::<f64>()?)
            };
            let fd = (eval_at(eps)? - eval_at(-eps)?) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
            let tol = 1e-6 + 1e-5 * fd.abs().max(g[i].abs());
            assert!((fd - g[i]).abs() < tol, "{name}[{i}]: finite difference {fd} vs autodiff {}", g[i]);
        }
    }
    Ok(())
}

#[test]
fn lors_layer_gradients_match_finite_differences() -> Result<()> {
    let mut rng = Rng::new(5);
    let mk =
        |rng: &mut Rng, s: &[usize]| -> Result<Var> { Ok(Var::from_tensor(&rand_tensor(rng, s, 1.0, DType::F64)?)?) };
    let (w, a, b) = (mk(&mut rng, &[4, 3])?, mk(&mut rng, &[2, 3])?, mk(&mut rng, &[4, 2])?);
    let x = rand_tensor(&mut rng, &[5, 3], 1.0, DType::F64)?;
    let layer = LorsLinear::from_parts(w.as_tensor().clone(), Some((a.as_tensor().clone(), b.as_tensor().clone())));
    let vars = vec![("W".to_string(), w), ("A".to_string(), a), ("B".to_string(), b)];
    // A non-linear scalar of the output so every entry matters differently.
    check_grads(&vars, &|| Ok(layer.forward(&x)?.tanh()?.sum_all()?), 6)
}

/// Perturb the private B factors so that A receives non-zero gradients too (with B = 0, as
/// at init, dL/dA = Bᵀ·dL/dW is exactly zero).
fn perturb_b(store: &ParamStore, rng: &mut Rng) -> Result<()> {
    for (name, var) in store.vars() {
        if name.ends_with("lors_b") {
            var.set(&rand_tensor(rng, var.dims(), 0.05, var.dtype())?)?;
        }
    }
    Ok(())
}

#[test]
fn whole_model_gradients_match_finite_differences() -> Result<()> {
    for mode in [Mode::Lors, Mode::Vanilla] {
        let mut cfg = tiny(mode);
        cfg.model.tie_embeddings = mode == Mode::Lors; // cover both head variants
        let (model, store) = build(&cfg, DType::F64, 2)?;
        let mut rng = Rng::new(9);
        perturb_b(&store, &mut rng)?;
        let x = ids(&mut rng, 2, 7, 50)?;
        let y = ids(&mut rng, 2, 7, 50)?;
        check_grads(&store.vars(), &|| Model::loss(&model.forward(&x)?, &y), 2)?;
    }
    Ok(())
}

#[test]
fn every_trainable_tensor_receives_a_nonzero_gradient() -> Result<()> {
    let mut cfg = tiny(Mode::Lors);
    cfg.lors.groups = 2;
    cfg.model.tie_embeddings = false;
    let (model, store) = build(&cfg, DType::F32, 4)?;
    let mut rng = Rng::new(1);
    let (x, y) = (ids(&mut rng, 2, 12, 50)?, ids(&mut rng, 2, 12, 50)?);
    let vars = store.vars();
    let grads_of = |model: &Model| -> Result<Vec<Tensor>> {
        let g = Model::loss(&model.forward(&x)?, &y)?.backward()?;
        vars.iter()
            .map(|(n, v)| g.get(v.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("{n} got no gradient at all")))
            .collect()
    };
    // Step 0: every tensor is in the graph (A's gradient is exactly zero because B = 0).
    let g0 = grads_of(&model)?;
    // One AdamW step moves B off zero; then every gradient must be non-zero.
    let mut opt = AdamW::new(vars.clone(), 0.9, 0.95, 1e-8, 0.1)?;
    opt.step(&g0, 1e-3)?;
    let g1 = grads_of(&model)?;
    for ((name, _), g) in vars.iter().zip(&g1) {
        let n = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n > 0.0, "{name} received a zero gradient: the op that uses it does not backpropagate");
    }
    Ok(())
}

// ---------------------------------------------------------------- training behaviour

fn train_steps(model: &Model, store: &ParamStore, x: &Tensor, y: &Tensor, steps: usize, lr: f64) -> Result<Vec<f64>> {
    let vars = store.vars();
    let mut opt = AdamW::new(vars.clone(), 0.9, 0.95, 1e-8, 0.0)?;
    let mut losses = vec![];
    for _ in 0..steps {
        let loss = Model::loss(&model.forward(x)?, y)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        let g = loss.backward()?;
        let grads: Vec<Tensor> = vars.iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().clone()).collect();
        opt.step(&grads, lr)?;
    }
    Ok(losses)
}

#[test]
fn overfitting_one_batch_drives_the_loss_near_zero_and_greedy_generation_repeats_it() -> Result<()> {
    let mut cfg = tiny(Mode::Lors);
    cfg.model.n_kv_heads = 0;
    let (model, store) = build(&cfg, DType::F32, 7)?;
    let mut rng = Rng::new(21);
    let seq: Vec<u32> = (0..17).map(|_| rng.below(50) as u32).collect();
    let x = Tensor::new(&seq[..16], &Device::Cpu)?.unsqueeze(0)?;
    let y = Tensor::new(&seq[1..], &Device::Cpu)?.unsqueeze(0)?;
    let losses = train_steps(&model, &store, &x, &y, 150, 1e-2)?;
    let last = *losses.last().unwrap();
    assert!(losses[0] > 3.5, "initial loss {} should be near ln(50) = 3.9", losses[0]);
    assert!(last < 0.05, "loss after overfitting is {last}");
    // Greedy generation from the first token reproduces the memorised sequence.
    let merged = model.merged()?;
    let mut sampler = Sampler::new(0.0, None, None, 0)?;
    let out = generate_tokens(&merged, &seq[..1], 16, &mut sampler, &[], |_| Ok(()), || {})?;
    assert_eq!(out, seq[1..].to_vec());
    Ok(())
}

#[test]
fn kv_cache_decoding_matches_full_forward() -> Result<()> {
    let cfg = tiny(Mode::Lors);
    let (model, store) = build(&cfg, DType::F32, 8)?;
    let mut rng = Rng::new(2);
    perturb_b(&store, &mut rng)?;
    let merged = model.merged()?;
    let x = ids(&mut rng, 1, 10, 50)?;
    let full = model.forward(&x)?; // (1, 10, V), unmerged
    let mut cache = merged.new_cache();
    let first = merged.forward_at(&x.narrow(1, 0, 6)?, 0, Some(&mut cache))?;
    let mut steps = vec![first];
    for p in 6..10 {
        steps.push(merged.forward_at(&x.narrow(1, p, 1)?, p, Some(&mut cache))?);
    }
    let cached = Tensor::cat(&steps, 1)?;
    assert!(max_abs_diff(&full, &cached)? < 1e-4);
    Ok(())
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() -> Result<()> {
    let cfg = tiny(Mode::Lors);
    let (model, _) = build(&cfg, DType::F32, 8)?;
    let merged = model.merged()?;
    let gen = |seed| -> Result<Vec<u32>> {
        let mut s = Sampler::new(1.0, Some(40), Some(0.95), seed)?;
        generate_tokens(&merged, &[1, 2, 3], 40, &mut s, &[], |_| Ok(()), || {})
    };
    assert_eq!(gen(5)?, gen(5)?);
    assert_ne!(gen(5)?, gen(6)?);
    // Past the context the window slides instead of failing.
    let mut slides = 0;
    let mut s = Sampler::new(1.0, None, None, 1)?;
    let out = generate_tokens(&merged, &[1], 3 * cfg.model.max_seq_len, &mut s, &[], |_| Ok(()), || slides += 1)?;
    assert_eq!(out.len(), 3 * cfg.model.max_seq_len);
    assert!(slides > 0);
    Ok(())
}

#[test]
fn checkpoint_round_trip_restores_identical_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = tiny(Mode::Lors);
    let (model, store) = build(&cfg, DType::F32, 9)?;
    let mut rng = Rng::new(4);
    perturb_b(&store, &mut rng)?;
    let opt = AdamW::new(store.vars(), 0.9, 0.95, 1e-8, 0.1)?;
    let state =
        TrainState { step: 7, data_rng: 123, opt_t: 7, tokens_seen: 99, val_loss: Some(1.5), rank_data_rngs: vec![] };
    let run = RunDir::at(dir.path());
    let (params, optimizer) = (store.tensors(), opt.state_tensors());
    run.save_checkpoint(&Contents { cfg: &cfg, params: &params, optimizer: &optimizer, state: &state }, 2)?;
    let ckpt = run.checkpoint(None)?;
    let (loaded, _) = load_model(&cfg, &ckpt, &Device::Cpu)?;
    let x = ids(&mut rng, 2, 9, 50)?;
    assert_eq!(max_abs_diff(&model.forward(&x)?, &loaded.forward(&x)?)?, 0.0);
    assert_eq!(ckpt.state()?, state);
    assert_eq!(run.latest_step()?, Some(7));
    // Only unique parameters are stored: no merged weights.
    let names: Vec<String> = ckpt.params(&Device::Cpu)?.into_keys().collect();
    assert!(names.iter().any(|n| n == "shared.0.q.weight"));
    assert!(!names.iter().any(|n| n.starts_with("layers.0.q.weight")));
    // Loading into another config names the mismatching tensor and both shapes.
    let mut other = cfg.clone();
    other.lors.rank = 3;
    let err = load_model(&other, &ckpt, &Device::Cpu).err().expect("mismatch must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("lors_a") && msg.contains("[4, 32]") && msg.contains("[3, 32]"), "{msg}");
    // keep = 2: older checkpoints are pruned.
    for step in [8, 9] {
        let s = TrainState { step, ..state.clone() };
        run.save_checkpoint(&Contents { cfg: &cfg, params: &params, optimizer: &optimizer, state: &s }, 2)?;
    }
    assert_eq!(run.checkpoints()?, vec![8, 9]);
    Ok(())
}

#[test]
fn softmax_rows_of_the_attention_are_causal() -> Result<()> {
    // Changing a later token must not change earlier positions' logits.
    let cfg = tiny(Mode::Lors);
    let (model, _) = build(&cfg, DType::F32, 10)?;
    let a = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu)?;
    let b = Tensor::new(&[[1u32, 2, 3, 4, 5, 49]], &Device::Cpu)?;
    let (la, lb) = (model.forward(&a)?, model.forward(&b)?);
    assert_eq!(max_abs_diff(&la.narrow(1, 0, 5)?, &lb.narrow(1, 0, 5)?)?, 0.0);
    assert!(max_abs_diff(&la.narrow(1, 5, 1)?, &lb.narrow(1, 5, 1)?)? > 0.0);
    // Logits are finite and the probabilities sum to one.
    let p = candle_nn::ops::softmax(&la, D::Minus1)?.sum(D::Minus1)?;
    let p: Vec<f32> = p.flatten_all()?.to_vec1()?;
    assert!(p.iter().all(|s| (s - 1.0).abs() < 1e-5));
    Ok(())
}

/// `Ops::Plain` means plain everywhere: its training loss is candle's own cross-entropy of
/// its own logits, bit for bit. (An earlier `with_fused_ops(false)` still ran the fused
/// cross-entropy, whose fast exp differs in the last bits: the weights below are scaled so
/// that it does here, which the test checks too, so the test can tell the two apart.)
#[test]
fn the_plain_model_computes_its_loss_with_plain_ops() -> Result<()> {
    let cfg = tiny(Mode::Lors);
    let (_, store) = build(&cfg, DType::F32, 1)?;
    let scaled = store.tensors().into_iter().map(|(n, t)| Ok((n.clone(), if t.rank() == 2 { (t * 8.0)? } else { t })));
    let mut store = ParamStore::from_tensors(scaled.collect::<Result<_>>()?, DType::F32, &Device::Cpu);
    let plain = Model::new(&cfg.model, &cfg.lors, &mut store)?.with_ops(Ops::Plain)?;
    let x = Tensor::from_vec((0..64u32).map(|i| (i * 7 + 1) % 50).collect(), (4, 16), &Device::Cpu)?;
    let y = Tensor::from_vec((0..64u32).map(|i| (i * 3 + 1) % 50).collect(), (4, 16), &Device::Cpu)?;
    let logits = plain.forward(&x)?.reshape((64, 50))?;
    let want = candle_nn::loss::cross_entropy(&logits, &y.reshape(64)?)?.to_scalar::<f32>()?;
    let fused = lors_lm::kernels::cross_entropy(&logits, &y.reshape(64)?)?.mean_all()?.to_scalar::<f32>()?;
    assert_ne!(fused, want, "this input must tell the fused and the plain cross-entropy apart");
    assert_eq!(plain.forward_loss(&x, &y)?.to_scalar::<f32>()?, want);
    assert_eq!(Model::loss_with(Ops::Plain, &logits.reshape((4, 16, 50))?, &y)?.to_scalar::<f32>()?, want);
    Ok(())
}

/// Without a cache, positions offset..offset+T attend among themselves (RoPE shifted by the
/// offset): the plain and fused paths agree (the plain one used to fail on a mask built for
/// offset + T keys), and since RoPE scores depend on relative positions only, the logits
/// equal those at offset 0.
#[test]
fn forward_at_an_offset_without_a_cache_agrees_between_plain_and_fused() -> Result<()> {
    let cfg = tiny(Mode::Lors);
    let (model, store) = build(&cfg, DType::F32, 12)?;
    let mut rng = Rng::new(6);
    perturb_b(&store, &mut rng)?;
    let x = ids(&mut rng, 2, 7, 50)?;
    let fused = model.forward_at(&x, 5, None)?;
    let plain = model.with_ops(Ops::Plain)?;
    let got = plain.forward_at(&x, 5, None)?;
    assert!(max_abs_diff(&fused, &got)? < 1e-4, "plain vs fused at offset 5");
    assert!(max_abs_diff(&plain.forward_at(&x, 0, None)?, &got)? < 1e-4, "RoPE is relative");
    Ok(())
}

// ---------------------------------------------------------------- RoPE tables

/// RoPE tables cover the positions used, not `max_seq_len`: a model whose config allows 2^26
/// positions (tables of 2 × 64 GiB, were they built up front) runs a forward pass, and the
/// tables grow as a cached decode walks past their first size, every logit equal to the same
/// weights at a short max_seq_len in one pass.
#[test]
fn rope_tables_grow_with_the_positions_used() -> Result<()> {
    let mut short = tiny(Mode::Lors);
    short.model.max_seq_len = 300;
    let mut long = short.clone();
    long.model.max_seq_len = lors_lm::model::MAX_POSITIONS;
    let (a, _) = build(&short, DType::F32, 7)?;
    let (b, _) = build(&long, DType::F32, 7)?;
    let mut rng = Rng::new(3);
    let x = ids(&mut rng, 1, 300, 50)?;
    let whole = a.forward(&x)?; // (1, 300, V)
    let mut cache = b.new_cache();
    let mut steps = vec![];
    for pos in 0..300 {
        steps.push(b.forward_at(&x.narrow(1, pos, 1)?, pos, Some(&mut cache))?);
    }
    let stepped = Tensor::cat(&steps, 1)?;
    let diff = max_abs_diff(&whole, &stepped)?;
    assert!(diff < 1e-4, "cached decode past the first table size differs by {diff}");
    Ok(())
}
