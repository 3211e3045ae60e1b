//! Which launcher started this process, and as one of how many ranks, read from the
//! environment variables the launchers set; and the start-up that depends on it (threads per
//! rank, the refusal of a build without MPI).
//!
//! | launcher | world size | rank | ranks on this machine |
//! |---|---|---|---|
//! | Open MPI's `mpirun` / `mpiexec` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_LOCAL_SIZE` |
//! | MPICH / Intel MPI (hydra), `srun --mpi=pmi2` | `PMI_SIZE` | `PMI_RANK` | `MPI_LOCALNRANKS` |
//! | Slurm's `srun` | `SLURM_STEP_NUM_TASKS` | `SLURM_PROCID` | `SLURM_STEP_TASKS_PER_NODE` |
//! | a PMIx launcher (`prterun`, `srun --mpi=pmix`) | – | `PMIX_RANK` | – |
//!
//! `SLURM_STEP_NUM_TASKS` is set by `srun` for its tasks only, not in a batch script itself
//! (whose `SLURM_NTASKS` says how many tasks the job may start, not that this is one of them).

use anyhow::{bail, Result};

/// How this process was launched, as far as the environment tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The launcher, in words ("Open MPI's mpirun").
    pub launcher: &'static str,
    /// The variable the world size came from, and the size (None: a PMIx launch that does
    /// not say).
    pub size_var: &'static str,
    pub size: Option<usize>,
    pub rank: Option<usize>,
    /// Ranks started on this machine, where the launcher says.
    pub local_size: Option<usize>,
}

/// (launcher, size variable, rank variable, local size variable), in the order checked.
const LAUNCHERS: [(&str, &str, &str, &str); 4] = [
    ("Open MPI's mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("an MPICH-style launcher (mpiexec, srun --mpi=pmi2)", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS"),
    ("Slurm's srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_TASKS_PER_NODE"),
    ("a PMIx launcher", "", "PMIX_RANK", ""),
];

/// The launch described by `var` (an environment lookup), or None for a plain process.
pub fn detect_with(var: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    // Slurm's "2(x3),1" lists tasks per node; the first count is this node's on a uniform job.
    let number = |name: &str| -> Option<usize> {
        let v = var(name)?;
        let digits: String = v.trim().chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    };
    LAUNCHERS.iter().find_map(|&(launcher, size_var, rank_var, local_var)| {
        let size = if size_var.is_empty() { None } else { number(size_var) };
        let rank = number(rank_var);
        if size.is_none() && (rank.is_none() || !size_var.is_empty()) {
            return None;
        }
        let local_size = if local_var.is_empty() { None } else { number(local_var) };
        Some(Launch { launcher, size_var, size, rank, local_size })
    })
}

/// The launch of this process (see the module docs), or None.
pub fn detect() -> Option<Launch> {
    detect_with(|name| std::env::var(name).ok())
}

/// What a build without the `mpi` feature does when a launcher started it: fine as the only
/// rank; an error saying how to rebuild when it is one of several, instead of silently
/// training N independent copies that overwrite each other's run directory.
pub fn refuse_without_mpi(launch: Option<&Launch>) -> Result<()> {
    let Some(l) = launch else { return Ok(()) };
    let several = match (l.size, l.rank) {
        (Some(n), _) => n > 1,
        (None, Some(r)) => r > 0,
        (None, None) => false,
    };
    if several {
        let how_many =
            l.size.map_or("one of several ranks".to_string(), |n| format!("one of {n} ranks ({}={n})", l.size_var));
        bail!(
            "this lors-lm was built without MPI, but {} started it as {how_many}: every rank would train its own copy. \
             Rebuild with data-parallel training: `cargo build --release --features mpi` (needs an MPI and libclang: \
             apt install libopenmpi-dev libclang-dev), then launch that binary (docs/distributed.md)",
            l.launcher
        );
    }
    Ok(())
}

/// Threads per rank: when a launcher starts several ranks on one machine and neither
/// `RAYON_NUM_THREADS` nor `CANDLE_NUM_THREADS` is set, each rank takes its share of the cores
/// (at least one) instead of all of them. Call at start-up, before any thread pool exists.
pub fn tune_threads_for_ranks() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() || std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return;
    }
    let torchrun = super::tcp::Rendezvous::from_env().ok().flatten().map(|r| r.local.1);
    let Some(local) = torchrun.or_else(|| detect().and_then(|l| l.local_size)).filter(|&n| n > 1) else { return };
    let threads = (candle_core::utils::get_num_threads() / local).max(1);
    // Single-threaded here: called first thing in main, before any thread pool exists.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn detects_each_launcher_and_plain_processes() {
        assert_eq!(detect_with(env(&[("SLURM_NTASKS", "4"), ("HOME", "/root")])), None);
        let ompi = detect_with(env(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]))
        .unwrap();
        assert_eq!((ompi.size, ompi.rank, ompi.local_size), (Some(2), Some(1), Some(2)));
        let slurm = detect_with(env(&[
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_PROCID", "3"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ]))
        .unwrap();
        assert_eq!((slurm.size, slurm.rank, slurm.local_size), (Some(8), Some(3), Some(4)));
        let hydra = detect_with(env(&[("PMI_SIZE", "3"), ("PMI_RANK", "0")])).unwrap();
        assert_eq!((hydra.size, hydra.local_size), (Some(3), None));
        let pmix = detect_with(env(&[("PMIX_RANK", "2")])).unwrap();
        assert_eq!((pmix.size, pmix.rank), (None, Some(2)));
    }

    #[test]
    fn a_build_without_mpi_refuses_several_ranks_only() {
        let launch = |pairs: &[(&str, &str)]| detect_with(env(pairs));
        refuse_without_mpi(None).unwrap();
        refuse_without_mpi(launch(&[("OMPI_COMM_WORLD_SIZE", "1"), ("OMPI_COMM_WORLD_RANK", "0")]).as_ref()).unwrap();
        refuse_without_mpi(launch(&[("PMIX_RANK", "0")]).as_ref()).unwrap();
        let err = refuse_without_mpi(launch(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")]).as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--features mpi") && err.contains("OMPI_COMM_WORLD_SIZE=2"), "{err}");
        let err = refuse_without_mpi(launch(&[("PMIX_RANK", "3")]).as_ref()).unwrap_err().to_string();
        assert!(err.contains("one of several ranks"), "{err}");
    }
}
