//! `lors-lm launch --nproc N -- train ...`: start N ranks of a data-parallel run on this
//! machine, without MPI (one per GPU with `--device cuda`, or CPU ranks). Each child is this
//! binary with the torchrun-style variables of its rank (RANK, WORLD_SIZE, LOCAL_RANK,
//! LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the ranks meet over TCP
//! (`train::distributed::tcp`), and on GPUs bootstrap NCCL from it.
//!
//! The launcher supervises them as torchrun does: when a rank fails, the others are stopped
//! (SIGTERM, then SIGKILL after `--grace` seconds) and the launcher exits with that rank's
//! code; Ctrl-C (or SIGTERM) is passed on as SIGTERM, which makes every rank finish its step,
//! checkpoint and exit; a second one kills them.

use anyhow::{bail, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
    lors-lm launch --nproc 8 -- train --config configs/gpu-100m.toml --device cuda\n  \
    lors-lm launch --nproc 2 -- train --config configs/tiny.toml --data data/moby-4k   (CPU ranks)\n\n\
    Across machines, start the ranks with torchrun (it sets the same variables):\n  \
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port 29500 \\\n    \
    --no-python lors-lm train --config ... --device cuda\n\
    (under torchrun rank 0 listens on MASTER_PORT + 1; see docs/distributed.md)")]
pub struct LaunchArgs {
    /// Ranks to start on this machine (with --device cuda: at most one per GPU).
    #[arg(long, short = 'n', value_name = "N")]
    pub nproc: usize,
    /// The address rank 0 listens on.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub master_addr: String,
    /// The port rank 0 listens on [default: a free one].
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// Seconds the other ranks get to stop cleanly after one failed, before they are killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub grace: f64,
    /// The lors-lm command every rank runs, after `--` (e.g. `-- train --config c.toml`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Signals the launcher got (SIGINT, SIGTERM): the first stops the ranks cleanly, the second kills them.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Start the ranks, supervise them and return the launcher's exit code (0 when every rank
/// succeeded; else the first failed rank's code, 128 + signal for a killed one).
pub fn run(args: &LaunchArgs) -> Result<i32> {
    if args.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    if !(args.grace.is_finite() && args.grace >= 0.0) {
        bail!("--grace must be a number of seconds, 0 or more");
    }
    match args.command.first().map(String::as_str) {
        Some("train") => {}
        Some(other) => bail!(
            "`lors-lm launch` starts data-parallel training: the command after `--` must be `train ...`, not `{other}`"
        ),
        None => bail!(
            "give the command every rank runs after `--`, e.g. `lors-lm launch --nproc 2 -- train --config c.toml`"
        ),
    }
    let port = match args.master_port {
        Some(0) | None => free_port(&args.master_addr)?,
        Some(p) => p,
    };
    let exe = std::env::current_exe().context("finding this lors-lm binary to start the ranks")?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only increments an atomic counter, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let n = args.nproc;
    let mut ranks: Vec<Child> = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string())
            // The variables of an enclosing torchrun would move rank 0's port.
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .env_remove("LORS_LM_MASTER_PORT");
        match cmd.spawn() {
            Ok(child) => ranks.push(child),
            Err(e) => {
                stop(&mut ranks, libc::SIGKILL);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    supervise(ranks, Duration::from_secs_f64(args.grace))
}

/// A port on `addr` that nothing listens on now (the OS picks; rank 0 binds it a moment later).
fn free_port(addr: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((addr, 0)).with_context(|| {
        format!("--master-addr {addr}: cannot listen there (it must be an address of this machine)")
    })?;
    Ok(l.local_addr()?.port())
}

fn code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Send `sig` to every rank still running.
fn stop(ranks: &mut [Child], sig: libc::c_int) {
    for c in ranks.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }
}

fn supervise(mut ranks: Vec<Child>, grace: Duration) -> Result<i32> {
    let mut codes: Vec<Option<i32>> = vec![None; ranks.len()];
    // The first rank that failed: its number, exit code and when.
    let mut failed: Option<(usize, i32, Instant)> = None;
    let mut terminated = false;
    let mut signals_seen = 0;
    loop {
        // Ranks that ended in this round, with whether a signal killed them.
        let mut ended: Vec<(usize, i32, bool)> = vec![];
        for (rank, child) in ranks.iter_mut().enumerate() {
            if codes[rank].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait().with_context(|| format!("waiting for rank {rank}"))? {
                use std::os::unix::process::ExitStatusExt;
                let code = code_of(status);
                codes[rank] = Some(code);
                ended.push((rank, code, status.signal().is_some()));
            }
        }
        // The cause, where several failed in one round: a rank that a signal killed (the others
        // then lost it), else the lowest.
        let cause = ended.iter().filter(|e| e.1 != 0).min_by_key(|&&(rank, _, signal)| (!signal, rank));
        if let (None, Some(&(rank, code, _))) = (failed, cause) {
            failed = Some((rank, code, Instant::now()));
            if codes.iter().any(Option::is_none) || ended.len() > 1 {
                eprintln!("lors-lm launch: rank {rank} exited with code {code}: stopping the other ranks");
            }
        }
        if codes.iter().all(Option::is_some) {
            break;
        }
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals > signals_seen {
            signals_seen = signals;
            match signals {
                1 => eprintln!("lors-lm launch: stopping every rank after its current step (again to kill them)"),
                _ => stop(&mut ranks, libc::SIGKILL),
            }
        }
        if !terminated && (failed.is_some() || signals_seen > 0) {
            stop(&mut ranks, libc::SIGTERM);
            terminated = true;
        }
        if failed.is_some_and(|(_, _, at)| at.elapsed() >= grace) {
            stop(&mut ranks, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(failed.map_or(0, |(_, code, _)| code))
}
