//! Helpers shared by integration tests.
#![allow(dead_code)]

pub mod dp;
pub mod mutate;
pub mod tb_reader;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `lors-lm` binary built for this test run.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lors-lm"))
}

/// A path inside the repository (e.g. `repo("configs/tiny.toml")`).
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// [`repo`] as a `String`, for argument lists of plain `&str`s.
pub fn repo_str(p: &str) -> String {
    repo(p).to_string_lossy().into_owned()
}

/// Runs `cmd`, asserts it succeeded (showing the command, stdout and stderr if not) and returns
/// its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run lors-lm");
    assert!(
        out.status.success(),
        "command failed: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, asserts it failed with an error rather than a panic, and returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run lors-lm");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure: {cmd:?}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    err
}

/// `text` written to DIR/corpus.txt and prepared by `lors-lm prepare --vocab-size vocab` into
/// DIR/data, which is returned.
pub fn prepare_text(dir: &Path, text: &str, vocab: usize) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    let data = dir.join("data");
    run_ok(bin().args(["prepare", "--vocab-size", &vocab.to_string(), "--input"]).arg(&corpus).arg("--out").arg(&data));
    data
}

/// `lors-lm train --quiet` with the tiny config on `data`, writing to `run`.
pub fn train_tiny(data: &Path, run: &Path) -> Command {
    let mut c = bin();
    c.args(["train", "--quiet", "--config"])
        .arg(repo("configs/tiny.toml"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(run);
    c
}

/// The test Python (`.venv-tb` from scripts/setup_tb_venv.sh: tensorboard, numpy, safetensors),
/// from `LORS_LM_TB_PYTHON` or the repo's `.venv-tb`. Panics, saying what to run, when there is
/// none: `bash scripts/test.sh` (the README's test command) creates it, and a test that needs it
/// must fail rather than pass without checking.
pub fn tb_python() -> PathBuf {
    if let Some(python) = std::env::var_os("LORS_LM_TB_PYTHON") {
        return python.into();
    }
    let venv = repo(".venv-tb/bin/python");
    assert!(
        venv.exists(),
        "no Python with tensorboard at {}: run `bash scripts/setup_tb_venv.sh` (scripts/test.sh, the \
         README's test command, does), or set LORS_LM_TB_PYTHON to a python with tensorboard, numpy \
         and safetensors",
        venv.display()
    );
    venv
}

/// Every file of a directory tree with its bytes, to compare a directory before and after.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Asserts a command succeeded, showing its stderr if not.
#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Asserts a clean refusal (exit code 1, an `error:` line, no panic) naming every needle, and
/// returns stderr.
#[track_caller]
pub fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(stderr.contains("error:"), "stderr:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    stderr
}

/// Runs a command, killing it after `limit` (a hang is a failure, not a stuck test run).
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("command hung for {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
