//! `lors-lm params`: the parameter table of a config, with the training FLOPs of a token and
//! the weight bytes a decoding step reads (merged and factored).

use crate::config::Config;
use crate::model::{ParamCounts, Weights};
use crate::train::RunDir;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ParamsArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE", required_unless_present = "run", conflicts_with = "run")]
    pub config: Option<PathBuf>,
    /// A trained run instead of a config: also reports the size on disk of its LORS
    /// checkpoint vs the merged export.
    #[arg(long, value_name = "RUN_DIR")]
    pub run: Option<PathBuf>,
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
    if let Some(run) = &args.run {
        return run_for_run_dir(run, args.json);
    }
    let config = args.config.as_ref().expect("clap requires --config or --run");
    let mut cfg = Config::load(config, &args.sets)?;
    if cfg.model.vocab_size == 0 {
        let dir = match (&args.data, cfg.data.dir.is_empty()) {
            (Some(d), _) => d.clone(),
            (None, false) => PathBuf::from(&cfg.data.dir),
            (None, true) => {
                bail!("model.vocab_size is 0 (taken from the data): pass --data DIR or --set model.vocab_size=N")
            }
        };
        cfg.model.vocab_size = crate::data::Meta::load(&dir)?.vocab_size;
    }
    let c = ParamCounts::new(&cfg.model, &cfg.lors);
    print_counts(&c, &cfg, &config.display().to_string(), args.json, None);
    Ok(())
}

/// Parameter table of a trained run plus checkpoint vs merged-export sizes.
fn run_for_run_dir(run: &std::path::Path, json: bool) -> Result<()> {
    let run_dir = RunDir::open(run)?;
    let loaded = run_dir.load(None, &candle_core::Device::Cpu)?;
    let ckpt = run_dir.checkpoint(Some(loaded.step))?;
    let lors_bytes = std::fs::metadata(ckpt.dir.join("model.safetensors"))?.len() as usize;
    let merged_bytes = crate::formats::hf::merged_size_bytes(&loaded.model)?;
    let c = ParamCounts::new(&loaded.cfg.model, &loaded.cfg.lors);
    print_counts(&c, &loaded.cfg, &run.display().to_string(), json, Some((lors_bytes, merged_bytes)));
    Ok(())
}

fn print_counts(c: &ParamCounts, cfg: &Config, origin: &str, json: bool, sizes: Option<(usize, usize)>) {
    let t = &cfg.train;
    let flops = ParamCounts::train_flops(&cfg.model, &cfg.lors, t.seq_len, t.batch_size * t.seq_len);
    let bytes = |w| ParamCounts::decode_bytes(&cfg.model, &cfg.lors, w);
    let (merged, factored) = (bytes(Weights::Merged), bytes(Weights::Factored));
    let bf16 = t.dtype == "bf16";
    let mem = c.train_memory(&cfg.model, &cfg.lors, t.batch_size, t.seq_len, bf16);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "embedding": c.embedding, "shared": c.shared, "private": c.private, "norm": c.norm,
                "head": c.head, "total_unique": c.total(), "vanilla_total": c.vanilla_total,
                "block_unique": c.block_projections(),
                "reduction_pct": c.reduction_pct(),
                "allreduce_bytes_per_step": 4 * c.total(), "vanilla_allreduce_bytes_per_step": 4 * c.vanilla_total,
                "checkpoint_bytes": sizes.map(|s| s.0), "merged_export_bytes": sizes.map(|s| s.1),
                "train_flops_per_token": {
                    "dense": flops.dense, "attention": flops.attention, "head": flops.head,
                    "lors_merge": flops.lors_merge, "total": flops.total(),
                    "mfu_formula": ParamCounts::flops_per_token(&cfg.model, t.seq_len),
                    "seq_len": t.seq_len, "batch_tokens": t.batch_size * t.seq_len,
                },
                "train_memory_bytes": {
                    "params": mem.params, "grads": mem.grads, "optimizer": mem.optimizer,
                    "step_weights": mem.step_weights, "activations": mem.activations,
                    "attention_scores": mem.attention_scores, "logits": mem.logits, "total": mem.total(),
                    "batch_size": t.batch_size, "seq_len": t.seq_len, "bf16": bf16,
                },
                "decode_bytes_per_token": {
                    "merged": {"read": merged.read, "distinct": merged.distinct},
                    "factored": {"read": factored.read, "distinct": factored.distinct},
                },
            })
        );
    } else {
        println!("{origin} (mode {:?}, vocab {})", cfg.lors.mode, cfg.model.vocab_size);
        print!("{}", c.table());
        // What a data-parallel step all-reduces: the f32 gradients of the unique parameters.
        let (mine, vanilla) = (4 * c.total(), 4 * c.vanilla_total);
        println!(
            "{:<28} {:>11.2} MB/step per rank (vanilla at same dims {:.2} MB, {:.2}x)",
            "data-parallel all-reduce",
            mine as f64 / 1e6,
            vanilla as f64 / 1e6,
            vanilla as f64 / mine.max(1) as f64
        );
        println!(
            "{:<28} {:>11.3} MFLOP/token (6N {:.3} + attention 12·L·d·T {:.3} + LM head 6·V·d {:.3} + LORS merge {:.4}; T = {}, B·T = {})",
            "training compute",
            flops.total() / 1e6,
            flops.dense / 1e6,
            flops.attention / 1e6,
            flops.head / 1e6,
            flops.lors_merge / 1e6,
            t.seq_len,
            t.batch_size * t.seq_len
        );
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "{:<28} {:>11.0} MiB held by a step's tensors (B {} × T {}, {}; an estimate and a floor: peaks measured 1.5-1.9× \
             it on the CPU's plain ops): parameters {:.0} + gradients {:.0} + AdamW {:.0} + weight copies {:.0} + \
             activations {:.0} + attention scores {:.0} + logits {:.0}",
            "training memory",
            mib(mem.total()),
            t.batch_size,
            t.seq_len,
            if bf16 { "bf16 matmuls" } else { "f32" },
            mib(mem.params),
            mib(mem.grads),
            mib(mem.optimizer),
            mib(mem.step_weights),
            mib(mem.activations),
            mib(mem.attention_scores),
            mib(mem.logits)
        );
        for (name, b) in [("decode reads, merged", merged), ("decode reads, factored", factored)] {
            println!(
                "{name:<28} {:>11.3} MB/token (f32; {:.3} MB distinct)",
                b.read as f64 / 1e6,
                b.distinct as f64 / 1e6
            );
        }
        if let Some((lors, merged)) = sizes {
            println!("{:<28} {:>11.2} MB", "checkpoint (unique, f32)", lors as f64 / 1e6);
            println!("{:<28} {:>11.2} MB", "merged export (f32)", merged as f64 / 1e6);
            println!("{:<28} {:>12.2}x", "export / checkpoint", merged as f64 / lors.max(1) as f64);
        }
    }
}
