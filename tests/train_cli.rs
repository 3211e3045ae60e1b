//! End-to-end tests of `lors-lm train` / `generate` / `params` through the real binary, on
//! synthetic token data (fast) with the tiny config.

mod common;

use common::{bin, repo, run_err, run_ok, snapshot, train_tiny};

use std::path::Path;

/// A learnable synthetic language: next = (7·prev + 3) mod 50, with a rare random token.
fn synthetic_data(dir: &Path, n_train: usize, n_val: usize) {
    let mut x: u64 = 12345;
    let mut seq = vec![];
    let mut t = 1u32;
    for _ in 0..n_train + n_val {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        t = if (x >> 33).is_multiple_of(50) { ((x >> 40) % 50) as u32 } else { (7 * t + 3) % 50 };
        seq.push(t);
    }
    lors_lm::data::write_prepared_dir(dir, &seq[..n_train], &seq[n_train..], 50, None).unwrap();
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run).iter().filter_map(|m| Some((m.get("step")?.as_u64()?, m.get("loss")?.as_f64()?))).collect()
}

#[test]
fn loss_falls_on_a_learnable_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data, 20_000, 2_000);
    let run = tmp.path().join("run");
    let out = run_ok(
        bin()
            .args(["train", "--config"])
            .arg(repo("configs/tiny.toml"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .args(["--set", "train.max_steps=200", "--set", "train.eval_interval=50"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("step") && stdout.contains("tok/s"), "{stdout}");
    let vals: Vec<f64> = metrics(&run).iter().filter_map(|m| m.get("val_loss")?.as_f64()).collect();
    let last = *vals.last().unwrap();
    // ln(50) = 3.91 for a uniform guess; the rule is nearly deterministic (floor ~0.2).
    let first = train_losses(&run)[0].1;
    assert!(first > 3.5, "first train loss {first}, expected about ln(50)");
    assert!(last < 1.5, "val loss {last} did not fall (all evals: {vals:?})");
    assert!(run.join("checkpoints/200/model.safetensors").is_file());
    assert_eq!(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap().trim(), "200");
    assert!(run.join("config.toml").is_file());
}

#[test]
fn interrupted_and_resumed_run_matches_an_uninterrupted_one_step_for_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data, 5_000, 1_000);
    let common = |run: &Path| {
        let mut c = train_tiny(&data, run);
        c.args(["--set", "train.max_steps=24", "--set", "train.grad_accum=2", "--set", "train.eval_interval=8"]);
        c
    };
    let full = tmp.path().join("full");
    run_ok(&mut common(&full));
    let split = tmp.path().join("split");
    run_ok(common(&split).args(["--stop-at", "11"]));
    assert_eq!(train_losses(&split).len(), 11);
    // Resuming takes the saved config from the run directory.
    run_ok(bin().args(["train", "--quiet", "--resume", "--out"]).arg(&split));
    let (a, b) = (train_losses(&full), train_losses(&split));
    assert_eq!(a.len(), 24);
    assert_eq!(a, b, "losses differ after resume");
    // A second resume of a finished run trains nothing and keeps the log intact.
    run_ok(bin().args(["train", "--quiet", "--resume", "--out"]).arg(&split));
    assert_eq!(train_losses(&split), a);
}

#[test]
fn the_three_modes_differ_only_by_config_and_params_reports_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data, 3_000, 500);
    let mut totals = vec![];
    for mode in ["vanilla", "shared", "lors"] {
        let out = run_ok(
            bin()
                .args(["params", "--json", "--config"])
                .arg(repo("configs/tiny.toml"))
                .arg("--data")
                .arg(&data)
                .args(["--set", &format!("lors.mode={mode}")]),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        totals.push(v["total_unique"].as_u64().unwrap());
        let run = tmp.path().join(mode);
        run_ok(train_tiny(&data, &run).args([
            "--set",
            &format!("lors.mode={mode}"),
            "--set",
            "train.max_steps=3",
            "--set",
            "train.warmup_steps=0",
        ]));
    }
    assert!(totals[1] < totals[2] && totals[2] < totals[0], "shared < lors < vanilla: {totals:?}");
    let out = run_ok(
        bin().args(["params", "--config"]).arg(repo("configs/tiny.toml")).args(["--set", "model.vocab_size=50"]),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for row in ["embedding", "shared", "private", "norm", "total unique", "vanilla", "reduction"] {
        assert!(table.contains(row), "missing {row} in\n{table}");
    }
}

#[test]
fn train_refuses_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data, 3_000, 500);
    let cfg = repo("configs/tiny.toml");
    let base = |extra: &[&str]| {
        let mut c = train_tiny(&data, &tmp.path().join("r"));
        c.args(extra);
        c
    };
    let e = run_err(&mut base(&["--set", "lors.rnak=3"]));
    assert!(e.contains("rnak"), "{e}");
    let e = run_err(&mut base(&["--set", "model.n_heads=3"]));
    assert!(e.contains("divisible"), "{e}");
    let e = run_err(&mut base(&["--set", "model.vocab_size=77"]));
    assert!(e.contains("vocab"), "{e}");
    let e = run_err(&mut base(&["--device", "cuda"]));
    assert!(e.contains("cuda") || e.contains("CUDA"), "{e}");
    let e = run_err(bin().args(["train", "--config", "/nonexistent.toml", "--data"]).arg(&data));
    assert!(e.contains("/nonexistent.toml"), "{e}");
    let e = run_err(bin().args(["train", "--config"]).arg(&cfg).arg("--data").arg(tmp.path()));
    assert!(e.contains("meta.json"), "{e}");
    // An --out holding a run is not clobbered without --force; --resume with nothing fails.
    run_ok(&mut base(&["--set", "train.max_steps=2", "--set", "train.warmup_steps=0"]));
    let e = run_err(&mut base(&["--set", "train.max_steps=2", "--set", "train.warmup_steps=0"]));
    assert!(e.contains("--resume") && e.contains("--force"), "{e}");
    assert!(tmp.path().join("r/checkpoints/2").is_dir(), "the earlier run must survive");
    run_ok(&mut base(&["--set", "train.max_steps=3", "--set", "train.warmup_steps=0", "--force"]));
    let e = run_err(bin().args(["train", "--resume", "--out"]).arg(tmp.path().join("empty")));
    assert!(e.contains("resume"), "{e}");
    // generate on a missing run / checkpoint.
    let e = run_err(bin().args(["generate", "--run"]).arg(tmp.path().join("nope")));
    assert!(e.contains("does not exist"), "{e}");
    let e =
        run_err(bin().args(["generate", "--checkpoint", "999", "--prompt", "x", "--run"]).arg(tmp.path().join("r")));
    assert!(e.contains("999"), "{e}");
}

/// A command that refuses leaves the run directory byte-identical: a --resume whose config
/// does not fit the checkpoint (other dimensions, another vocabulary), a new run over an
/// existing one without --force, a --force run whose config is invalid.
#[test]
fn refused_commands_leave_the_run_directory_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data, 3_000, 500);
    let run = tmp.path().join("r");
    let two_steps = ["--set", "train.max_steps=2", "--set", "train.warmup_steps=0"];
    run_ok(train_tiny(&data, &run).args(two_steps));
    let before = snapshot(&run);
    let resume = |extra: &[&str]| {
        let mut c = bin();
        c.args(["train", "--quiet", "--resume", "--out"]).arg(&run).arg("--data").arg(&data).args(extra);
        c
    };
    let e = run_err(&mut resume(&["--set", "model.d_model=48", "--set", "train.max_steps=4"]));
    assert!(e.contains("shape"), "{e}");
    assert!(snapshot(&run) == before, "a refused --resume with other dimensions changed {}", run.display());
    let e = run_err(&mut resume(&["--set", "lors.rank=2", "--set", "train.max_steps=4"]));
    assert!(e.contains("lors_a"), "{e}");
    assert!(snapshot(&run) == before, "a refused --resume with another rank changed {}", run.display());
    let e = run_err(train_tiny(&data, &run).args(two_steps));
    assert!(e.contains("--force"), "{e}");
    assert!(snapshot(&run) == before, "a refused new run changed {}", run.display());
    let e = run_err(train_tiny(&data, &run).args(["--force", "--set", "model.n_heads=3"]));
    assert!(e.contains("divisible"), "{e}");
    assert!(snapshot(&run) == before, "a --force run with an invalid config changed {}", run.display());
}

/// prepare → train (overfit a short text) → generate through the real binary: greedy decoding
/// reproduces the training text, and seeded sampling is reproducible.
#[test]
fn generate_after_overfitting_reproduces_the_text_and_seeds_repeat() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "It is a way I have of driving off the spleen and regulating the circulation. ";
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, text.repeat(40)).unwrap();
    let data = tmp.path().join("data");
    run_ok(
        bin()
            .args(["prepare", "--vocab-size", "300", "--val-fraction", "0.2", "--input"])
            .arg(&corpus)
            .arg("--out")
            .arg(&data),
    );
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args([
        "--set",
        "train.max_steps=150",
        "--set",
        "train.lr=1e-2",
        "--set",
        "train.weight_decay=0",
    ]));
    let gen = |extra: &[&str]| {
        let out = run_ok(
            bin()
                .args(["generate", "--run"])
                .arg(&run)
                .args(["--prompt", "It is a way", "--max-new-tokens", "20"])
                .args(extra),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let greedy = gen(&["--temperature", "0"]);
    assert!(greedy.starts_with("It is a way I have of driving off the spleen"), "greedy output: {greedy:?}");
    let a = gen(&["--temperature", "1.5", "--seed", "3"]);
    assert_eq!(a, gen(&["--temperature", "1.5", "--seed", "3"]));
    // Bad sampling flags are refused.
    let e = run_err(bin().args(["generate", "--top-p", "1.5", "--prompt", "x", "--run"]).arg(&run));
    assert!(e.contains("--top-p"), "{e}");
    let e = run_err(bin().args(["generate", "--temperature", "-1", "--prompt", "x", "--run"]).arg(&run));
    assert!(e.contains("--temperature"), "{e}");
}

#[test]
fn bench_reports_every_mode_as_json() {
    let out = run_ok(bin().args(["bench", "--json", "--config"]).arg(repo("configs/tiny.toml")).args([
        "--set",
        "model.vocab_size=50",
        "--modes",
        "vanilla,shared,lors",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "4",
        "--rounds",
        "2",
    ]));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.iter().map(|r| r["mode"].as_str().unwrap()).collect::<Vec<_>>(), ["vanilla", "shared", "lors"]);
    for r in &rows {
        for k in ["train_tokens_per_sec", "step_ms_median", "prefill_tokens_per_sec", "decode_tokens_per_sec"] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k} in {r}");
        }
        // Every mode measured once per round (each in its own process), the median reported.
        assert_eq!(r["rounds"], 2, "{r}");
        let per_round: Vec<f64> = r["step_ms_rounds"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(per_round.len(), 2, "{r}");
        assert!(per_round.contains(&r["step_ms_median"].as_f64().unwrap()), "{r}");
        #[cfg(target_os = "linux")]
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Bad flags are refused before anything runs.
    let tiny = repo("configs/tiny.toml");
    let e = run_err(bin().args(["bench", "--rounds", "0", "--config"]).arg(&tiny));
    assert!(e.contains("--rounds"), "{e}");
    let e = run_err(bin().args(["bench", "--modes", "vanilla,lora", "--config"]).arg(&tiny));
    assert!(e.contains("--modes") && e.contains("lora"), "{e}");
}

/// LORS_LM_BLAS picks the CPU matmul library, which bench reports (and train's header shows);
/// a value it does not know is refused (also by every command that takes --device).
#[test]
fn the_matmul_library_is_chosen_by_lors_lm_blas_and_reported() {
    let tiny = repo("configs/tiny.toml");
    let matmul = |blas: &str| -> String {
        let out = run_ok(bin().env("LORS_LM_BLAS", blas).args(["bench", "--json", "--config"]).arg(&tiny).args([
            "--modes",
            "lors",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--prompt-tokens",
            "0",
            "--rounds",
            "1",
        ]));
        let row: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        row["matmul"].as_str().unwrap().to_string()
    };
    assert!(matmul("gemm").starts_with("gemm (LORS_LM_BLAS=gemm)"), "{}", matmul("gemm"));
    let auto = matmul("auto");
    // CI installs OpenBLAS and sets LORS_LM_REQUIRE_OPENBLAS; elsewhere either library is fine.
    if std::env::var_os("LORS_LM_REQUIRE_OPENBLAS").is_some() {
        assert!(auto.starts_with("OpenBLAS (libopenblas"), "{auto}");
        assert_eq!(matmul("openblas"), auto);
    } else if auto.starts_with("gemm") {
        assert!(auto.contains("libopenblas0"), "the fallback should say what to install: {auto}");
        let e = run_err(bin().env("LORS_LM_BLAS", "openblas").args(["bench", "--config"]).arg(&tiny));
        assert!(e.contains("LORS_LM_BLAS=openblas") && e.contains("libopenblas0"), "{e}");
    }
    let e = run_err(bin().env("LORS_LM_BLAS", "mkl").args(["bench", "--config"]).arg(&tiny));
    assert!(e.contains("LORS_LM_BLAS=mkl") && e.contains("auto, openblas or gemm"), "{e}");
}

/// Under mpirun (as one of several ranks) a build without the `mpi` feature says how to
/// rebuild instead of training N independent copies. (The mpi build joins the job instead:
/// tests/distributed.rs.)
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_be_one_of_several_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data, 5_000, 1_000);
    let run = tmp.path().join("run");
    for (size_var, rank_var) in
        [("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID")]
    {
        let err = run_err(train_tiny(&data, &run).env(size_var, "2").env(rank_var, "1"));
        assert!(err.contains("built without MPI") && err.contains("cargo build --release --features mpi"), "{err}");
        assert!(!run.exists(), "nothing may be written");
    }
    // One rank is a plain process.
    run_ok(train_tiny(&data, &run).env("OMPI_COMM_WORLD_SIZE", "1").args([
        "--set",
        "train.max_steps=2",
        "--set",
        "train.warmup_steps=1",
    ]));
}
