//! The MPI communicator (cargo feature `mpi`): the rsmpi crate over the system's MPI (Open
//! MPI or MPICH), initialised when a launcher started this process. Only the main thread
//! calls MPI (`MPI_THREAD_FUNNELED`); the watchdog never does.

use crate::train::distributed::launcher::Launch;
use crate::train::distributed::Comm;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

pub struct Mpi {
    /// Finalizes MPI when dropped (the end of a successful run).
    _universe: Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local: (usize, usize),
}

impl Mpi {
    /// Initialise MPI for the run `launch` describes.
    pub fn init(launch: &Launch) -> Result<Self> {
        let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI was already initialised in this process");
        };
        if provided == Threading::Single {
            eprintln!(
                "warning: the MPI library provides only {provided:?} threading; lors-lm calls it from one thread"
            );
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if let Some(n) = launch.size.filter(|&n| n != size) {
            bail!(
                "{} says {}={n} but MPI reports {size} ranks: this binary was built against another MPI than the \
                 launcher's (rebuild against the MPI whose mpirun you use, or launch with that MPI's mpirun)",
                launch.launcher,
                launch.size_var
            );
        }
        // The ranks that share this machine (for the GPU of each rank and threads per rank).
        let node = world.split_shared(rank as i32);
        let local = (node.rank() as usize, node.size() as usize);
        Ok(Self { _universe: universe, world, rank, size, local })
    }
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local(&self) -> (usize, usize) {
        self.local
    }
    fn sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.world.all_reduce_into(send, recv, SystemOperation::sum());
        Ok(())
    }
    fn sum_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        self.world.all_reduce_into(send, recv, SystemOperation::sum());
        Ok(())
    }
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.size];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn describe(&self) -> String {
        let version = mpi::environment::library_version().unwrap_or_default();
        // Open MPI: "Open MPI v4.1.4, package: ..."; MPICH: "MPICH Version: 4.0 ...".
        let first = version.split([',', '\n']).next().unwrap_or("").trim();
        format!("MPI ({})", if first.is_empty() { "unknown library" } else { first })
    }
}
