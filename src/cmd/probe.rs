//! `lors-lm probe-memory` (internal, hidden from --help): the read bandwidth of this machine
//! at each given working-set size, printed as one JSON list of GB/s. `--weights auto` runs it
//! in a child process (`infer::weights::probe_in_child`), so that its buffers never count in
//! the peak RSS of the process that decodes.

use crate::device::read_bandwidth;
use anyhow::{bail, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Working-set sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub bytes: Vec<u64>,
}

pub fn run(args: &ProbeArgs) -> Result<()> {
    if args.bytes.contains(&0) {
        bail!("--bytes: sizes must be > 0");
    }
    // Enough passes to read ~512 MB per size (at least 3), after one untimed pass.
    let gbs: Vec<f64> =
        args.bytes.iter().map(|&b| read_bandwidth(b as usize, ((512u64 << 20) / b).clamp(3, 200) as usize)).collect();
    println!("{}", serde_json::to_string(&gbs)?);
    Ok(())
}
