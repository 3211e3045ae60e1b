//! Nothing outside a run directory is ever deleted, and nothing a command reads is
//! overwritten: every command with `--force` (prepare, train, compress, export) and the sweep,
//! run with an output directory that holds a foreign file and with one that is or contains
//! the command's source, leaves the foreign file and the source byte-identical. Also: a
//! `--resume` checks RUN_DIR/config.toml against the checkpoint's own copy; `--init-from` works
//! with the shipped configs (vocabulary taken from the data); compress says what its table's
//! percentages are; a checkpoint header whose offsets overflow is an error.

mod common;

use common::{bin, prepare_text, repo, run_err, run_ok, snapshot, train_tiny};
use std::path::{Path, PathBuf};

const TEXT: &str = "It is a way I have of driving off the spleen and regulating the circulation. \
                    Whenever I find myself growing grim about the mouth, I account it high time to get to sea. ";

/// tmp/data (prepared), tmp/src (a 6-step vanilla run) and tmp/keep/notes.txt (a user's file).
fn setup(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = prepare_text(tmp, &TEXT.repeat(40), 300);
    let src = tmp.join("src");
    run_ok(train_tiny(&data, &src).args(["--set", "train.max_steps=6", "--set", "lors.mode=vanilla"]));
    let keep = tmp.join("keep");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("notes.txt"), "my notes").unwrap();
    (data, src, keep)
}

fn compress(src: &Path, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args(["compress", "--rank", "2", "--from"]).arg(src).arg("--out").arg(out);
    c
}

#[test]
fn force_never_deletes_a_foreign_file_or_a_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, src, keep) = setup(tmp.path());
    let whole = snapshot(tmp.path());
    let untouched = |what: &str| assert!(snapshot(tmp.path()) == whole, "{what} changed files it does not own");

    // The example: `compress --out runs --force` where runs/ holds the source and
    // other files deleted all of them. Now refused, as is an --out that is the source, and one
    // that holds a run plus a user's file.
    let e = run_err(compress(&src, tmp.path()).arg("--force"));
    assert!(e.contains("not a run directory") && e.contains("src"), "{e}");
    untouched("compress --out <parent of the source> --force");
    let e = run_err(compress(&src, &src).arg("--force"));
    assert!(e.contains("--from") && e.contains("lies in the output directory"), "{e}");
    untouched("compress --out <the source> --force");
    let e = run_err(compress(&src, &keep).arg("--force"));
    assert!(e.contains("notes.txt"), "{e}");
    untouched("compress --out <a user's directory> --force");
    let e = run_err(compress(&src, Path::new(".")).current_dir(tmp.path()).arg("--force"));
    assert!(e.contains("not a run directory"), "{e}");
    untouched("compress --out . --force");

    // train: the same refusals; --init-from may not be the --out it would clear.
    let e = run_err(train_tiny(&data, tmp.path()).arg("--force"));
    assert!(e.contains("--data") && e.contains("lies in the output directory"), "{e}");
    let e = run_err(train_tiny(&data, &keep).arg("--force"));
    assert!(e.contains("notes.txt"), "{e}");
    let e = run_err(train_tiny(&data, &src).args(["--force", "--set", "lors.mode=vanilla", "--init-from"]).arg(&src));
    assert!(e.contains("--init-from") && e.contains("lies in the output directory"), "{e}");
    let e = run_err(train_tiny(&data, &data).arg("--force"));
    assert!(e.contains("--data") || e.contains("not a run directory"), "{e}");
    untouched("train --force");

    // export: an hf-llama directory overlapping the run (its tokenizer.json copied onto itself
    // would be emptied), a GGUF file inside the run.
    let e = run_err(bin().args(["export", "--force", "--run"]).arg(&src).arg("--out").arg(&src));
    assert!(e.contains("overlap"), "{e}");
    let e = run_err(bin().args(["export", "--force", "--run"]).arg(&src).arg("--out").arg(tmp.path()));
    assert!(e.contains("overlap"), "{e}");
    let e = run_err(
        bin().args(["export", "--format", "gguf", "--force", "--run"]).arg(&src).arg("--out").arg(src.join("m.gguf")),
    );
    assert!(e.contains("overlap"), "{e}");
    untouched("export --force into the run");
    // ...and --force into a directory of the user's writes the export's files beside theirs.
    run_ok(bin().args(["export", "--force", "--run"]).arg(&src).arg("--out").arg(&keep));
    assert_eq!(std::fs::read_to_string(keep.join("notes.txt")).unwrap(), "my notes");
    assert!(keep.join("model.safetensors").is_file() && keep.join("config.json").is_file());

    // prepare: an --out holding the corpus and a user's file (both survive a --force rerun);
    // an --input that is a file prepare writes is refused.
    let corpus = tmp.path().join("corpus.txt");
    let prep = |out: &Path, input: &Path| {
        let mut c = bin();
        c.args(["prepare", "--force", "--vocab-size", "300", "--input"]).arg(input).arg("--out").arg(out);
        c
    };
    run_ok(&mut prep(&keep, &corpus));
    std::fs::copy(&corpus, keep.join("corpus.txt")).unwrap();
    run_ok(&mut prep(&keep, &keep.join("corpus.txt")));
    run_ok(&mut prep(&keep, &keep));
    assert_eq!(std::fs::read_to_string(keep.join("notes.txt")).unwrap(), "my notes");
    assert_eq!(std::fs::read(keep.join("corpus.txt")).unwrap(), std::fs::read(&corpus).unwrap());
    let e = run_err(&mut prep(&keep, &keep.join("train.bin")));
    assert!(e.contains("train.bin that prepare writes"), "{e}");

    // --force over a run replaces that run's files and nothing else; a run directory the user
    // put a file into is refused rather than cleared.
    let out = tmp.path().join("lors");
    run_ok(&mut compress(&src, &out));
    run_ok(compress(&src, &out).arg("--force"));
    std::fs::write(out.join("mine.txt"), "x").unwrap();
    let e = run_err(compress(&src, &out).arg("--force"));
    assert!(e.contains("mine.txt"), "{e}");
    assert!(out.join("mine.txt").is_file() && out.join("checkpoints").is_dir());
}

/// The sweep starts its runs over (an interrupted run without a checkpoint is cleared) inside
/// its --out: a foreign file there, and the data directory kept inside it, survive; a run
/// directory holding a foreign file is refused, not cleared.
#[test]
fn a_sweep_keeps_foreign_files_and_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let data = out.join("data");
    let tokens: Vec<u32> = (0..6000u64).map(|i| ((i * 2654435761) >> 7) as u32 % 4096).collect();
    lors_lm::data::write_prepared_dir(&data, &tokens[..5000], &tokens[5000..], 4096, None).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let seed_dir = out.join("shared").join("seed1");
    std::fs::create_dir_all(&seed_dir).unwrap();
    std::fs::write(seed_dir.join("draft.txt"), "mine too").unwrap();
    let before = (snapshot(&data), snapshot(&seed_dir));
    let sweep = |only: &str| {
        let mut c = bin();
        c.args(["sweep", "--smoke", "--only", only, "--plan"])
            .arg(repo("configs/sweep-moby.toml"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .arg("--docs")
            .arg(tmp.path().join("docs"));
        c
    };
    run_ok(&mut sweep("vanilla"));
    assert!(out.join("vanilla/seed1/result.json").is_file());
    let e = run_err(&mut sweep("shared"));
    assert!(e.contains("draft.txt"), "{e}");
    assert!((snapshot(&data), snapshot(&seed_dir)) == before, "the sweep changed its data or a foreign file");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
}

/// A `--resume` without `--config` reads RUN_DIR/config.toml only when it agrees with the
/// config saved with the checkpoint: an empty (crash-damaged) or edited file is refused,
/// naming the file and the keys; a missing one resumes with the checkpoint's config.
#[test]
fn resume_checks_the_run_config_against_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_text(tmp.path(), &TEXT.repeat(40), 300);
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args(["--set", "train.max_steps=8", "--stop-at", "4"]));
    let config = run.join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    let resume = || {
        let mut c = bin();
        c.args(["train", "--quiet", "--resume", "--out"]).arg(&run);
        c
    };
    std::fs::write(&config, "").unwrap();
    let before = snapshot(&run);
    let e = run_err(&mut resume());
    assert!(e.contains("config.toml") && e.contains("checkpoint 4") && e.contains("model.d_model"), "{e}");
    std::fs::write(&config, good.replace("lr = 0.003", "lr = 0.1")).unwrap();
    let e = run_err(&mut resume());
    assert!(e.contains("train.lr (0.1 vs 0.003)") && e.contains("--config"), "{e}");
    std::fs::remove_file(&config).unwrap();
    let mut without = before.clone();
    without.retain(|(p, _)| p != &config);
    assert!(snapshot(&run) == without, "a refused --resume changed the run directory");
    let out = run_ok(&mut resume());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint 4"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), good, "config.toml rewritten from the checkpoint's");
    assert!(run.join("checkpoints/8").is_dir());
    assert!(!run.join(".config.toml.tmp").exists());
}

/// `train --config configs/X.toml --init-from RUN` with a shipped config (vocab_size = 0, "take
/// it from the data") is not refused for a vocabulary of 0.
#[test]
fn init_from_works_with_a_shipped_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_text(tmp.path(), &TEXT.repeat(40), 300);
    let src = tmp.path().join("src");
    run_ok(train_tiny(&data, &src).args(["--set", "train.max_steps=6"]));
    let up = tmp.path().join("up");
    run_ok(train_tiny(&data, &up).args(["--set", "train.max_steps=6", "--init-from"]).arg(&src));
    let vocab = lors_lm::data::Meta::load(&data).unwrap().vocab_size;
    let cfg = std::fs::read_to_string(up.join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("vocab_size = {vocab}")), "{cfg}");
}

/// The compress table says what its percentages are.
#[test]
fn the_compress_table_names_its_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, src, _) = setup(tmp.path());
    let out = run_ok(&mut compress(&src, &tmp.path().join("c")));
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap();
    assert!(header.contains("rank") && header.contains("residual's energy"), "{text}");
    assert!(text.contains(" r2 "), "{text}");
}

/// A safetensors header whose data offsets overflow when added to the header size (0 ..
/// 2^64 - 6) is an error naming the file, not a wrapped bound and a failed allocation.
#[test]
fn overflowing_checkpoint_offsets_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_text(tmp.path(), &TEXT.repeat(40), 300);
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args(["--set", "train.max_steps=2", "--set", "train.warmup_steps=0"]));
    let model = run.join("checkpoints/2/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = header.keys().find(|k| *k != "__metadata__").unwrap().clone();
    header[&name]["data_offsets"] = serde_json::json!([0u64, u64::MAX - 5]);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&model, out).unwrap();
    let e = run_err(bin().args(["generate", "--max-new-tokens", "2", "--prompt", "x", "--run"]).arg(&run));
    assert!(e.contains("model.safetensors") && e.contains("18446744073709551610"), "{e}");
}
