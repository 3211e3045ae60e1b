//! `lors-lm compress`, `train --init-from` and `train --teacher`: compression at full rank
//! reproduces the source, the energy report on a known spectrum, the distillation loss and
//! its gradient, and bad input refused with nothing written.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use common::{bin, repo, run_err, run_ok, train_tiny};
use lors_lm::compress::{compress, Spec};
use lors_lm::config::{Config, Mode, Proj};
use lors_lm::model::{Model, Ops, ParamStore};
use lors_lm::rng::Rng;
use lors_lm::train::distill::{kl_divergence, Distill};
use std::collections::HashMap;
use std::path::Path;

fn tiny(mode: Mode, n_layers: usize) -> Config {
    let mut c = Config::tiny();
    c.model.vocab_size = 50;
    c.model.n_layers = n_layers;
    c.lors.mode = mode;
    c
}

/// A vanilla model with random (not equal) layers, and its tensors.
fn vanilla(n_layers: usize, seed: u64, dtype: DType) -> Result<(Config, Model, HashMap<String, Tensor>)> {
    let cfg = tiny(Mode::Vanilla, n_layers);
    let mut store = ParamStore::new_init(seed, dtype, &Device::Cpu);
    let model = Model::new(&cfg.model, &cfg.lors, &mut store)?;
    let tensors = model.merged_tensors()?.into_iter().collect();
    Ok((cfg, model, tensors))
}

fn spec(energy: Option<f64>) -> Spec {
    Spec {
        mode: Mode::Lors,
        rank: 4,
        attn_rank: None,
        ffn_rank: None,
        groups: 1,
        group_size: None,
        targets: Proj::ALL.to_vec(),
        private_layers: vec![],
        energy,
        budget: None,
    }
}

fn ids(seed: u64, b: usize, t: usize) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let v: Vec<u32> = (0..b * t).map(|_| rng.below(50) as u32).collect();
    Ok(Tensor::from_vec(v, (b, t), &Device::Cpu)?)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let s = a.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(d / s)
}

/// At full rank (energy 1) every layer is its group's mean plus its whole residual: the
/// LORS model computes the source's logits, for one group, groups of two, and the sandwich.
#[test]
fn compression_at_full_rank_reproduces_the_source_logits() -> Result<()> {
    let (cfg, source, tensors) = vanilla(4, 3, DType::F32)?;
    let x = ids(1, 2, 12)?;
    let want = source.forward(&x)?;
    for (groups, group_size, private) in
        [(1, None, vec![]), (1, Some(2), vec![]), (1, None, vec![0, 3]), (2, None, vec![])]
    {
        let s = Spec { groups, group_size, private_layers: private.clone(), ..spec(Some(1.0)) };
        let c = compress(&cfg.model, &tensors, &s)?;
        let mut store = ParamStore::from_tensors(c.tensors, DType::F32, &Device::Cpu);
        let model = Model::new(&cfg.model, &c.lors, &mut store)?;
        let err = max_rel_diff(&want, &model.forward(&x)?)?;
        assert!(err < 1e-4, "groups {groups} / size {group_size:?} / private {private:?}: relative error {err}");
        assert!(c.report.iter().all(|r| r.energy_kept > 1.0 - 1e-9));
    }
    Ok(())
}

/// The baselines: per-layer truncated SVD without sharing (`lowrank`) is exact at full rank
/// and stores no base; keeping every layer is the source itself, keeping two halves the blocks.
#[test]
fn lowrank_and_layer_dropping_baselines() -> Result<()> {
    let (cfg, source, tensors) = vanilla(4, 7, DType::F32)?;
    let x = ids(2, 2, 10)?;
    let want = source.forward(&x)?;
    let c = compress(&cfg.model, &tensors, &Spec { mode: Mode::Lowrank, ..spec(Some(1.0)) })?;
    assert!(!c.tensors.keys().any(|n| n.starts_with("shared.")), "lowrank shares nothing");
    let mut store = ParamStore::from_tensors(c.tensors, DType::F32, &Device::Cpu);
    let model = Model::new(&cfg.model, &c.lors, &mut store)?;
    assert!(max_rel_diff(&want, &model.forward(&x)?)? < 1e-4);
    let counts = lors_lm::model::ParamCounts::new(
        &cfg.model,
        &Spec { mode: Mode::Lowrank, rank: 2, ..spec(None) }.lors_config(),
    );
    assert_eq!(counts.shared, 0);
    assert_eq!(counts.private, 4 * 2 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64)));
    let (m, kept) = lors_lm::compress::keep_layers(&cfg.model, &tensors, &[0, 1, 2, 3])?;
    let mut store = ParamStore::from_tensors(kept, DType::F32, &Device::Cpu);
    assert_eq!(max_rel_diff(&want, &Model::new(&m, &cfg.lors, &mut store)?.forward(&x)?)?, 0.0);
    let (m, kept) = lors_lm::compress::keep_layers(&cfg.model, &tensors, &[0, 3])?;
    assert_eq!(m.n_layers, 2);
    assert_eq!(kept["layers.1.q.weight"].to_vec2::<f32>()?, tensors["layers.3.q.weight"].to_vec2::<f32>()?);
    assert!(lors_lm::compress::keep_layers(&cfg.model, &tensors, &[3, 1]).is_err());
    Ok(())
}

/// Two layers whose q weights are S ± R with R of singular values (4, 3, 2, 1, 0, ...): the
/// mean is S, both residuals are ±R, so rank r keeps Σ_{i<r} σ_i² / 30 of the energy.
#[test]
fn the_energy_report_matches_a_known_spectrum() -> Result<()> {
    let (cfg, _, mut tensors) = vanilla(2, 4, DType::F32)?;
    let d = cfg.model.d_model;
    let mut r = vec![0f32; d * d];
    for (i, s) in [4.0f32, 3.0, 2.0, 1.0].iter().enumerate() {
        // Orthonormal columns and rows: distinct axes, a sign flip.
        r[(2 * i + 1) * d + (5 * i + 3)] = if i % 2 == 0 { *s } else { -*s };
    }
    let r = Tensor::from_vec(r, (d, d), &Device::Cpu)?;
    let s = tensors["layers.0.q.weight"].clone();
    tensors.insert("layers.0.q.weight".into(), (&s + &r)?);
    tensors.insert("layers.1.q.weight".into(), (&s - &r)?);
    for (rank, want) in [(1, 16.0 / 30.0), (2, 25.0 / 30.0), (3, 29.0 / 30.0), (4, 1.0)] {
        let c = compress(&cfg.model, &tensors, &Spec { rank, ..spec(None) })?;
        for layer in 0..2 {
            let rep = c.report.iter().find(|x| x.proj == Proj::Q && x.layer == layer).unwrap();
            assert_eq!(rep.rank, rank);
            assert!((rep.energy_kept - want).abs() < 1e-5, "rank {rank} layer {layer}: {} vs {want}", rep.energy_kept);
        }
        let shared = c.tensors["shared.0.q.weight"].clone();
        assert!(max_rel_diff(&s, &shared)? < 1e-6, "the shared base is the mean");
    }
    // --energy 0.8 keeps two singular values of q.
    let c = compress(&cfg.model, &tensors, &spec(Some(0.8)))?;
    assert_eq!(c.lors.proj_ranks[&Proj::Q], vec![2, 2]);
    Ok(())
}

/// `--budget`: the ranks fit the budget, are those of `--energy` at the fraction it chose, and
/// one step finer would not fit; a budget below bases + rank 1 is refused.
#[test]
fn a_budget_picks_the_largest_energy_that_fits() -> Result<()> {
    let (cfg, _, tensors) = vanilla(4, 11, DType::F32)?;
    let vanilla_block = lors_lm::model::ParamCounts::new(&cfg.model, &cfg.lors).block_projections();
    let block =
        |c: &lors_lm::compress::Compressed| lors_lm::model::ParamCounts::new(&cfg.model, &c.lors).block_projections();
    let mut last = 0.0;
    for frac in [0.45, 0.6, 0.75, 0.9] {
        let budget = (frac * vanilla_block as f64) as usize;
        let c = compress(&cfg.model, &tensors, &Spec { budget: Some(budget), ..spec(None) })?;
        let e = c.energy.expect("a budget reports the energy it chose");
        assert!(block(&c) <= budget, "{frac}: {} > {budget}", block(&c));
        assert!(e > last && e < 1.0, "{frac}: energy {e} after {last}");
        last = e;
        // The same ranks as --energy e; a slightly larger fraction no longer fits.
        let same = compress(&cfg.model, &tensors, &spec(Some(e)))?;
        assert_eq!(same.lors.proj_ranks, c.lors.proj_ranks);
        let finer = compress(&cfg.model, &tensors, &spec(Some((e + 1e-6).min(1.0))))?;
        assert!(block(&finer) > budget, "{frac}: energy {e} is not the largest that fits");
        // Random layers: the residuals are most of the weight, so this is far from free.
        assert!(block(&c) as f64 > 0.9 * budget as f64);
    }
    let err = compress(&cfg.model, &tensors, &Spec { budget: Some(vanilla_block / 5), ..spec(None) })
        .err()
        .expect("a budget below the base is refused")
        .to_string();
    assert!(err.contains("--budget") && err.contains("more than the budget"), "{err}");
    Ok(())
}

/// The distillation loss is (1−α)·CE + α·T²·KL computed independently, and its gradient
/// matches central finite differences (f64).
#[test]
fn distillation_loss_and_gradient_match_a_plain_composition_and_finite_differences() -> Result<()> {
    let (cfg, teacher, _) = vanilla(2, 5, DType::F64)?;
    let student_cfg = tiny(Mode::Lors, 2);
    let mut store = ParamStore::new_init(6, DType::F64, &Device::Cpu);
    let student = Model::new(&student_cfg.model, &student_cfg.lors, &mut store)?;
    let (alpha, temp) = (0.3, 2.0);
    let distill = Distill::new(&teacher, &student, alpha, temp)?;
    let (x, y) = (ids(2, 2, 9)?, ids(3, 2, 9)?);
    let got = distill.loss(&student, &x, &y)?;
    // Independent composition on plain vectors.
    let (s, t): (Vec<f64>, Vec<f64>) =
        (student.forward(&x)?.flatten_all()?.to_vec1()?, teacher.forward(&x)?.flatten_all()?.to_vec1()?);
    let targets: Vec<u32> = y.flatten_all()?.to_vec1()?;
    let v = cfg.model.vocab_size;
    let log_softmax = |row: &[f64], temp: f64| -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::MIN, f64::max) / temp;
        let z: f64 = row.iter().map(|x| (x / temp - m).exp()).sum::<f64>().ln() + m;
        row.iter().map(|x| x / temp - z).collect()
    };
    let (mut ce, mut kl) = (0.0, 0.0);
    let n = targets.len();
    for i in 0..n {
        let (srow, trow) = (&s[i * v..(i + 1) * v], &t[i * v..(i + 1) * v]);
        ce -= log_softmax(srow, 1.0)[targets[i] as usize] / n as f64;
        let (lq, lp) = (log_softmax(srow, temp), log_softmax(trow, temp));
        kl += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>() / n as f64;
    }
    let want = (1.0 - alpha) * ce + alpha * temp * temp * kl;
    assert!((got.ce - ce).abs() < 1e-10 && (got.kl - kl).abs() < 1e-10, "ce {} vs {ce}, kl {} vs {kl}", got.ce, got.kl);
    assert!((got.loss.to_scalar::<f64>()? - want).abs() < 1e-10);
    assert!(kl > 0.0, "different models must disagree");
    // KL of a model with itself is zero.
    let logits = student.forward(&x)?;
    for ops in [Ops::Fused, Ops::Plain] {
        assert!(kl_divergence(ops, &logits, &logits, temp)?.to_scalar::<f64>()?.abs() < 1e-12);
    }
    // The fused kernel (which the CPU student uses) and the plain composition agree.
    let teacher_logits = teacher.forward(&x)?;
    let (fused, plain) = (
        kl_divergence(Ops::Fused, &teacher_logits, &logits, temp)?.to_scalar::<f64>()?,
        kl_divergence(Ops::Plain, &teacher_logits, &logits, temp)?.to_scalar::<f64>()?,
    );
    assert!((fused - plain).abs() < 1e-12 && (fused - kl).abs() < 1e-10, "fused {fused}, plain {plain}, want {kl}");
    // Gradients against finite differences.
    let grads = got.loss.backward()?;
    let mut rng = Rng::new(9);
    for (name, var) in
        store.vars().iter().filter(|(n, _)| n.contains("lors_a") || n.contains("embed") || n.contains("shared.0.up"))
    {
        check_fd(name, var, &grads, &mut rng, &|| Ok(distill.loss(&student, &x, &y)?.loss.to_scalar::<f64>()?))?;
    }
    Ok(())
}

fn check_fd(
    name: &str,
    var: &Var,
    grads: &candle_core::backprop::GradStore,
    rng: &mut Rng,
    f: &dyn Fn() -> Result<f64>,
) -> Result<()> {
    let g: Vec<f64> = grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
    let base: Vec<f64> = var.as_tensor().flatten_all()?.to_vec1()?;
    for _ in 0..3 {
        let i = rng.below(base.len() as u64) as usize;
        let at = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
            f()
        };
        let eps = 1e-6;
        let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
        assert!(
            (fd - g[i]).abs() < 1e-7 + 1e-5 * fd.abs().max(g[i].abs()),
            "{name}[{i}]: fd {fd} vs autodiff {}",
            g[i]
        );
    }
    Ok(())
}

/// Prepared data from a small repetitive text, with a BPE tokenizer of `vocab` tokens.
fn data_with_vocab(dir: &Path, vocab: usize) {
    let words = ["the", "whale", "sea", "ship", "captain", "harpoon", "white", "ocean", "deep", "sail"];
    let mut rng = Rng::new(vocab as u64);
    let text: Vec<&str> = (0..6000).map(|_| words[rng.below(words.len() as u64) as usize]).collect();
    let input = dir.with_extension("txt");
    std::fs::write(&input, text.join(" ")).unwrap();
    run_ok(bin().args(["prepare", "--vocab-size", &vocab.to_string(), "--input"]).arg(&input).arg("--out").arg(dir));
}

fn data(dir: &Path) {
    data_with_vocab(dir, 300);
}

fn eval_loss(run: &Path, data: &Path) -> f64 {
    let out = run_ok(bin().args(["eval", "--json", "--run"]).arg(run).arg("--data").arg(data));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

/// The whole path through the binary: train a vanilla model, compress it at full rank (its
/// eval equals the source's), compress it smaller and uptrain it with and without a teacher.
#[test]
fn compress_then_uptrain_with_and_without_a_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, src) = (tmp.path().join("data"), tmp.path().join("src"));
    data(&d);
    run_ok(train_tiny(&d, &src).args(["--set", "lors.mode=vanilla", "--set", "train.max_steps=30"]));
    // Full rank: the same evaluation, and the run directory works with every command.
    let full = tmp.path().join("full");
    let out = run_ok(
        bin().args(["compress", "--energy", "1", "--from"]).arg(&src).arg("--out").arg(&full).arg("--data").arg(&d),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("validation loss") && text.contains("r32 100.0%"), "{text}");
    let (a, b) = (eval_loss(&src, &d), eval_loss(&full, &d));
    assert!((a - b).abs() < 1e-4 * a, "eval after full-rank compression {b} vs source {a}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("compress.json")).unwrap()).unwrap();
    assert!((report["val"]["source_loss"].as_f64().unwrap() - a).abs() < 1e-4);
    run_ok(bin().args(["params", "--run"]).arg(&full));
    // Smaller: rank 2, groups of 2 with the sandwich.
    let small = tmp.path().join("small");
    run_ok(
        bin()
            .args(["compress", "--rank", "2", "--private-layers", "0,L-1", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&small),
    );
    let cfg = Config::load(&small.join("config.toml"), &[]).unwrap();
    assert_eq!((cfg.lors.mode, cfg.lors.private_layers.clone(), cfg.lors.rank), (Mode::Lors, vec![0, 2], 2));
    let steps = ["--set", "train.max_steps=6", "--set", "train.warmup_steps=1", "--quiet"];
    let up = tmp.path().join("up");
    run_ok(bin().args(["train", "--init-from"]).arg(&small).arg("--data").arg(&d).arg("--out").arg(&up).args(steps));
    let distilled = tmp.path().join("distilled");
    run_ok(
        bin()
            .args(["train", "--init-from"])
            .arg(&small)
            .arg("--teacher")
            .arg(&src)
            .args(["--set", "train.distill_alpha=0.5"])
            .arg("--data")
            .arg(&d)
            .arg("--out")
            .arg(&distilled)
            .args(steps),
    );
    let metrics = std::fs::read_to_string(distilled.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(first["kl"].as_f64().unwrap() >= 0.0 && first["ce"].as_f64().is_some(), "{first}");
    // The uptrained runs start from the compressed weights, not from a fresh init: their
    // first loss is the compressed model's, far below a random model's ln(50) ≈ 3.9.
    let m: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(up.join("metrics.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    assert!(m["loss"].as_f64().unwrap() < 3.5, "{m}");
}

/// Bad input gets a clear error and nothing is written.
#[test]
fn bad_compression_input_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, src) = (tmp.path().join("data"), tmp.path().join("src"));
    data(&d);
    run_ok(train_tiny(&d, &src).args([
        "--set",
        "lors.mode=vanilla",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.warmup_steps=0",
    ]));
    let out = tmp.path().join("out");
    let compress = |extra: &[&str], from: &Path| {
        let mut c = bin();
        c.args(["compress", "--from"]).arg(from).arg("--out").arg(&out).args(extra);
        c
    };
    // A rank larger than min(out, in).
    let e = run_err(&mut compress(&["--rank", "40"], &src));
    assert!(e.contains("larger than min(out, in)"), "{e}");
    assert!(!out.exists(), "a refused compression wrote {}", out.display());
    // Not a Llama: a Hugging Face directory of another architecture.
    let hf = tmp.path().join("hf");
    run_ok(bin().args(["export", "--run"]).arg(&src).arg("--out").arg(&hf));
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap().replace("\"llama\"", "\"gpt2\"");
    std::fs::write(hf.join("config.json"), cfg).unwrap();
    let e = run_err(&mut compress(&[], &hf));
    assert!(e.contains("gpt2") && e.contains("Llama"), "{e}");
    assert!(!out.exists());
    // A LORS source whose groups the requested ones do not divide: groups of 2 over 4 layers
    // re-compressed into groups of 3.
    let lors = tmp.path().join("lors");
    run_ok(train_tiny(&d, &lors).args([
        "--set",
        "model.n_layers=4",
        "--set",
        "lors.group_size=2",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.warmup_steps=0",
    ]));
    let e = run_err(&mut compress(&["--group-size", "3"], &lors));
    assert!(e.contains("do not divide"), "{e}");
    assert!(!out.exists());
    // Coarsening is fine.
    run_ok(&mut compress(&["--group-size", "4", "--rank", "2"], &lors));
    // An --out that holds a run is left as it was (without --force).
    let before = std::fs::read(out.join("config.toml")).unwrap();
    let e = run_err(&mut compress(&["--rank", "2"], &src));
    assert!(e.contains("already holds a run") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(out.join("config.toml")).unwrap(), before);
    // A teacher with another tokenizer (another vocabulary).
    let other = tmp.path().join("other");
    data_with_vocab(&other, 280);
    let e = run_err(
        bin()
            .args(["train", "--config"])
            .arg(repo("configs/tiny.toml"))
            .arg("--data")
            .arg(&other)
            .arg("--out")
            .arg(tmp.path().join("student"))
            .arg("--teacher")
            .arg(&src)
            .args(["--set", "train.distill_alpha=0.5"]),
    );
    assert!(e.contains("tokenizer") && e.contains("280"), "{e}");
    assert!(!tmp.path().join("student").exists());
}
