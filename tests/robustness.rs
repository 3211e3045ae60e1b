//! Robustness through the real binary: bad input is refused with a clear one-line error (one
//! table for every command), SIGKILL at random moments loses nothing and resumes bit-exactly,
//! and a diverging run stops cleanly with its last checkpoint intact.

mod common;

use common::{bin, prepare_text, repo_str, run_ok};

use candle_core::Device;
use lors_lm::train::RunDir;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn prepared(dir: &Path) -> PathBuf {
    prepare_text(dir, &"Call me Ishmael. Some years ago, never mind how long precisely. ".repeat(50), 300)
}

/// Every row: arguments, and text the error must contain. Each must exit non-zero with one
/// `error:` line and no panic or backtrace, and must not touch the files it was given.
#[test]
fn bad_input_is_refused_clearly_by_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    // Paths live for the whole test; leaking them keeps the table below plain `&str`s.
    let t = |p: &str| -> &'static str { Box::leak(tmp.path().join(p).to_string_lossy().into_owned().into_boxed_str()) };
    let data = prepared(tmp.path());
    let data = data.to_str().unwrap();
    let tiny: &str = Box::leak(repo_str("configs/tiny.toml").into_boxed_str());
    let run = t("run");
    let tiny_train = ["train", "--quiet", "--config", tiny, "--data", data];
    run_ok(bin().args(tiny_train).args(["--out", run, "--set", "train.max_steps=6"]));

    // Files for the table.
    std::fs::write(t("bad.toml"), "[model\nd_model = 3").unwrap();
    std::fs::write(t("notok.bin"), [0xff, 0xfe, 0x00, 0x41]).unwrap();
    std::fs::write(t("empty.txt"), "").unwrap();
    std::fs::create_dir_all(t("other-run")).unwrap();
    std::fs::write(t("other-run/config.toml"), "").unwrap();
    // A run whose checkpoint file is truncated.
    let broken = t("broken");
    run_ok(bin().args(tiny_train).args(["--out", broken, "--set", "train.max_steps=6"]));
    let ckpt = format!("{broken}/checkpoints/6/model.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 2]).unwrap();
    // Token data whose length does not match meta.json, and one with ids beyond the vocabulary.
    let short = t("short-data");
    copy_dir(Path::new(data), Path::new(short));
    std::fs::write(format!("{short}/train-00000.bin"), [1u8, 0, 2, 0, 3]).unwrap();

    let rows: Vec<(Vec<&str>, &[&str])> = vec![
        // prepare
        (vec!["prepare", "--input", "/no/such/file.txt", "--out", t("p1")], &["/no/such/file.txt"]),
        (vec!["prepare", "--input", t("empty.txt"), "--out", t("p2")], &["empty", "--input"]),
        (vec!["prepare", "--input", t("notok.bin"), "--out", t("p3")], &["notok.bin", "--lossy"]),
        (vec!["prepare", "--input", t("corpus.txt"), "--out", t("p4"), "--vocab-size", "10"], &["--vocab-size"]),
        (vec!["prepare", "--input", t("corpus.txt"), "--out", t("p5"), "--tokenizer", t("bad.toml")], &["bad.toml"]),
        (vec!["prepare", "--input", t("corpus.txt"), "--out", data], &["--force"]),
        // train: config
        (vec!["train", "--config", "/no/such.toml", "--data", data], &["/no/such.toml"]),
        (vec!["train", "--config", t("bad.toml"), "--data", data], &["bad.toml", "TOML"]),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r1"), "--set", "model.widht=3"], &["widht"]),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r2"), "--set", "train.lr=\"x\""], &["lr"]),
        (
            vec!["train", "--config", tiny, "--data", data, "--out", t("r3"), "--set", "model.n_kv_heads=3"],
            &["n_kv_heads"],
        ),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r4"), "--set", "lors.rank=0"], &["rank"]),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r5"), "--set", "lors.rank=32"], &["min(out, in)"]),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r6"), "--set", "train.min_lr=1"], &["min_lr"]),
        (
            vec!["train", "--config", tiny, "--data", data, "--out", t("r7"), "--set", "train.batch_size=0"],
            &["batch_size"],
        ),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r8"), "--set", "model.vocab_size=7"], &["vocab"]),
        // train: data, run directory, device
        (vec!["train", "--config", tiny, "--data", t("nodata"), "--out", t("r9")], &["meta.json"]),
        (vec!["train", "--config", tiny, "--data", short, "--out", t("r10")], &["train-00000.bin"]),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("other-run")], &["--resume", "--force"]),
        (vec!["train", "--resume", "--out", t("nothing")], &["resume"]),
        (vec!["train", "--resume", "--out", &broken], &["model.safetensors", "corrupt"]),
        (vec!["train", "--resume", "--out", run, "--set", "lors.rank=3"], &["lors_a", "[4, 32]", "[3, 32]"]),
        (vec!["train", "--config", tiny, "--data", data, "--out", t("r11"), "--device", "cuda"], &["cuda"]),
        // generate / eval / export
        (vec!["generate", "--run", t("missing-run"), "--prompt", "x"], &["missing-run"]),
        (vec!["generate", "--run", run, "--checkpoint", "5", "--prompt", "x"], &["step 5"]),
        (vec!["generate", "--run", run, "--prompt-file", t("nope.txt")], &["nope.txt"]),
        (vec!["generate", "--run", run, "--prompt", "x", "--top-p", "0"], &["--top-p"]),
        (vec!["generate", "--run", run, "--prompt", "x", "--temperature", "-0.5"], &["--temperature"]),
        (vec!["eval", "--run", run, "--text", t("empty.txt")], &["fewer than one window"]),
        (vec!["eval", "--run", &run], &["--data"]),
        (vec!["export", "--run", run, "--out", data], &["--force"]),
    ];
    let run_ckpt_before = std::fs::read(format!("{run}/checkpoints/6/model.safetensors")).unwrap();
    let meta_before = std::fs::read(format!("{data}/meta.json")).unwrap();
    for (args, needles) in &rows {
        let out = bin().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?} panicked: {err}");
        assert!(err.contains("error"), "{args:?}: no error line: {err}");
        for n in *needles {
            assert!(err.contains(n), "{args:?}: error does not mention {n:?}: {err}");
        }
    }
    // Nothing already saved was touched.
    assert_eq!(std::fs::read(format!("{run}/checkpoints/6/model.safetensors")).unwrap(), run_ckpt_before);
    assert_eq!(std::fs::read(format!("{data}/meta.json")).unwrap(), meta_before);
    assert!(!Path::new(t("p1")).exists() && !Path::new(t("r4")).exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every checkpoint on disk loads (weights, optimizer state and state.json).
fn all_checkpoints_readable(run: &Path) {
    let run = RunDir::at(run);
    for step in run.checkpoints().unwrap() {
        let ckpt = run.checkpoint(Some(step)).unwrap();
        ckpt.params(&Device::Cpu).unwrap_or_else(|e| panic!("checkpoint {step}: {e:#}"));
        ckpt.optimizer(&Device::Cpu).unwrap_or_else(|e| panic!("checkpoint {step}: {e:#}"));
        ckpt.state().unwrap_or_else(|e| panic!("checkpoint {step}: {e:#}"));
    }
    if let Some(latest) = run.latest_step().unwrap() {
        assert!(run.checkpoints().unwrap().contains(&latest), "latest points at a missing checkpoint");
    }
}

fn final_tensors(run: &Path, step: usize) -> Vec<(String, Vec<f32>)> {
    let ckpt = RunDir::at(run).checkpoint(Some(step)).unwrap();
    let mut out = vec![];
    for (prefix, map) in [("p.", ckpt.params(&Device::Cpu).unwrap()), ("o.", ckpt.optimizer(&Device::Cpu).unwrap())] {
        for (name, t) in map {
            out.push((format!("{prefix}{name}"), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let steps = 60;
    let train = |run: &Path, resume: bool| {
        let mut c = bin();
        c.args(["train", "--quiet", "--out"]).arg(run);
        if resume {
            c.arg("--resume");
        } else {
            c.arg("--config").arg(repo_str("configs/tiny.toml")).arg("--data").arg(&data);
            // A checkpoint every step, so kills land inside checkpoint writes too.
            c.args(["--set", &format!("train.max_steps={steps}"), "--set", "train.ckpt_interval=1"]);
            c.args(["--set", "train.eval_interval=7", "--set", "train.keep_checkpoints=2"]);
        }
        c
    };
    let full = tmp.path().join("full");
    assert!(train(&full, false).status().unwrap().success());

    let run = tmp.path().join("killed");
    let mut rng = lors_lm::rng::Rng::new(2024);
    let mut kills = 0;
    let mut finished = false;
    for attempt in 0..40 {
        let resume = RunDir::at(&run).latest_step().unwrap().is_some();
        if attempt > 0 && !resume {
            // Killed before the first checkpoint: start afresh.
            let _ = std::fs::remove_dir_all(&run);
        }
        let mut child = train(&run, resume).stdout(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20 + rng.below(250)));
        if child.try_wait().unwrap().is_some() {
            finished = true;
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        all_checkpoints_readable(&run);
        if RunDir::at(&run).latest_step().unwrap() == Some(steps) {
            finished = true;
            break;
        }
    }
    if !finished {
        assert!(train(&run, true).status().unwrap().success());
    }
    assert!(kills >= 3, "only {kills} kills landed mid-run");
    all_checkpoints_readable(&run);
    assert_eq!(final_tensors(&run, steps), final_tensors(&full, steps), "weights differ after {kills} kills");
}

#[test]
fn a_diverging_run_skips_bad_steps_then_stops_with_its_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let common = ["--config", &repo_str("configs/tiny.toml"), "--data", data.to_str().unwrap(), "--out", r];
    let mut a = vec!["train", "--quiet"];
    a.extend(common);
    a.extend(["--set", "train.max_steps=6"]);
    run_ok(bin().args(&a));
    let before = std::fs::read(run.join("checkpoints/6/model.safetensors")).unwrap();
    // An absurd learning rate and no clipping: the weights blow up to inf/NaN.
    let out = bin()
        .args(["train", "--resume", "--out", r])
        .args(["--set", "train.max_steps=400", "--set", "train.lr=1e30", "--set", "train.min_lr=1e30"])
        .args(["--set", "train.grad_clip=0", "--set", "train.max_bad_steps=3", "--set", "train.ckpt_interval=1000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "should stop: {stdout}");
    assert!(err.contains("4 consecutive steps") && err.contains("checkpoints/6"), "{err}");
    assert!(stdout.contains("update skipped"), "{stdout}");
    assert_eq!(std::fs::read(run.join("checkpoints/6/model.safetensors")).unwrap(), before);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_flushes_the_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    let mut child = bin()
        .args(["train", "--config", &repo_str("configs/tiny.toml"), "--data", data.to_str().unwrap(), "--out"])
        .arg(&run)
        .args([
            "--set",
            "train.max_steps=1000000",
            "--set",
            "train.log_interval=1",
            "--set",
            "train.eval_interval=1000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is training, then send SIGINT.
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    while let Some(Ok(l)) = lines.next() {
        if l.starts_with("step") && l.contains("/1000000") && !l.contains("     1/") {
            break;
        }
    }
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopped = rest.iter().find(|l| l.contains("stopped at step")).unwrap_or_else(|| panic!("{rest:?}"));
    let step: usize = stopped.split("stopped at step ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert_eq!(RunDir::at(&run).latest_step().unwrap(), Some(step));
    all_checkpoints_readable(&run);
    // The event file holds every step up to the interrupted one.
    let tb = std::fs::read_dir(run.join("tb")).unwrap().flatten().next().unwrap().path();
    let events = common::tb_reader::read_event_file(&tb).unwrap();
    let logged = events.scalars.iter().filter(|(t, _, _)| t == "train/loss").count();
    assert_eq!(logged, step);
}

/// Run `cmd` with a tmpfs of `size` mounted at `mnt`, in a private mount namespace (so the
/// mount needs no cleanup and vanishes with the process), then copy `mnt/run` to `copy` (the
/// tmpfs is gone afterwards). `unshare --mount` works as root; elsewhere `unshare --mount
/// --map-root-user` does where unprivileged user namespaces are allowed. Panics, saying so,
/// where neither can mount.
fn run_on_small_tmpfs(mnt: &Path, size: &str, cmd: &Command, copy: &Path) -> std::process::Output {
    std::fs::create_dir_all(mnt).unwrap();
    let mounted = copy.with_extension("mounted");
    // $1 size, $2 mount point, $3 marker written once mounted, $4 copy, then the command.
    let script = r#"mount -t tmpfs -o "size=$1" tmpfs "$2" || exit 1
: > "$3"
m=$2 c=$4; shift 4
"$@"; rc=$?
cp -a "$m/run" "$c" 2>/dev/null
exit $rc"#;
    let mut tried = Vec::new();
    for flags in [&["--mount"][..], &["--mount", "--map-root-user"]] {
        let mut unshare = Command::new("unshare");
        unshare.args(flags).args(["sh", "-c", script, "sh", size]).arg(mnt).arg(&mounted).arg(copy);
        unshare.arg(cmd.get_program()).args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => unshare.env(key, v),
                None => unshare.env_remove(key),
            };
        }
        let out = unshare.output().expect("run unshare (util-linux)");
        if mounted.exists() {
            return out;
        }
        tried.push(format!("unshare {}: {}", flags.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    panic!(
        "cannot mount a tmpfs for the full-disk test: run as root, or allow unprivileged user \
         namespaces (sysctl kernel.unprivileged_userns_clone=1 / \
         kernel.apparmor_restrict_unprivileged_userns=0)\n{}",
        tried.join("\n")
    );
}

#[test]
fn a_full_disk_while_saving_gives_a_clear_error_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let mnt = tmp.path().join("small");
    let mut train = bin();
    train
        .args([
            "train",
            "--quiet",
            "--config",
            &repo_str("configs/tiny.toml"),
            "--data",
            data.to_str().unwrap(),
            "--out",
        ])
        .arg(mnt.join("run"))
        .args(["--set", "train.max_steps=200", "--set", "train.ckpt_interval=1", "--set", "train.keep_checkpoints=0"]);
    let run = tmp.path().join("run-copy");
    let out = run_on_small_tmpfs(&mnt, "1200k", &train, &run);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let steps = RunDir::at(&run).checkpoints().unwrap();
    all_checkpoints_readable(&run);
    assert!(!out.status.success(), "the disk should have filled up");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("disk full or not writable"), "{err}");
    assert!(!steps.is_empty(), "some checkpoints fit before the disk filled: {err}");
}
