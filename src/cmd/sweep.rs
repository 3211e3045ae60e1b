//! `lors-lm sweep --plan FILE`: train every configuration of a plan with every seed on the
//! same data, tokens and schedule, evaluate each on the whole validation split, and write a
//! results table (`results.md`) and two charts (`loss_curves.png`, `params_vs_loss.png`).
//!
//! A plan is a TOML file (see configs/sweep-moby.toml):
//!
//! ```toml
//! title = "..."
//! seeds = [1, 2]
//! baseline = "vanilla"            # % of vanilla is measured against this run
//! compare = [["lors-r16", "shared"]]
//! [base.model] / [base.lors] / [base.train] / [base.data]   # a full run config
//! [smoke]                         # --smoke: the same pipeline, tiny and fast
//! seeds = [1, 2]
//! set = ["model.d_model=32", "train.max_steps=8"]
//! [[run]]
//! name = "vanilla-2L"
//! set = ["lors.mode=vanilla", "model.n_layers=2"]
//! match = "lors-r16"              # must have the same unique parameters within ±5 %
//! ```
//!
//! Runs live in `OUT/<name>/seed<k>`. The sweep can be stopped at any time and started again:
//! finished runs (with `result.json`) are kept, interrupted ones resume from their last
//! checkpoint, and a run directory that holds a different config is an error, never overwritten.

use crate::data::{Meta, TokenFile};
use crate::sweep::plan::{load_plan, plan_stem, resolve, sharing_desc, show_d, Plan, Resolved};
use crate::sweep::report::{report, write_results, ReportInput};
use crate::sweep::run::{train_one, FinalEval};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// Plan file (TOML): base config, seeds and the configurations to compare.
    #[arg(long, value_name = "FILE")]
    pub plan: PathBuf,
    /// Prepared data directory [default: the plan's base data.dir].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Directory for the runs [default: runs/<plan file stem>, with -smoke for --smoke].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Directory for results.md and the PNGs [default: docs, or OUT/report with --smoke].
    #[arg(long, value_name = "DIR")]
    pub docs: Option<PathBuf>,
    /// Run the same pipeline with the plan's [smoke] overrides: tiny models, a few steps.
    #[arg(long)]
    pub smoke: bool,
    /// Do not train: rebuild the table and charts from the runs already finished.
    #[arg(long, conflicts_with = "dry_run")]
    pub report_only: bool,
    /// Print the plan (configs, parameter counts, tokens, epochs) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Train only these configurations (by name, repeatable); the report covers all.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: &SweepArgs) -> Result<()> {
    let plan = load_plan(&args.plan)?;
    let stem = plan_stem(&args.plan);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(if args.smoke { format!("{stem}-smoke") } else { stem.clone() }));
    let docs = args.docs.clone().unwrap_or_else(|| if args.smoke { out.join("report") } else { PathBuf::from("docs") });
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            let dir = plan
                .base
                .get("data")
                .and_then(|d| d.get("dir"))
                .and_then(|d| d.as_str())
                .filter(|d| !d.is_empty())
                .with_context(|| format!("no data: pass --data DIR or set base.data.dir in {}", args.plan.display()))?;
            PathBuf::from(dir)
        }
    };
    let meta = Meta::load(&data_dir)?;
    let resolved = resolve(&plan, args.smoke, &data_dir, meta.vocab_size, &args.plan)?;
    for name in &args.only {
        if !resolved.iter().any(|r| &r.name == name) {
            bail!("--only {name}: not a run of {}", args.plan.display());
        }
    }
    let seeds =
        if args.smoke { plan.smoke.as_ref().expect("checked in resolve").seeds.clone() } else { plan.seeds.clone() };
    let train_tokens = TokenFile::open(&data_dir, "train", &meta)?.len();

    print_plan(&plan, &resolved, &seeds, train_tokens, &out);
    if args.dry_run {
        return Ok(());
    }
    if !args.report_only {
        fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
        let todo: Vec<(&Resolved, u64)> = resolved
            .iter()
            .filter(|r| args.only.is_empty() || args.only.contains(&r.name))
            .flat_map(|r| seeds.iter().map(move |&s| (r, s)))
            .collect();
        let val = TokenFile::open(&data_dir, "val", &meta)?;
        let final_eval =
            FinalEval { tokens: val.window(0, val.len())?, device: crate::device::parse_device(&args.device)? };
        let sweep_start = Instant::now();
        for (i, (r, seed)) in todo.iter().enumerate() {
            let dir = out.join(&r.name).join(format!("seed{seed}"));
            eprintln!("\n=== [{}/{}] {} seed {seed} → {}", i + 1, todo.len(), r.name, dir.display());
            let res = train_one(r, *seed, &dir, &data_dir, &final_eval)?;
            eprintln!(
                "=== {} seed {seed}: val loss {:.4} (ppl {:.2}) over the whole val split, {:.0} tok/s, {:.0} s | sweep {:.0} s so far",
                r.name,
                res.val_loss,
                res.val_loss.exp(),
                res.tokens_per_sec,
                res.wall_s,
                sweep_start.elapsed().as_secs_f64()
            );
        }
    }
    let input = ReportInput {
        plan: &plan,
        plan_stem: &stem,
        resolved: &resolved,
        seeds: &seeds,
        out: &out,
        meta: &meta,
        train_tokens,
        command: command_line(args),
    };
    let report = report(&input)?;
    fs::create_dir_all(&docs).with_context(|| format!("cannot create {}", docs.display()))?;
    write_results(&docs, &report)?;
    let pre = &plan.charts_prefix;
    eprintln!(
        "\nwrote {}, {}, {}",
        docs.join("results.md").display(),
        docs.join(format!("{pre}loss_curves.png")).display(),
        docs.join(format!("{pre}params_vs_loss.png")).display()
    );
    Ok(())
}

fn print_plan(plan: &Plan, resolved: &[Resolved], seeds: &[u64], train_tokens: usize, out: &Path) {
    let base = &resolved[0].cfg.train;
    let tokens = base.batch_size * base.seq_len * base.grad_accum * base.max_steps;
    eprintln!("{}", plan.title);
    eprintln!(
        "{} configurations × {} seeds ({:?}), {} steps × {} tokens = {} tokens per run ({:.2} epochs of {} train tokens), runs in {}",
        resolved.len(),
        seeds.len(),
        seeds,
        base.max_steps,
        base.batch_size * base.seq_len * base.grad_accum,
        tokens,
        tokens as f64 / train_tokens.max(1) as f64,
        train_tokens,
        out.display()
    );
    eprintln!("{:<16} {:<8} {:<40} {:>12} {:>12}", "config", "mode", "sharing", "unique", "vanilla eq.");
    for r in resolved {
        eprintln!(
            "{:<16} {:<8} {:<40} {:>12} {:>12}",
            r.name,
            r.cfg.lors.mode.name(),
            sharing_desc(&r.cfg, show_d(resolved)),
            r.counts.total(),
            r.counts.vanilla_total
        );
    }
}

/// The command that regenerates the report.
fn command_line(args: &SweepArgs) -> String {
    let mut cmd = format!("lors-lm sweep --plan {}{}", args.plan.display(), if args.smoke { " --smoke" } else { "" });
    for (flag, path) in [("--data", &args.data), ("--out", &args.out)] {
        if let Some(p) = path {
            cmd += &format!(" {flag} {}", p.display());
        }
    }
    cmd
}
