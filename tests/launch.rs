//! Data-parallel training without MPI: `lors-lm launch --nproc N -- train ...` starts N ranks
//! that meet over TCP (torchrun-style variables), as a GPU machine without an MPI library
//! runs them (NCCL then moves the gradients). On CPU ranks here: equivalence with one process
//! on the same windows, world size 1 equal to a plain run, a killed rank ending the job with
//! a resumable checkpoint, Ctrl-C, and the launcher's refusals.

mod common;

use common::dp::*;
use lors_lm::train::RunDir;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// One launch at a time: the tests share two cores, and the fault tests time things.
static ONE: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// `lors-lm launch --nproc n -- train` (tiny config), one thread per rank.
fn launch(n: usize, data: &Path, out: &Path, sets: &[&str]) -> Command {
    let mut c = common::bin();
    c.env("RAYON_NUM_THREADS", "1").args(["launch", "--nproc", &n.to_string(), "--"]);
    c.args(train_args(data, out, sets));
    c
}

#[test]
fn two_launched_ranks_equal_one_process_that_sees_both_ranks_windows() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let sets = ["train.max_steps=5", "train.batch_size=2", "train.grad_accum=2", "train.eval_interval=100"];
    let run = tmp.path().join("run");
    let out = common::run_ok(&mut launch(2, &data, &run, &sets));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ranks     2 (TCP through rank 0 at 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("global 8 sequences = 2 ranks × 2 × 2 accum, 128 tokens/step"), "{stdout}");
    let launched = latest_params(&run);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let same_windows = max_abs_diff(&launched, &reference_weights(&data, &sets, 2, 5));
    assert!(same_windows < 1e-5, "2 ranks vs one process on their 2b windows: max |Δw| = {same_windows}");
    // The check can fail: rank 0's windows alone give other weights.
    let rank0_only = max_abs_diff(&launched, &reference_weights(&data, &sets, 1, 5));
    assert!(rank0_only > 1e-4, "one rank's windows should give other weights (max |Δw| = {rank0_only})");
    // Rank 1 wrote nothing beside rank 0's run: one metrics line per step.
    assert_eq!(losses(&run).len(), 5);
    assert_eq!(field(&run, "world_size"), vec![serde_json::json!(2)]);
}

#[test]
fn one_launched_rank_trains_exactly_as_a_plain_process() {
    // World size 1 goes through the whole data-parallel path (all-reduce, weight checks,
    // gathered checkpoints): on a GPU that is NCCL at world size 1.
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let sets = ["train.max_steps=8", "train.eval_interval=4", "train.grad_accum=2"];
    let (plain, one) = (tmp.path().join("plain"), tmp.path().join("one"));
    common::run_ok(common::bin().env("RAYON_NUM_THREADS", "1").args(train_args(&data, &plain, &sets)));
    let out = common::run_ok(&mut launch(1, &data, &one, &sets));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ranks     1 (TCP"), "the launch must be data-parallel");
    assert_eq!(losses(&one), losses(&plain));
    assert_eq!(max_abs_diff(&latest_params(&one), &latest_params(&plain)), 0.0);
}

/// The pid of the launched rank `rank` of the run whose --out is `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    pid_with_env(marker, "launch", &[format!("RANK={rank}")])
}

/// A long 2-rank launch logging to a file, once it has written its second checkpoint.
fn start_long_run(tmp: &Path, data: &Path, run: &Path) -> (Child, std::path::PathBuf) {
    let mut c = launch(2, data, run, &LONG_RUN);
    c.arg("--quiet");
    start_until_second_checkpoint(c, tmp, "launch.log", run)
}

#[test]
fn a_killed_rank_ends_the_launch_and_the_run_resumes() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let run = tmp.path().join("killed-run");
    let (mut child, log) = start_long_run(tmp.path(), &data, &run);
    let victim = rank_pid("killed-run", 1).expect("rank 1's process");
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let (status, took) = wait_for(&mut child, Duration::from_secs(60), &log);
    eprintln!("rank 1 SIGKILLed: the launch exited ({status:?}) after {took:?}");
    let out = read(&log);
    assert_eq!(status.code(), Some(137), "the launcher exits with the killed rank's code: {out}");
    assert!(out.contains("rank 1 exited with code 137: stopping the other ranks"), "{out}");
    assert!(out.contains("rank 1 closed its connection"), "rank 0 must name the lost rank: {out}");
    assert!(rank_pid("killed-run", 0).is_none(), "rank 0 outlived the launch");
    // The newest checkpoint is complete, and a new launch continues from it.
    let step = RunDir::at(&run).latest_step().unwrap().unwrap();
    let stop = (step + 3).to_string();
    let mut c = common::bin();
    c.env("RAYON_NUM_THREADS", "1").args(["launch", "-n", "2", "--", "train", "--resume", "--stop-at", &stop, "--out"]);
    common::run_ok(c.arg(&run));
    assert_eq!(RunDir::at(&run).latest_step().unwrap(), Some(step + 3));
}

#[test]
fn ctrl_c_to_the_launcher_checkpoints_and_every_rank_exits_cleanly() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let run = tmp.path().join("interrupted-run");
    let (mut child, log) = start_long_run(tmp.path(), &data, &run);
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let (status, took) = wait_for(&mut child, Duration::from_secs(60), &log);
    eprintln!("SIGINT to the launcher: exited ({status:?}) after {took:?}");
    let out = read(&log);
    assert!(status.success(), "{status:?}: {out}");
    assert_ranks_stopped_together(&out, &run);
}

#[test]
fn the_launcher_refuses_what_cannot_work_with_the_way_out() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let err = common::run_err(common::bin().args(["launch", "--nproc", "0", "--", "train"]));
    assert!(err.contains("--nproc must be at least 1"), "{err}");
    let err = common::run_err(common::bin().args(["launch", "-n", "2", "--", "eval", "--run", "x"]));
    assert!(err.contains("must be `train ...`, not `eval`"), "{err}");
    // A port another program holds: rank 0 says so, the launch ends (no hang), nothing is written.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let run = tmp.path().join("busy");
    let mut c = common::bin();
    c.args(["launch", "-n", "2", "--master-port", &port, "--grace", "5", "--"]);
    c.args(train_args(&data, &run, &[]));
    let (status, took) = {
        let log = tmp.path().join("busy.log");
        let f = File::create(&log).unwrap();
        let mut child = c.stdout(Stdio::from(f.try_clone().unwrap())).stderr(Stdio::from(f)).spawn().unwrap();
        let r = wait_for(&mut child, Duration::from_secs(60), &log);
        let out = read(&log);
        assert!(out.contains(&format!("rank 0 cannot listen on 127.0.0.1:{port}: the port is in use")), "{out}");
        r
    };
    assert!(!status.success() && took < Duration::from_secs(30), "{status:?} after {took:?}");
    assert!(!run.join("checkpoints").exists());
    // Variables that say nothing sensible are refused naming the variable.
    let mut c = common::bin();
    c.args(train_args(&data, &tmp.path().join("bad"), &[]));
    c.envs([("RANK", "3"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]);
    let err = common::run_err(&mut c);
    assert!(err.contains("RANK=3 with WORLD_SIZE=2"), "{err}");
}
