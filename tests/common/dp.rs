//! Helpers of the data-parallel tests (tests/distributed.rs under mpirun, tests/launch.rs
//! under `lors-lm launch`): a tiny learnable corpus, a run's metrics and weights, and the
//! one-process reference that steps on the windows every rank draws.

use lors_lm::config::Config;
use lors_lm::train::batches::{rank_part, sample_batch_in};
use lors_lm::train::distributed::data_stream;
use lors_lm::train::{session, RunDir, Source, Trainer};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::repo;

pub fn train_args(data: &Path, out: &Path, sets: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["train".into(), "--config".into(), super::repo_str("configs/tiny.toml")];
    a.extend(["--data".into(), data.display().to_string(), "--out".into(), out.display().to_string()]);
    for s in sets {
        a.extend(["--set".into(), s.to_string()]);
    }
    a
}

/// A learnable synthetic language over 50 tokens (as tests/train_cli.rs).
pub fn synthetic_data(dir: &Path) {
    let (mut x, mut t, mut seq) = (12345u64, 1u32, vec![]);
    for _ in 0..22_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        t = if (x >> 33).is_multiple_of(50) { ((x >> 40) % 50) as u32 } else { (7 * t + 3) % 50 };
        seq.push(t);
    }
    lors_lm::data::write_prepared_dir(dir, &seq[..20_000], &seq[20_000..], 50, None).unwrap();
}

pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn field(run: &Path, key: &str) -> Vec<serde_json::Value> {
    metrics(run).into_iter().filter_map(|m| m.get(key).cloned()).collect()
}

pub fn losses(run: &Path) -> Vec<f64> {
    metrics(run).iter().filter_map(|m| m.get("loss")?.as_f64()).collect()
}

pub fn latest_params(run: &Path) -> HashMap<String, Tensor> {
    RunDir::at(run).checkpoint(None).unwrap().params(&Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for (name, t) in a {
        let d = (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        m = m.max(d.to_scalar::<f32>().unwrap());
    }
    m
}

/// One process stepping on the windows that `ranks` ranks draw (their streams concatenated, each
/// rank's windows inside its own part of the training split).
pub fn reference_weights(data: &Path, sets: &[String], ranks: usize, steps: usize) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut cfg = Config::load(&repo("configs/tiny.toml"), sets).unwrap();
    let split = session::open_data(data, &mut cfg).unwrap();
    let (b, t, accum) = (cfg.train.batch_size, cfg.train.seq_len, cfg.train.grad_accum);
    let mut streams: Vec<_> = (0..ranks).map(|r| data_stream(cfg.train.seed, r)).collect();
    let mut trainer = Trainer::new(cfg, Source::Random { vocab: 50 }, &dev).unwrap();
    for _ in 0..steps {
        let micro: Vec<(Tensor, Tensor)> = (0..accum)
            .map(|_| {
                let n = split.train.len();
                let parts: Vec<_> = streams
                    .iter_mut()
                    .enumerate()
                    .map(|(r, rng)| sample_batch_in(&split.train, rank_part(n, r, ranks), rng, b, t, &dev).unwrap())
                    .collect();
                let xs: Vec<_> = parts.iter().map(|p| p.0.clone()).collect();
                let ys: Vec<_> = parts.iter().map(|p| p.1.clone()).collect();
                (Tensor::cat(&xs, 0).unwrap(), Tensor::cat(&ys, 0).unwrap())
            })
            .collect();
        trainer.step_on(&micro).unwrap();
    }
    trainer.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Wait up to `limit` for `child`; the exit status and the time it took.
pub fn wait_for(child: &mut Child, limit: Duration, log: &Path) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the launcher still running after {limit:?}: {}", read(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The settings of a run that goes on until it is stopped: a checkpoint every 25 steps.
pub const LONG_RUN: [&str; 3] = ["train.max_steps=1000000", "train.ckpt_interval=25", "train.eval_interval=100000"];

/// Start `cmd` (a launch of a `LONG_RUN` into `run`) with its output in `tmp`/`log_name`, and
/// return once it has written its second checkpoint.
pub fn start_until_second_checkpoint(mut cmd: Command, tmp: &Path, log_name: &str, run: &Path) -> (Child, PathBuf) {
    let log = tmp.join(log_name);
    let f = File::create(&log).unwrap();
    let child = cmd.stdout(Stdio::from(f.try_clone().unwrap())).stderr(Stdio::from(f)).spawn().unwrap();
    let t0 = Instant::now();
    while RunDir::at(run).latest_step().ok().flatten().unwrap_or(0) < 50 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no second checkpoint after 120 s: {}", read(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, log)
}

/// The pid of a rank: a process with `marker` (its run's --out) in its command line but not
/// `launcher`, and one of the `vars` (`NAME=value`) in its environment.
pub fn pid_with_env(marker: &str, launcher: &str, vars: &[String]) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).into_owned();
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let ours = cmdline.contains(marker) && !cmdline.contains(launcher);
        let has = |v: &String| environ.split(|&b| b == 0).any(|p| p == v.as_bytes());
        (ours && vars.iter().any(has)).then_some(pid)
    })
}

/// After a stop request to a 2-rank run: rank 0 stopped at some step with a checkpoint there,
/// rank 1 with it, and metrics.jsonl holds every step up to it. Returns the step.
pub fn assert_ranks_stopped_together(out: &str, run: &Path) -> usize {
    let stopped: usize = out
        .split("stopped at step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("rank 0 did not stop cleanly: {out}"));
    assert!(out.contains(&format!("rank 1: stopped with the other ranks at step {stopped}")), "{out}");
    assert_eq!(RunDir::at(run).latest_step().unwrap(), Some(stopped), "{out}");
    assert_eq!(losses(run).len(), stopped, "metrics.jsonl flushed up to the last step");
    stopped
}
