//! LORS-native inference (`Model::factored`): the same logits and greedy text as the merged
//! model for every kind of sharing, the unique parameters only in memory, and the
//! `--weights` choice of `generate` and `eval`.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{bin, prepare_text, repo, run_err, run_ok, train_tiny};
use lors_lm::config::{Config, Mode, Proj};
use lors_lm::infer::generate::{generate_tokens, Sampler};
use lors_lm::model::{Model, Ops, ParamCounts, ParamStore, Weights};
use lors_lm::rng::Rng;
use std::path::{Path, PathBuf};

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
    out.push(("lowrank (no bases: W = B A)", tiny(Mode::Lowrank)));
    let mut c = tiny(Mode::Lowrank);
    c.model.n_layers = 4;
    c.model.n_kv_heads = 1;
    c.lors.targets = vec![Proj::Q, Proj::V, Proj::Gate, Proj::Down];
    c.lors.private_layers = vec![2];
    out.push(("lowrank, partial targets (bases and none in one stack), a full layer, one kv head", c));
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
        if cfg.lors.mode == Mode::Lowrank {
            assert!(f.read < m.read, "{name}: factored reads the factors instead of B A");
        } else {
            assert!(f.read >= m.read, "{name}: factored reads the bases plus the factors");
        }
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

// ---------------------------------------------------------------- through the binary

fn prepared(dir: &Path) -> PathBuf {
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my \
                purse, and nothing particular to interest me on shore, I thought I would sail about a little. ";
    prepare_text(dir, &text.repeat(30), 300)
}

/// A tiny run of `mode` trained for 30 steps (the private factors move away from zero).
fn trained(tmp: &Path, data: &Path, name: &str, sets: &[&str]) -> PathBuf {
    let run = tmp.join(name);
    let mut c = train_tiny(data, &run);
    c.args(["--set", "train.max_steps=30"]);
    for s in sets {
        c.args(["--set", s]);
    }
    run_ok(&mut c);
    run
}

/// `generate` greedy from `run` with `--weights w`: (stdout, stderr).
fn generate(run: &Path, w: &str, extra: &[&str]) -> (String, String) {
    let out = run_ok(
        bin()
            .args(["generate", "--temperature", "0", "--max-new-tokens", "40", "--prompt", "Some years", "--run"])
            .arg(run)
            .args(["--weights", w])
            .args(extra),
    );
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn generate_gives_the_same_greedy_text_merged_and_factored_and_auto_says_which_it_took() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    for (name, sets) in [
        ("lors", vec![]),
        ("shared", vec!["lors.mode=shared"]),
        ("groups", vec!["model.n_layers=4", "lors.group_size=2", "lors.private_layers=[3]"]),
        ("lowrank", vec!["lors.mode=lowrank"]),
    ] {
        let run = trained(tmp.path(), &data, name, &sets);
        let (merged, err_m) = generate(&run, "merged", &[]);
        let (factored, err_f) = generate(&run, "factored", &["--stats"]);
        assert_eq!(merged, factored, "{name}: greedy text differs");
        assert!(merged.len() > "Some years".len() + 10, "{name}: too little text: {merged:?}");
        assert!(err_m.contains("weights: merged (as asked"), "{name}: {err_m}");
        assert!(err_f.contains("weights: factored (as asked"), "{name}: {err_f}");
        for needle in ["stats: prompt: ", "tokens/s; decoding: 39 tokens at ", "peak RSS "] {
            assert!(err_f.contains(needle), "{name}: --stats should print {needle:?}: {err_f}");
        }
        let (auto, err_a) = generate(&run, "auto", &[]);
        assert_eq!(auto, merged, "{name}: auto");
        assert!(
            err_a.contains("weights: merged (auto: ") || err_a.contains("weights: factored (auto: "),
            "{name}: auto should say what it took: {err_a}"
        );
        assert!(err_a.contains("GB/s") && err_a.contains("working set"), "{name}: and why: {err_a}");
        // eval: the same loss either way.
        let loss = |w: &str| -> f64 {
            let out = run_ok(
                bin().args(["eval", "--json", "--data"]).arg(&data).arg("--run").arg(&run).args(["--weights", w]),
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["loss"].as_f64().unwrap()
        };
        let (lm, lf) = (loss("merged"), loss("factored"));
        assert!((lm - lf).abs() < 1e-4 * lm.abs().max(1.0), "{name}: eval loss {lm} merged vs {lf} factored");
    }
}

#[test]
fn a_vanilla_run_refuses_factored_weights_and_auto_takes_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = trained(tmp.path(), &data, "vanilla", &["lors.mode=vanilla"]);
    let mut c = bin();
    c.args(["generate", "--prompt", "Some", "--max-new-tokens", "4", "--weights", "factored", "--run"]).arg(&run);
    let err = run_err(&mut c);
    assert!(err.contains("vanilla model") && err.contains("--weights merged"), "{err}");
    let err = run_err(bin().args(["eval", "--weights", "factored", "--data"]).arg(&data).arg("--run").arg(&run));
    assert!(err.contains("vanilla model"), "{err}");
    let (_, err) = generate(&run, "auto", &[]);
    assert!(err.contains("weights: merged (auto: a vanilla model shares nothing)"), "{err}");
}

/// Peak RSS of a `bench --decode` child: a LORS model of 24 layers sharing one base, built
/// with random weights, kept merged or factored, then a short prompt and decode.
fn bench_child_peak_rss(weights: &str) -> f64 {
    let mut c = bin();
    c.args(["bench", "--decode", "--child", "--json", "--config"]).arg(repo("configs/bench-decode.toml"));
    for s in ["model.d_model=384", "model.n_heads=6", "model.ffn_hidden=1024", "model.n_layers=24", "lors.rank=8"] {
        c.args(["--set", s]);
    }
    c.args(["--modes", "lors", "--weights", weights, "--batches", "1", "--prompt-tokens", "4", "--gen-tokens", "4"]);
    let out = run_ok(&mut c);
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["weights"], weights);
    v["peak_rss_mb"].as_f64().expect("peak RSS (Linux)")
}

#[test]
fn factored_decoding_peaks_at_a_fraction_of_merged_memory() {
    // Merged: 24 layers × 7.1 MB of f32 weights ≈ 170 MB; factored: one 7.1 MB base, the
    // rank-8 factors (≈ 5 MB) and the 6 MB embedding.
    let (merged, factored) = (bench_child_peak_rss("merged"), bench_child_peak_rss("factored"));
    assert!(factored < 0.5 * merged, "peak RSS factored {factored:.0} MB vs merged {merged:.0} MB");
}

#[test]
fn bench_decode_json_has_a_row_per_mode_and_weights_with_the_set_dimensions() {
    let mut c = bin();
    c.args(["bench", "--decode", "--json", "--config"]).arg(repo("configs/bench-decode.toml"));
    let sets =
        ["model.d_model=64", "model.n_heads=2", "model.ffn_hidden=176", "model.n_layers=3", "model.vocab_size=256"];
    for s in sets.iter().chain(&["lors.rank=4"]) {
        c.args(["--set", s]);
    }
    c.args(["--modes", "vanilla,lors,lowrank", "--batches", "1,2", "--rounds", "1"]);
    c.args(["--prompt-tokens", "3", "--gen-tokens", "3"]);
    let out = run_ok(&mut c);
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(String, String, u64)> = rows
        .iter()
        .map(|r| {
            (r["mode"].as_str().unwrap().into(), r["weights"].as_str().unwrap().into(), r["batch"].as_u64().unwrap())
        })
        .collect();
    let mut want = vec![];
    for b in [1, 2] {
        for (m, w) in [
            ("vanilla", "merged"),
            ("lors", "merged"),
            ("lors", "factored"),
            ("lowrank", "merged"),
            ("lowrank", "factored"),
        ] {
            want.push((m.to_string(), w.to_string(), b));
        }
    }
    assert_eq!(got, want);
    for r in &rows {
        assert_eq!((r["d_model"].as_u64(), r["n_layers"].as_u64()), (Some(64), Some(3)), "--set: {r}");
        for k in ["decode_tokens_per_sec", "prompt_tokens_per_sec", "peak_rss_mb"] {
            assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {r}");
        }
    }
    // Factored LORS reads the bases again in every layer but keeps fewer distinct bytes.
    let (lm, lf) = (&rows[1], &rows[2]);
    assert!(lf["weight_bytes_distinct"].as_u64() < lm["weight_bytes_distinct"].as_u64(), "{lm} vs {lf}");
    // The machine's caches and bandwidth on stderr.
    let header = String::from_utf8_lossy(&out.stderr);
    assert!(header.contains("caches (sysfs)") && header.contains("read bandwidth"), "{header}");
}
