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
//! [[run]]
//! name = "vanilla-2L-t100"          # a decay branch of a longer wsd run (sweep/branch.rs)
//! set = ["lors.mode=vanilla", "model.n_layers=2", "train.max_steps=1000"]
//! branch_of = "vanilla-2L-t300"
//! ```
//!
//! Runs live in `OUT/<name>/seed<k>`. The sweep can be stopped at any time and started again:
//! finished runs (with `result.json`) are kept, interrupted ones resume from their last
//! checkpoint, and a run directory that holds a different config is an error, never overwritten.
//! A run and its decay branches are one unit of work (a *chain*): the run trains in segments,
//! each branch starting from the checkpoint of its segment's end. With `--jobs N` chains run
//! in N child processes side by side (threads split between them), longest first; each
//! child's log is `OUT/logs/<run>-seed<k>.log`.

use crate::data::{Meta, TokenFile};
use crate::infer::perplexity::ByteLevel;
use crate::model::ParamCounts;
use crate::sweep::plan::{load_plan, plan_stem, resolve, sharing_desc, show_d, Plan, Resolved};
use crate::sweep::report::{report, write_results, ReportInput};
use crate::sweep::run::{train_chain, FinalEval};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// Train only these configurations (by name, repeatable); the report covers all. A decay
    /// branch's source is trained up to the branch's starting step.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<String>,
    /// Train only these seeds of the plan (repeatable); the report covers all.
    #[arg(long, value_name = "K")]
    pub seed: Vec<u64>,
    /// Train N chains (a run and its decay branches, per seed) side by side, each in a child
    /// process with cores / N threads (RAYON_NUM_THREADS), longest first. For models too thin
    /// to keep every core busy (e.g. d_model 32-64 on 2 cores).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub jobs: usize,
    /// Train, but do not write the report (what --jobs children do).
    #[arg(long, conflicts_with = "report_only")]
    pub no_report: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// A run with the decay branches that start from it, to train for one seed.
struct Chain<'a> {
    src: &'a Resolved,
    branches: Vec<&'a Resolved>,
    /// Train the source to its end (it was asked for), not only to its last branch's start.
    whole: bool,
    seed: u64,
}

impl Chain<'_> {
    fn names(&self) -> Vec<&str> {
        let src = self.whole.then_some(self.src.name.as_str());
        src.into_iter().chain(self.branches.iter().map(|b| b.name.as_str())).collect()
    }

    /// Training FLOPs the chain costs: the source's longest segment once, each branch's decay.
    fn flops(&self) -> f64 {
        let src_steps = match self.whole {
            true => self.src.cfg.train.max_steps,
            false => self.branches.iter().filter_map(|b| b.branch.as_ref().map(|(_, at)| *at)).max().unwrap_or(0),
        };
        let decays: usize =
            self.branches.iter().map(|b| b.cfg.train.max_steps - b.branch.as_ref().map_or(0, |x| x.1)).sum();
        run_flops(self.src, src_steps + decays)
    }
}

/// Training FLOPs of `steps` steps of `r`.
fn run_flops(r: &Resolved, steps: usize) -> f64 {
    let t = &r.cfg.train;
    let per_token = ParamCounts::train_flops(&r.cfg.model, &r.cfg.lors, t.seq_len, t.batch_size * t.seq_len).total();
    per_token * (t.batch_size * t.seq_len * t.grad_accum * steps) as f64
}

/// Tokens one run of `r` trains on.
fn run_tokens(r: &Resolved) -> usize {
    let t = &r.cfg.train;
    t.batch_size * t.seq_len * t.grad_accum * t.max_steps
}

/// The chains to train: every selected run that is no branch, with its selected branches (a
/// branch selected alone brings its source, trained up to the branch's start), per seed.
fn chains<'a>(resolved: &'a [Resolved], only: &[String], seeds: &[u64]) -> Vec<Chain<'a>> {
    let picked = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut out = vec![];
    for src in resolved.iter().filter(|r| r.branch.is_none()) {
        let branches: Vec<&Resolved> = resolved
            .iter()
            .filter(|b| b.branch.as_ref().is_some_and(|(from, _)| from == &src.name) && picked(&b.name))
            .collect();
        let whole = picked(&src.name);
        if whole || !branches.is_empty() {
            for &seed in seeds {
                out.push(Chain { src, branches: branches.clone(), whole, seed });
            }
        }
    }
    out
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
    for s in &args.seed {
        if !seeds.contains(s) {
            bail!("--seed {s}: not a seed of the plan ({seeds:?})");
        }
    }
    let train_seeds: Vec<u64> =
        seeds.iter().copied().filter(|s| args.seed.is_empty() || args.seed.contains(s)).collect();
    let train_tokens = TokenFile::open(&data_dir, "train", &meta)?.len();
    let tokenizer = data_dir.join("tokenizer.json");
    let bytes = match tokenizer.is_file() {
        true => ByteLevel::of(&crate::formats::load_tokenizer(&tokenizer)?),
        false => None,
    };
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }

    let mut todo = chains(&resolved, &args.only, &train_seeds);
    print_plan(&plan, &resolved, &seeds, train_tokens, &out);
    let total: f64 = todo.iter().map(Chain::flops).sum();
    eprintln!(
        "to train: {} chains (a run and its decay branches, per seed), {:.3e} training FLOPs (branches count their decay only)",
        todo.len(),
        total
    );
    if args.dry_run {
        return Ok(());
    }
    if !args.report_only {
        fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
        // Longest first: side by side, the last to start are the shortest.
        todo.sort_by(|a, b| b.flops().total_cmp(&a.flops()));
        if args.jobs > 1 {
            run_jobs(args, &todo, &out)?;
        } else {
            let val = TokenFile::open(&data_dir, "val", &meta)?;
            let device = crate::device::parse_device(&args.device)?;
            let final_eval = FinalEval { tokens: val.window(0, val.len())?, device, bytes: bytes.clone() };
            let sweep_start = Instant::now();
            for (i, c) in todo.iter().enumerate() {
                eprintln!(
                    "\n=== [{}/{}] {} seed {} → {}",
                    i + 1,
                    todo.len(),
                    c.names().join(", "),
                    c.seed,
                    out.display()
                );
                let results = train_chain(c.src, &c.branches, c.whole, c.seed, &out, &data_dir, &final_eval)?;
                for res in results {
                    eprintln!(
                        "=== {} seed {}: val loss {:.4}{} over the whole val split, {:.0} tok/s, {:.0} s | sweep {:.0} s so far",
                        res.name,
                        c.seed,
                        res.val_loss,
                        res.val_bpb.map_or(String::new(), |b| format!(" ({b:.4} bpb)")),
                        res.tokens_per_sec,
                        res.wall_s,
                        sweep_start.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    if args.no_report {
        return Ok(());
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
        byte_level: bytes.is_some(),
    };
    let report = report(&input)?;
    fs::create_dir_all(&docs).with_context(|| format!("cannot create {}", docs.display()))?;
    write_results(&docs, &report)?;
    let pre = &plan.charts_prefix;
    let charts = crate::sweep::report::CHARTS.iter().map(|c| docs.join(format!("{pre}{c}")).display().to_string());
    eprintln!("\nwrote {}, {}", docs.join("results.md").display(), charts.collect::<Vec<_>>().join(", "));
    Ok(())
}

/// Train the chains in `args.jobs` child processes side by side (each `sweep --only ...
/// --seed K --no-report`, with cores / jobs threads), logging into OUT/logs/.
fn run_jobs(args: &SweepArgs, todo: &[Chain], out: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable to start the jobs")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.jobs).max(1);
    let logs = out.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    eprintln!(
        "{} chains, {} side by side with {threads} thread(s) each; logs in {}",
        todo.len(),
        args.jobs,
        logs.display()
    );
    let start = Instant::now();
    let (mut running, mut next, mut failed): (Vec<(Child, String, PathBuf)>, usize, Vec<String>) = (vec![], 0, vec![]);
    while next < todo.len() || !running.is_empty() {
        while running.len() < args.jobs && next < todo.len() {
            let c = &todo[next];
            next += 1;
            let label = format!("{}-seed{}", c.src.name, c.seed);
            let log_path = logs.join(format!("{label}.log"));
            let log = fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
            let mut cmd = Command::new(&exe);
            cmd.arg("sweep").arg("--plan").arg(&args.plan).arg("--out").arg(out).arg("--no-report");
            cmd.args(["--device", &args.device, "--seed", &c.seed.to_string()]);
            if let Some(d) = &args.data {
                cmd.arg("--data").arg(d);
            }
            if args.smoke {
                cmd.arg("--smoke");
            }
            // The same chain: the source, unless only its branches were asked for.
            for n in c.names() {
                cmd.args(["--only", n]);
            }
            cmd.env("RAYON_NUM_THREADS", threads.to_string()).stdout(log.try_clone()?).stderr(log).stdin(Stdio::null());
            let child = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
            eprintln!("[{next}/{}] started {} ({}) → {}", todo.len(), label, c.names().join(", "), log_path.display());
            running.push((child, label, log_path));
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut i = 0;
        while i < running.len() {
            match running[i].0.try_wait()? {
                None => i += 1,
                Some(status) => {
                    let (_, label, log) = running.swap_remove(i);
                    let t = start.elapsed().as_secs_f64();
                    if status.success() {
                        eprintln!("finished {label} | sweep {t:.0} s so far");
                    } else {
                        eprintln!("FAILED {label} ({status}): see {}", log.display());
                        failed.push(format!("{label} (log {})", log.display()));
                    }
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} chain(s) failed: {}; run the sweep again to resume them", failed.len(), failed.join(", "));
    }
    Ok(())
}

fn print_plan(plan: &Plan, resolved: &[Resolved], seeds: &[u64], train_tokens: usize, out: &Path) {
    let base = &resolved[0].cfg.train;
    eprintln!("{}", plan.title);
    eprintln!(
        "{} configurations × {} seeds ({:?}), {} tokens per step; {} train tokens; runs in {}",
        resolved.len(),
        seeds.len(),
        seeds,
        base.batch_size * base.seq_len * base.grad_accum,
        train_tokens,
        out.display()
    );
    eprintln!(
        "{:<20} {:<8} {:<36} {:>9} {:>9} {:>11} {:>9} {:>7} {:>10} {:>10}  branch of",
        "config", "mode", "sharing", "block", "unique", "tokens", "tok/block", "epochs", "GFLOP/tok", "FLOPs"
    );
    for r in resolved {
        let tokens = run_tokens(r);
        let t = &r.cfg.train;
        let per_token =
            ParamCounts::train_flops(&r.cfg.model, &r.cfg.lors, t.seq_len, t.batch_size * t.seq_len).total();
        eprintln!(
            "{:<20} {:<8} {:<36} {:>9} {:>9} {:>11} {:>9.1} {:>7.2} {:>10.5} {:>10.3e}  {}",
            r.name,
            r.cfg.lors.mode.name(),
            sharing_desc(&r.cfg, show_d(resolved)),
            r.counts.block_projections(),
            r.counts.total(),
            tokens,
            tokens as f64 / r.counts.block_projections().max(1) as f64,
            tokens as f64 / train_tokens.max(1) as f64,
            per_token / 1e9,
            run_flops(r, t.max_steps),
            r.branch.as_ref().map_or(String::new(), |(from, at)| format!("{from} @ step {at}"))
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
