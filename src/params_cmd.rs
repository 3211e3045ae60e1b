//! `lors-lm params`: the parameter table of a config.

use crate::config::Config;
use crate::params::ParamCounts;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ParamsArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config key, e.g. --set lors.rank=32 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Prepared data directory, to take the vocabulary size from when model.vocab_size = 0.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &ParamsArgs) -> Result<()> {
    let mut cfg = Config::load(&args.config, &args.sets)?;
    if cfg.model.vocab_size == 0 {
        let dir = match (&args.data, cfg.data.dir.is_empty()) {
            (Some(d), _) => d.clone(),
            (None, false) => PathBuf::from(&cfg.data.dir),
            (None, true) => bail!("model.vocab_size is 0 (taken from the data): pass --data DIR or --set model.vocab_size=N"),
        };
        cfg.model.vocab_size = crate::data::Meta::load(&dir)?.vocab_size;
    }
    let c = ParamCounts::from_config(&cfg);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "embedding": c.embedding, "shared": c.shared, "private": c.private, "norm": c.norm,
                "head": c.head, "total_unique": c.total(), "vanilla_total": c.vanilla_total,
                "reduction_pct": c.reduction_pct(),
            })
        );
    } else {
        println!("config: {} (mode {:?}, vocab {})", args.config.display(), cfg.lors.mode, cfg.model.vocab_size);
        print!("{}", c.table());
    }
    Ok(())
}
