//! Data-parallel training: N ranks (processes on one machine or many, started by `lors-lm
//! launch`, torchrun, `mpirun` or `srun`) each draw their own batches, and every step average their gradients, so that all of
//! them take the same optimizer step and hold the same weights.
//!
//! ```text
//! every rank:  grad_accum × { own micro-batch → forward → backward }   (Trainer::step)
//!              GradSync: flatten the gradients of the unique parameters into one buffer,
//!                        all-reduce it (MPI on the CPU, NCCL on GPUs), divide by N;
//!                        the loss and its parts (CE, KL) likewise   (sync.rs, nccl.rs)
//!              global norm, non-finite skip, clip, AdamW on the average (identical everywhere)
//!              stop? (Ctrl-C / SIGTERM / SIGUSR1 on any rank stops all at the same step)
//! every eval:  the validation batches sharded over the ranks, losses summed; a checksum of
//!              the weights compared across ranks (a mismatch stops the run with an error)
//! checkpoint:  the ranks' sample streams gathered; rank 0 alone writes (as it alone writes
//!              metrics, TensorBoard and the console)
//! ```
//!
//! The engines: MPI (`mpi.rs`, the rsmpi crate over Open MPI or MPICH) for ranks started by
//! `mpirun` or `srun`; TCP through rank 0 (`tcp.rs`, no library) for ranks started by
//! `lors-lm launch` or torchrun; on GPUs either one bootstraps NCCL (`nccl.rs`, through
//! cudarc), which moves the gradients. A
//! LORS model all-reduces what it trains — shared bases and private factors — never merged
//! weights, so it moves `unique parameters × 4` bytes per step where the vanilla model moves
//! its full parameter count. See docs/distributed.md.
//!
//! Samples: rank r of a new run draws from `data_stream(seed, r)`, its windows inside the r-th
//! of N equal contiguous parts of the training split (`batches::rank_part`): the ranks read
//! disjoint text. Rank 0's stream is a single process's, so one rank trains exactly as a plain
//! process does, and N ranks with batch b equal one process whose batch is the N·b windows of
//! the N streams, each drawn in its rank's part. A checkpoint stores every
//! rank's stream; a resume with the same world size continues each exactly, with another world
//! size the ranks without a saved stream start new ones (weights, optimizer state and step are
//! restored exactly either way).

pub mod launcher;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod sync;
pub mod tcp;
pub mod watchdog;

use crate::model::ParamCounts;
use crate::rng::Rng;
use crate::train::fit::DataParallel;
use crate::train::run_dir::RunDir;
use crate::train::trainer::{evaluate_sum, GradSync, Trainer};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use watchdog::Watchdog;

/// Start data-parallel training when a launcher started this process as one of several
/// ranks: the run's communicator, with the watchdog (`collective_timeout`) and the stop
/// signals installed. None for a single process.
///
/// `lors-lm launch` and torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
/// give the TCP communicator (`tcp.rs`, any build, world size 1 included: the launch asked for
/// it); `mpirun` and `srun` give MPI (`mpi.rs`), and a build without the `mpi` feature refuses
/// to be one of several MPI ranks (`launcher::refuse_without_mpi`).
pub fn start(collective_timeout: Duration) -> Result<Option<Dist>> {
    if let Some(rdv) = tcp::Rendezvous::from_env()? {
        let comm = tcp::TcpComm::connect(&rdv, collective_timeout)?;
        install_stop_signals();
        return Ok(Some(Dist::new(Rc::new(comm), Watchdog::exiting(collective_timeout))));
    }
    let launch = launcher::detect();
    #[cfg(not(feature = "mpi"))]
    {
        launcher::refuse_without_mpi(launch.as_ref())?;
        Ok(None)
    }
    #[cfg(feature = "mpi")]
    {
        let Some(launch) = launch.filter(|l| l.size != Some(1)) else { return Ok(None) };
        let comm = mpi::Mpi::init(&launch)?;
        if comm.size() == 1 {
            return Ok(None);
        }
        install_stop_signals();
        Ok(Some(Dist::new(Rc::new(comm), Watchdog::exiting(collective_timeout))))
    }
}

/// SIGTERM (what `mpirun` and `lors-lm launch` send every rank on Ctrl-C, and Slurm on
/// `scancel` or at the time limit) and SIGUSR1 (which `mpirun` forwards at once; `sbatch
/// --signal=USR1@120`) stop the run as Ctrl-C does: the ranks agree on the step, rank 0
/// checkpoints, all exit cleanly.
fn install_stop_signals() {
    extern "C" fn on_signal(sig: libc::c_int) {
        if sig == libc::SIGTERM {
            TERMINATED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        crate::train::fit::request_stop();
    }
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only stores to an atomic flag, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

/// Set by SIGTERM: the launcher is ending the job (Open MPI's `mpirun` after its own SIGINT or
/// SIGTERM; Slurm at `scancel` or the time limit; `lors-lm launch` on Ctrl-C).
static TERMINATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the launcher is ending the job (this rank got SIGTERM). Its runtime is being torn
/// down then: `MPI_Finalize` would block on it until the launcher SIGKILLs the rank
/// (`odls_base_sigkill_timeout` later, per rank), so a rank that has checkpointed and flushed
/// leaves with `exit_now` instead.
pub fn launcher_is_ending_the_job() -> bool {
    TERMINATED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Flush stdout and stderr and end the process with `code` at once, without `MPI_Finalize`
/// (see `launcher_is_ending_the_job`). Call only after everything was written and dropped.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process; the run's files are closed and synced already.
    unsafe { libc::_exit(code) }
}

/// Print `line` to stderr in one write, so that the lines of several ranks (which the launcher
/// merges) never interleave mid-line.
pub fn eprint_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
}

/// The device of a rank for `--device SPEC`: `cuda` becomes the GPU of the rank's index on its
/// machine (`local` = (index, ranks on the machine)), or GPU 0 where the launcher shows each
/// rank one GPU (`visible_gpus` = the length of `CUDA_VISIBLE_DEVICES`). An explicit `cuda:N`
/// is refused: every rank would take the same GPU.
pub fn rank_device_spec(spec: &str, local: (usize, usize), visible_gpus: Option<usize>) -> Result<String> {
    let s = spec.trim().to_ascii_lowercase();
    if s.starts_with("cuda:") {
        bail!("--device {s} with several ranks: pass --device cuda, and each rank takes the GPU of its local rank");
    }
    if s != "cuda" {
        return Ok(s);
    }
    let (index, on_node) = local;
    match visible_gpus {
        Some(1) => Ok("cuda:0".into()),
        Some(k) if index >= k => bail!(
            "{on_node} ranks on this machine but CUDA_VISIBLE_DEVICES shows {k} GPUs: start at most one rank per GPU"
        ),
        _ => Ok(format!("cuda:{index}")),
    }
}

/// The collective operations data-parallel training needs, over all ranks of a run. Each
/// blocks until every rank has called it.
pub trait Comm {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// This rank's index among the ranks on its machine, and how many there are.
    fn local(&self) -> (usize, usize);
    /// `recv` = the element-wise sum of every rank's `send`.
    fn sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Rank `root`'s `buf` into every rank's `buf`.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// End every rank of the job at once (after this rank printed its error).
    fn abort(&self, code: i32) -> !;
    /// The engine, for the run header (e.g. "MPI: Open MPI v4.1.4").
    fn describe(&self) -> String;
}

/// A data-parallel run's communicator, with the watchdog over every collective. Clones share
/// both (the trainer's gradient sync, the loop and the session each hold one).
#[derive(Clone)]
pub struct Dist {
    comm: Rc<dyn Comm>,
    watchdog: Watchdog,
}

impl Dist {
    pub fn new(comm: Rc<dyn Comm>, watchdog: Watchdog) -> Self {
        Self { comm, watchdog }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// Rank 0 writes the run directory and reports.
    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }
    pub fn local(&self) -> (usize, usize) {
        self.comm.local()
    }
    pub fn describe(&self) -> String {
        self.comm.describe()
    }
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }

    /// Arm the watchdog for `what`, naming this rank and the ranks it waits for.
    pub(crate) fn arm(&self, what: &str) -> watchdog::Armed<'_> {
        let others = match self.size() {
            2 => format!("rank {}", 1 - self.rank()),
            n => format!("the other {} ranks", n - 1),
        };
        self.watchdog.arm(format!("rank {}: {what} (waiting for {others})", self.rank()))
    }

    pub fn sum_f32(&self, send: &[f32], recv: &mut [f32], what: &str) -> Result<()> {
        let _armed = self.arm(what);
        self.comm.sum_f32(send, recv)
    }
    pub fn sum_f64(&self, send: &[f64], recv: &mut [f64], what: &str) -> Result<()> {
        let _armed = self.arm(what);
        self.comm.sum_f64(send, recv)
    }
    pub fn gather_u64(&self, value: u64, what: &str) -> Result<Vec<u64>> {
        let _armed = self.arm(what);
        self.comm.gather_u64(value)
    }
    pub fn broadcast(&self, buf: &mut [u8], root: usize, what: &str) -> Result<()> {
        let _armed = self.arm(what);
        self.comm.broadcast(buf, root)
    }

    /// Make `trainer` one rank of this run (every rank calls this together): its own sample
    /// stream, the gradient all-reduce (NCCL on a GPU where built with it, else MPI), and a
    /// check that all ranks start from the same weights. Returns the run header's lines and a
    /// metrics record (world size, global batch, all-reduce bytes per step).
    pub fn setup(&self, trainer: &mut Trainer) -> Result<(Vec<String>, serde_json::Value)> {
        let note = self.seed_stream(trainer);
        let part = trainer.restrict_source_to_rank(self.rank(), self.size());
        let part = self.agree(part, "cutting the training split into one part per rank")?;
        let (sync, engine) = self.grad_sync(trainer);
        let sync = self.agree(sync, "setting up the gradient all-reduce")?;
        let bytes = sync.bytes_per_step();
        trainer.set_grad_sync(sync);
        let step = trainer.state().step;
        self.check_weights(trainer, step).map_err(|e| {
            e.context("the ranks start from different weights: launch every rank with the same config and flags")
        })?;
        let cfg = trainer.cfg().clone();
        let t = &cfg.train;
        let counts = ParamCounts::new(&cfg.model, &cfg.lors);
        let n = self.size();
        let vanilla = 4 * counts.vanilla_total;
        let mut lines = vec![
            format!("ranks     {n} ({}), gradients averaged by {engine}", self.describe()),
            format!(
                "batch     global {} sequences = {n} ranks × {} × {} accum, {} tokens/step",
                n * t.batch_size * t.grad_accum,
                t.batch_size,
                t.grad_accum,
                n * t.batch_size * t.grad_accum * t.seq_len
            ),
            format!(
                "all-red.  {bytes} B/step per rank ({} values: the gradients of the unique parameters{}); the vanilla \
                 model at these dimensions: {vanilla} B ({:.2}×); a ring all-reduce sends 2(N-1)/N × that per rank",
                bytes / 4,
                if counts.shared > 0 { ", shared bases and private factors, never merged weights" } else { "" },
                vanilla as f64 / bytes.max(1) as f64
            ),
        ];
        if let Some(p) = part {
            lines.push(format!(
                "data      each rank draws its windows from its own 1/{n} of the training split: disjoint parts of ~{} tokens",
                p.len()
            ));
        }
        lines.extend(note.map(|n| format!("resume    {n}")));
        let record = serde_json::json!({
            "step": step,
            "world_size": n,
            "global_batch_sequences": n * t.batch_size * t.grad_accum,
            "tokens_per_step": trainer.tokens_per_step(),
            "allreduce_bytes_per_step": bytes,
            "vanilla_allreduce_bytes_per_step": vanilla,
        });
        Ok((lines, record))
    }

    /// The gradient all-reduce for the trainer's device, and its name.
    #[allow(clippy::type_complexity)]
    fn grad_sync(&self, trainer: &Trainer) -> (Result<Box<dyn GradSync>>, &'static str) {
        let step = trainer.state().step;
        #[cfg(feature = "nccl")]
        if let candle_core::Device::Cuda(dev) = trainer.device() {
            let sync = nccl::NcclAllReduce::new(self.clone(), dev, trainer.params(), step);
            return (sync.map(|s| Box::new(s) as Box<dyn GradSync>), "NCCL (one flat f32 buffer per step)");
        }
        let engine = match trainer.device().is_cpu() {
            true => "an all-reduce over it (one flat f32 buffer per step)",
            false => "an all-reduce over it through host memory (this build has no NCCL: rebuild with --features nccl)",
        };
        (Ok(Box::new(sync::HostAllReduce::new(self.clone(), trainer.params(), step))), engine)
    }

    /// Whether `local` holds on any rank (the same answer everywhere).
    pub fn any(&self, local: bool, what: &str) -> Result<bool> {
        let mut out = [0.0];
        self.sum_f64(&[local as u8 as f64], &mut out, what)?;
        Ok(out[0] > 0.0)
    }

    /// Pass `result` on where every rank succeeded; else fail on every rank, each failed one
    /// with its own error and the others naming the ranks that failed. Every rank must call
    /// this, so that none goes on into a collective the failed ones will never join.
    pub fn agree<T>(&self, result: Result<T>, what: &str) -> Result<T> {
        let failed: Vec<usize> = self
            .gather_u64(result.is_err() as u64, what)?
            .iter()
            .enumerate()
            .filter(|&(_, &f)| f != 0)
            .map(|(r, _)| r)
            .collect();
        match result {
            Ok(_) if !failed.is_empty() => {
                bail!("{what} failed on rank(s) {failed:?} (their errors are printed above)")
            }
            other => other,
        }
    }

    /// Set this rank's sample stream: a new one for a new run, the saved one on resume (see
    /// the module docs). Returns a note for the run header when the world size changed.
    pub fn seed_stream(&self, trainer: &mut Trainer) -> Option<String> {
        let state = trainer.state();
        let (seed, step, saved_ranks) = (trainer.cfg().train.seed, state.step, state.rank_data_rngs.len() + 1);
        let r = self.rank();
        if step == 0 {
            if r > 0 {
                trainer.set_data_rng(data_stream(seed, r));
            }
            return None;
        }
        if r > 0 {
            let rng = match state.rank_data_rngs.get(r - 1) {
                Some(&s) => Rng { state: s },
                None => {
                    Rng::new(seed ^ (r as u64).wrapping_mul(RANK_SALT) ^ (step as u64).wrapping_mul(STEP_SALT)).fork(1)
                }
            };
            trainer.set_data_rng(rng);
        }
        world_change_note(saved_ranks, self.size())
    }
}

/// The loop's hooks (`fit.rs`): what the ranks of this run do together at its evaluations,
/// stop checks and checkpoints.
impl DataParallel for Dist {
    fn size(&self) -> usize {
        self.comm.size()
    }
    fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Each rank evaluates every N-th batch; the sums and counts are added up.
    fn evaluate(&self, trainer: &mut Trainer, val: &[(Tensor, Tensor)], step: usize) -> Result<f64> {
        let mine: Vec<(Tensor, Tensor)> = val.iter().skip(self.rank()).step_by(self.size()).cloned().collect();
        let sum = if mine.is_empty() { 0.0 } else { evaluate_sum(trainer.model(), &mine)? };
        let mut total = [0.0; 2];
        self.sum_f64(&[sum, mine.len() as f64], &mut total, &format!("the evaluation of step {step}"))?;
        if total[1] == 0.0 {
            bail!("evaluation needs at least one batch");
        }
        let loss = total[0] / total[1];
        trainer.set_val_loss(loss);
        Ok(loss)
    }

    fn check_weights(&self, trainer: &Trainer, step: usize) -> Result<u64> {
        let params = trainer.params().iter().map(|(n, v)| (n.as_str(), v.as_tensor()));
        let mine = weights_checksum(params)?;
        let all = self.gather_u64(mine, &format!("the weight check of step {step}"))?;
        if all.iter().any(|&c| c != all[0]) {
            let list: Vec<String> = all.iter().enumerate().map(|(r, c)| format!("rank {r}: {c:016x}")).collect();
            bail!(
                "the ranks' weights diverged at step {step} ({}): data-parallel ranks must take identical steps; \
                 the last checkpoint is intact (continue with --resume); please report this with the run's config",
                list.join(", ")
            );
        }
        Ok(mine)
    }

    /// Rank 0 writes it with every rank's sample stream; every rank learns whether that worked.
    fn save(&self, trainer: &mut Trainer, run: &RunDir) -> Result<PathBuf> {
        let step = trainer.state().step;
        let what = format!("the checkpoint of step {step}");
        let streams = self.gather_u64(trainer.data_rng().state, &what)?;
        let saved = match self.is_root() {
            true => trainer.save_ranks(run, streams[1..].to_vec()),
            false => Ok(run.checkpoints_dir().join(step.to_string())),
        };
        self.agree(saved, &what)
    }

    fn stop(&self, mine: bool, step: usize) -> Result<bool> {
        self.any(mine, &format!("the stop check of step {step}"))
    }
}

/// What resuming a checkpoint written by `saved` ranks with `now` ranks changes, if they differ.
pub fn world_change_note(saved: usize, now: usize) -> Option<String> {
    (saved != now).then(|| {
        format!(
            "the checkpoint was written by {saved} rank(s), this run has {now}: weights, optimizer state and step are \
             restored exactly; the sample streams of ranks 0..{} continue, {}",
            saved.min(now),
            if now > saved { "the other ranks start new ones" } else { "the other saved streams are dropped" }
        )
    })
}

const RANK_SALT: u64 = 0xA076_1D64_78BD_642F;
const STEP_SALT: u64 = 0xE703_7ED1_A0B4_28DB;

/// The batch-sampling stream of rank `rank` of a new run seeded with `seed`. Rank 0's is a
/// single process's (`Rng::new(seed).fork(1)`).
pub fn data_stream(seed: u64, rank: usize) -> Rng {
    Rng::new(seed ^ (rank as u64).wrapping_mul(RANK_SALT)).fork(1)
}

/// SHA-256 (first 8 bytes) over the names, shapes and f32 values of `tensors`, which must come
/// in name order (as `Trainer::params` lists them): equal checksums mean bit-identical weights.
pub fn weights_checksum<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<u64> {
    let mut h = Sha256::new();
    for (name, t) in tensors {
        h.update(name.as_bytes());
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    let digest = h.finalize();
    Ok(u64::from_be_bytes(digest[..8].try_into()?))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A stand-in communicator for unit tests: `n` ranks that all hold this rank's values.
    use super::Comm;
    use anyhow::Result;

    pub struct Replicated {
        pub n: usize,
    }

    impl Comm for Replicated {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.n
        }
        fn local(&self) -> (usize, usize) {
            (0, self.n)
        }
        fn sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            recv.iter_mut().zip(send).for_each(|(r, s)| *r = s * self.n as f32);
            Ok(())
        }
        fn sum_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
            recv.iter_mut().zip(send).for_each(|(r, s)| *r = s * self.n as f64);
            Ok(())
        }
        fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            Ok(vec![value; self.n])
        }
        fn broadcast(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort({code})")
        }
        fn describe(&self) -> String {
            format!("{} replicated ranks (test)", self.n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dist(n: usize) -> Dist {
        Dist::new(Rc::new(testing::Replicated { n }), Watchdog::new(Duration::from_secs(60), Box::new(|_| {})))
    }

    #[test]
    fn rank_zero_samples_as_a_single_process_and_ranks_differ() {
        assert_eq!(data_stream(1337, 0), Rng::new(1337).fork(1));
        let states: Vec<u64> = (0..4).map(|r| data_stream(1337, r).state).collect();
        for i in 0..4 {
            for j in i + 1..4 {
                assert_ne!(states[i], states[j]);
            }
        }
    }

    #[test]
    fn each_rank_takes_the_gpu_of_its_local_rank() {
        assert_eq!(rank_device_spec("cpu", (1, 2), None).unwrap(), "cpu");
        assert_eq!(rank_device_spec("CUDA", (3, 8), None).unwrap(), "cuda:3");
        assert_eq!(rank_device_spec("cuda", (3, 8), Some(1)).unwrap(), "cuda:0");
        assert_eq!(rank_device_spec("cuda", (1, 2), Some(2)).unwrap(), "cuda:1");
        assert!(rank_device_spec("cuda", (2, 3), Some(2)).unwrap_err().to_string().contains("one rank per GPU"));
        assert!(rank_device_spec("cuda:1", (0, 2), None).unwrap_err().to_string().contains("--device cuda"));
    }

    #[test]
    fn agreement_fails_everywhere_when_one_rank_fails() {
        let d = dist(2);
        assert_eq!(d.agree(Ok(5), "setup").unwrap(), 5);
        let err = d.agree::<()>(Err(anyhow::anyhow!("data missing")), "setup").unwrap_err();
        assert_eq!(err.to_string(), "data missing");
        assert!(d.any(true, "stop").unwrap() && !d.any(false, "stop").unwrap());
    }

    #[test]
    fn checksum_sees_every_bit_and_name() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[1.0f32, 2.0, 3.0], &dev)?;
        let b = Tensor::new(&[1.0f32, 2.0, f32::from_bits(3.0f32.to_bits() + 1)], &dev)?;
        let c = weights_checksum([("w", &a)])?;
        assert_eq!(c, weights_checksum([("w", &a.clone())])?);
        assert_ne!(c, weights_checksum([("w", &b)])?);
        assert_ne!(c, weights_checksum([("v", &a)])?);
        assert_ne!(c, weights_checksum([("w", &a.reshape((3, 1))?)])?);
        Ok(())
    }
}
