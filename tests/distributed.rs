//! Data-parallel training through the real binary under `mpirun` (CPU, 2 ranks, one thread
//! each): equivalence with one process on the same windows, bit-identical ranks with only
//! rank 0 writing, exact resume, a rank killed or hung mid-run, Ctrl-C, the bytes each step
//! moves for LORS against vanilla, and distillation's logged loss parts.
//!
//! Built only with the `mpi` feature (Cargo.toml `required-features`); `scripts/test.sh` builds
//! and runs it where MPI is installed, and CI (LORS_LM_REQUIRE_MPI=1) fails without one. A
//! missing `mpirun` fails these tests, it never skips them.

mod common;

use common::dp::*;
use common::repo;
use lors_lm::config::Config;
use lors_lm::model::ParamCounts;
use lors_lm::train::batches::rank_part;
use lors_lm::train::distributed::{data_stream, weights_checksum};
use lors_lm::train::{RunDir, Source};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use candle_core::Device;

/// One mpirun job at a time: the tests share two cores, and the fault tests time things.
static MPI: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    MPI.lock().unwrap_or_else(|e| e.into_inner())
}

fn mpirun_path() -> PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("mpirun")).find(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!(
            "mpirun not found on PATH: these tests run the mpi build under Open MPI \
             (apt install openmpi-bin libopenmpi-dev; scripts/test.sh and .ci/run do this)"
        )
    })
}

/// `mpirun` with one thread per rank, allowed as root (CI containers) and on 2 cores.
fn mpirun() -> Command {
    let mut c = Command::new(mpirun_path());
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .arg("--oversubscribe");
    c
}

/// `lors-lm train` (tiny config) as `n` ranks.
fn train_ranks(n: usize, data: &Path, out: &Path, sets: &[&str]) -> Command {
    train_ranks_with(&[], n, data, out, sets)
}

/// `train_ranks` with options for mpirun itself.
fn train_ranks_with(mpirun_opts: &[&str], n: usize, data: &Path, out: &Path, sets: &[&str]) -> Command {
    let mut c = mpirun();
    c.args(mpirun_opts).args(["-n", &n.to_string()]).arg(env!("CARGO_BIN_EXE_lors-lm"));
    c.args(train_args(data, out, sets));
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("start mpirun");
    assert!(
        out.status.success(),
        "failed: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn two_ranks_equal_one_process_that_sees_both_ranks_windows() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let sets = ["train.max_steps=5", "train.batch_size=2", "train.grad_accum=2", "train.eval_interval=100"];
    let run = tmp.path().join("run");
    let out = run_ok(&mut train_ranks(2, &data, &run, &sets));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("global 8 sequences = 2 ranks × 2 × 2 accum, 128 tokens/step"), "{stdout}");
    let mpi = latest_params(&run);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let same_windows = max_abs_diff(&mpi, &reference_weights(&data, &sets, 2, 5));
    // Float rounding only (the all-reduce sums in another order): 1e-6 to 3e-6 over 5 steps.
    assert!(same_windows < 1e-5, "2 ranks vs one process on their 2b windows: max |Δw| = {same_windows}");
    // The check can fail: rank 0's windows alone give other weights.
    let rank0_only = max_abs_diff(&mpi, &reference_weights(&data, &sets, 1, 5));
    assert!(rank0_only > 1e-4, "one rank's windows should give other weights (max |Δw| = {rank0_only})");
}

#[test]
fn ranks_draw_their_windows_from_disjoint_parts_of_the_split() {
    // Token i of the training split is i, so a window's tokens are its positions.
    let tmp = tempfile::tempdir().unwrap();
    let n = 10_007usize;
    let train: Vec<u32> = (0..n as u32).collect();
    lors_lm::data::write_prepared_dir(tmp.path(), &train, &train[..100], n, None).unwrap();
    let meta = lors_lm::data::Meta::load(tmp.path()).unwrap();
    let (t, world) = (32, 3);
    let mut seen: Vec<Vec<u32>> = vec![];
    for r in 0..world {
        let mut source = Source::tokens(lors_lm::data::TokenFile::open(tmp.path(), "train", &meta).unwrap());
        let part = source.restrict_to_rank(r, world, t).unwrap().unwrap();
        assert_eq!(part, rank_part(n, r, world));
        let mut rng = data_stream(7, r);
        let mut mine = vec![];
        for _ in 0..200 {
            let (x, y) = source.sample(&mut rng, 4, t, &Device::Cpu).unwrap();
            for ids in
                [x.flatten_all().unwrap().to_vec1::<u32>().unwrap(), y.flatten_all().unwrap().to_vec1::<u32>().unwrap()]
            {
                assert!(ids.iter().all(|&i| part.contains(&(i as usize))), "rank {r} read outside {part:?}");
                mine.extend(ids);
            }
        }
        mine.sort_unstable();
        mine.dedup();
        // 200 batches of 4 random windows reach both ends of a ~3,300-token part.
        assert!(
            mine[0] as usize <= part.start + 40 && *mine.last().unwrap() as usize + 40 >= part.end,
            "{r}: {part:?}"
        );
        seen.push(mine);
    }
    let parts: Vec<_> = (0..world).map(|r| rank_part(n, r, world)).collect();
    assert_eq!((parts[0].start, parts[2].end), (0, n));
    assert!(parts.windows(2).all(|w| w[0].end == w[1].start), "{parts:?}");
    assert!(seen[0].iter().all(|i| seen[1].binary_search(i).is_err()));
    // A part shorter than one window is refused with the way out.
    let mut source = Source::tokens(lors_lm::data::TokenFile::open(tmp.path(), "train", &meta).unwrap());
    let err = source.restrict_to_rank(0, 400, t).unwrap_err().to_string();
    assert!(err.contains("400 parts") && err.contains("train.seq_len"), "{err}");
}

#[test]
fn ranks_end_bit_identical_and_only_rank_0_writes() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    // Two app contexts in two working directories with a relative --out: anything rank 1
    // wrote would land in its own directory.
    let (dir0, dir1) = (tmp.path().join("rank0"), tmp.path().join("rank1"));
    std::fs::create_dir_all(&dir0).unwrap();
    std::fs::create_dir_all(&dir1).unwrap();
    let args = train_args(&data, Path::new("run"), &["train.max_steps=12", "train.eval_interval=6"]);
    let bin = env!("CARGO_BIN_EXE_lors-lm");
    let mut c = mpirun();
    c.args(["-n", "1", "--wdir"]).arg(&dir0).arg(bin).args(&args);
    c.args([":", "-n", "1", "--wdir"]).arg(&dir1).arg(bin).args(&args);
    run_ok(&mut c);
    let run = dir0.join("run");
    assert_eq!(std::fs::read_dir(&dir1).unwrap().count(), 0, "rank 1 wrote into its directory");
    assert!(run.join("checkpoints/12/model.safetensors").is_file() && run.join("tb").is_dir());
    // Every rank's checksum was compared at steps 6 and 12 (a mismatch fails the run); rank
    // 0's equals the checkpoint's, so every rank ended with the checkpoint's exact bits.
    let checks = field(&run, "weights_checksum");
    assert_eq!(field(&run, "ranks"), vec![serde_json::json!(2); 2]);
    let params = latest_params(&run);
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let sum = weights_checksum(names.iter().map(|n| (n.as_str(), &params[*n]))).unwrap();
    assert_eq!(checks.last().unwrap().as_str().unwrap(), format!("{sum:016x}"));
}

#[test]
fn a_resume_with_the_same_ranks_repeats_the_uninterrupted_run_exactly() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let sets = ["train.max_steps=12", "train.eval_interval=4", "train.grad_accum=2"];
    let full = tmp.path().join("full");
    run_ok(&mut train_ranks(2, &data, &full, &sets));
    let split = tmp.path().join("split");
    run_ok(train_ranks(2, &data, &split, &sets).args(["--stop-at", "5"]));
    run_ok(mpirun().args(["-n", "2", env!("CARGO_BIN_EXE_lors-lm"), "train", "--resume", "--out"]).arg(&split));
    assert_eq!(losses(&full).len(), 12);
    assert_eq!(losses(&full), losses(&split), "every rank's sample stream must continue exactly");
    assert_eq!(max_abs_diff(&latest_params(&full), &latest_params(&split)), 0.0);
}

/// Distillation under data parallelism: the logged `ce` and `kl` are the ranks' means, as the
/// loss is, so they make up the loss as a single process's do, loss = (1 − α)·CE + α·T²·KL
/// (train/distill.rs), at every step. Rank 0's own parts (what was logged before) do not: its
/// windows are not rank 1's.
#[test]
fn distilled_ranks_log_loss_parts_that_make_up_the_loss() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    // A teacher is loaded with its tokenizer: data prepared from text has one.
    let words = ["the", "whale", "sea", "ship", "captain", "harpoon", "white", "ocean", "deep", "sail"];
    let mut x = 7u64;
    let text: Vec<&str> = (0..6000)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            words[((x >> 33) % words.len() as u64) as usize]
        })
        .collect();
    let data = common::prepare_text(tmp.path(), &text.join(" "), 300);
    let teacher = tmp.path().join("teacher");
    let bin = env!("CARGO_BIN_EXE_lors-lm");
    run_ok(Command::new(bin).args(train_args(&data, &teacher, &["train.max_steps=10", "lors.mode=vanilla"])));
    let (alpha, temp) = (0.3, 2.0);
    let (a, t) = (format!("train.distill_alpha={alpha}"), format!("train.distill_temperature={temp}"));
    let sets = ["train.max_steps=6", "train.grad_accum=2", "train.eval_interval=100", &a, &t];
    let with_teacher = ["--teacher".to_string(), teacher.display().to_string()];
    let single = tmp.path().join("single");
    run_ok(Command::new(bin).args(train_args(&data, &single, &sets)).args(&with_teacher));
    let ranks = tmp.path().join("ranks");
    run_ok(train_ranks(2, &data, &ranks, &sets).args(&with_teacher));
    for run in [&single, &ranks] {
        let steps: Vec<serde_json::Value> = metrics(run).into_iter().filter(|m| m.get("ce").is_some()).collect();
        assert_eq!(steps.len(), 6, "{}: one line with ce and kl per step", run.display());
        for m in &steps {
            let get = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{}: no {k} in {m}", run.display()));
            let (loss, ce, kl) = (get("loss"), get("ce"), get("kl"));
            let parts = (1.0 - alpha) * ce + alpha * temp * temp * kl;
            assert!(
                (loss - parts).abs() < 1e-5 * loss.abs().max(1.0),
                "{}: step {}: loss {loss} but (1 − α)·ce + α·T²·kl = {parts} (ce {ce}, kl {kl})",
                run.display(),
                m["step"]
            );
        }
    }
}

/// The pid of `rank` among the processes running with `marker` in their command line.
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    pid_with_env(marker, "mpirun", &[format!("OMPI_COMM_WORLD_RANK={rank}"), format!("PMI_RANK={rank}")])
}

fn start_long_run(tmp: &Path, data: &Path, run: &Path, mpirun_opts: &[&str], extra: &[&str]) -> (Child, PathBuf) {
    let mut c = train_ranks_with(mpirun_opts, 2, data, run, &LONG_RUN);
    c.args(["--quiet"]).args(extra);
    start_until_second_checkpoint(c, tmp, "mpirun.log", run)
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_with_one_or_two_ranks() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let run = tmp.path().join("killed-run");
    let (mut child, log) = start_long_run(tmp.path(), &data, &run, &[], &[]);
    let victim = rank_pid("killed-run", 1).expect("rank 1's process");
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let (status, took) = wait_for(&mut child, Duration::from_secs(60), &log);
    eprintln!("rank 1 SIGKILLed: mpirun exited ({status:?}) after {took:?}");
    let out = read(&log);
    assert!(!status.success() && took < Duration::from_secs(60), "{status:?} after {took:?}: {out}");
    assert!(out.contains("rank 1") && out.contains("signal 9"), "the error must name the lost rank: {out}");
    // The newest checkpoint is complete, and both world sizes continue from it.
    let ckpt = RunDir::at(&run).checkpoint(None).unwrap();
    assert!(!ckpt.params(&Device::Cpu).unwrap().is_empty() && ckpt.state().unwrap().rank_data_rngs.len() == 1);
    let stop = (ckpt.step + 3).to_string();
    for (n, dir) in [(1, "resume1"), (2, "resume2")] {
        let copy = tmp.path().join(dir);
        run_ok(Command::new("cp").args(["-r"]).arg(&run).arg(&copy));
        let mut c = match n {
            1 => Command::new(env!("CARGO_BIN_EXE_lors-lm")),
            _ => {
                let mut c = mpirun();
                c.args(["-n", "2", env!("CARGO_BIN_EXE_lors-lm")]);
                c
            }
        };
        let out = run_ok(c.args(["train", "--resume", "--stop-at", &stop, "--out"]).arg(&copy));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.contains("written by 2 rank(s), this run has 1"), n == 1, "{stdout}");
        assert_eq!(RunDir::at(&copy).latest_step().unwrap(), Some(ckpt.step + 3));
    }
}

#[test]
fn a_hung_rank_is_caught_by_the_watchdog() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let run = tmp.path().join("hung-run");
    let (mut child, log) = start_long_run(tmp.path(), &data, &run, &[], &["--collective-timeout", "3"]);
    let victim = rank_pid("hung-run", 1).expect("rank 1's process");
    // A stopped process is not lost to the launcher: only the watchdog can end the wait.
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGSTOP) }, 0);
    let (status, took) = wait_for(&mut child, Duration::from_secs(60), &log);
    eprintln!("rank 1 SIGSTOPped, --collective-timeout 3: mpirun exited ({status:?}) after {took:?}");
    let out = read(&log);
    assert!(!status.success() && took < Duration::from_secs(30), "{status:?} after {took:?}: {out}");
    // The watchdog looks once per timeout/4 (and later on a loaded machine): it reports 3 s or a little more.
    let waited: u64 = out
        .split("(waiting for rank 1) has waited ")
        .nth(1)
        .and_then(|s| s.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the error must name the rank waited for: {out}"));
    assert!(out.contains("error: rank 0: the") && (3..10).contains(&waited), "{out}");
    assert!(RunDir::at(&run).checkpoint(None).unwrap().params(&Device::Cpu).is_ok());
}

#[test]
fn ctrl_c_under_mpirun_checkpoints_and_every_rank_exits_cleanly() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let run = tmp.path().join("interrupted-run");
    // mpirun turns Ctrl-C into SIGTERM to every rank after odls_base_sigkill_timeout seconds
    // and SIGKILL after as many again (docs/distributed.md): 5 s, for a loaded machine.
    let opts = ["--mca", "odls_base_sigkill_timeout", "5"];
    let (mut child, log) = start_long_run(tmp.path(), &data, &run, &opts, &[]);
    let mpirun_pid = child.id() as i32;
    assert_eq!(unsafe { libc::kill(mpirun_pid, libc::SIGINT) }, 0);
    let (status, took) = wait_for(&mut child, Duration::from_secs(60), &log);
    eprintln!("SIGINT to mpirun: exited ({status:?}) after {took:?}");
    let out = read(&log);
    assert!(took < Duration::from_secs(30), "{took:?}: {out}");
    assert!(!out.contains("signal 9") && !out.contains("Killed"), "a rank was killed, not stopped: {out}");
    assert_ranks_stopped_together(&out, &run);
}

#[test]
fn lors_moves_fewer_bytes_per_step_than_vanilla_by_its_parameter_ratio() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synthetic_data(&data);
    let mut bytes = vec![];
    for mode in ["lors", "vanilla"] {
        let run = tmp.path().join(mode);
        run_ok(&mut train_ranks(
            2,
            &data,
            &run,
            &["train.max_steps=2", "train.warmup_steps=1", &format!("lors.mode={mode}")],
        ));
        let b = field(&run, "allreduce_bytes_per_step");
        assert_eq!(b.len(), 1, "one record per start");
        bytes.push(b[0].as_u64().unwrap() as usize);
    }
    let mut cfg = Config::load(&repo("configs/tiny.toml"), &[]).unwrap();
    cfg.model.vocab_size = 50;
    let counts = ParamCounts::new(&cfg.model, &cfg.lors);
    assert_eq!(bytes, vec![4 * counts.total(), 4 * counts.vanilla_total]);
    assert!(bytes[0] < bytes[1]);
    let ratio = bytes[0] as f64 / bytes[1] as f64;
    assert!((ratio - counts.total() as f64 / counts.vanilla_total as f64).abs() < 1e-12, "{ratio}");
    // `lors-lm params` (the README's figures) reports the same bytes without a launcher.
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_lors-lm"))
            .args(["params", "--json", "--config", &common::repo_str("configs/tiny.toml"), "--data"])
            .arg(&data),
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["allreduce_bytes_per_step"].as_u64(), Some(bytes[0] as u64), "{p}");
    assert_eq!(p["vanilla_allreduce_bytes_per_step"].as_u64(), Some(bytes[1] as u64), "{p}");
}
