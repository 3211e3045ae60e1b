//! `lors-lm train`: resolve the config from the command line, then run a training session
//! (`train::session`).

use crate::config::Config;
use crate::train::{session, FitSummary, RunDir, SessionOptions};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// TOML config file (see configs/). With --resume it defaults to RUN_DIR/config.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Prepared data directory from `lors-lm prepare` (overrides data.dir).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Run directory for config, checkpoints and logs [default: runs/<config name>].
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start afresh in an --out that holds another run (its checkpoints and logs are deleted).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Print a log line every N steps (overrides train.log_interval).
    #[arg(long, value_name = "N")]
    pub log_interval: Option<usize>,
    /// Stop after this step, checkpointing it, as if interrupted (continue with --resume).
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<usize>,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: &TrainArgs) -> Result<FitSummary> {
    let out = match (&args.out, &args.config) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => PathBuf::from("runs").join(c.file_stem().unwrap_or_default()),
        (None, None) => bail!("pass --config FILE (or --out RUN_DIR with --resume)"),
    };
    let run = RunDir::at(&out);
    let cfg_path = match (&args.config, args.resume) {
        (Some(c), _) => c.clone(),
        (None, true) => run.config_path(),
        (None, false) => bail!("pass --config FILE"),
    };
    if args.resume {
        // Say what is missing in the run directory before which file could not be read.
        run.checkpoint(None).with_context(|| format!("--resume: nothing to resume in {}", out.display()))?;
    }
    let mut cfg = Config::load(&cfg_path, &args.sets)?;
    if let Some(n) = args.log_interval {
        if n == 0 {
            bail!("--log-interval must be > 0");
        }
        cfg.train.log_interval = n;
    }
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None if !cfg.data.dir.is_empty() => PathBuf::from(&cfg.data.dir),
        None => bail!("no data: pass --data DIR (from `lors-lm prepare`) or set data.dir in the config"),
    };
    let device = crate::device::parse_device(&args.device)?;
    let opts = SessionOptions { resume: args.resume, force: args.force, quiet: args.quiet, stop_at: args.stop_at };
    session::train(cfg, &data_dir, &run, &device, &opts)
}
