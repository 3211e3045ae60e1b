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

use crate::checkpoint;
use crate::config::{Config, Mode};
use crate::data::{Meta, TokenFile};
use crate::params::ParamCounts;
use crate::plot::{self, Series};
use crate::train::{self, TrainArgs};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    title: String,
    seeds: Vec<u64>,
    /// The run that "% of vanilla" refers to.
    baseline: String,
    /// Pairs (a, b) whose difference in val loss the report states.
    #[serde(default)]
    compare: Vec<[String; 2]>,
    /// Runs the table shows a "Δ vs" column for.
    #[serde(default)]
    deltas: Vec<String>,
    /// Prefix of the chart file names (several plans can report into one results.md).
    #[serde(default)]
    charts_prefix: String,
    base: toml::Table,
    #[serde(default)]
    smoke: Option<Smoke>,
    #[serde(rename = "run")]
    runs: Vec<PlanRun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Smoke {
    seeds: Vec<u64>,
    #[serde(default)]
    set: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanRun {
    name: String,
    #[serde(default)]
    set: Vec<String>,
    /// Another run whose unique parameter count this one must match within ±5 %.
    #[serde(default, rename = "match")]
    match_params: Option<String>,
}

/// What a finished run leaves in `result.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub seed: u64,
    /// Mean loss over the whole validation split (`lors-lm eval` definition).
    pub val_loss: f64,
    pub val_tokens: usize,
    pub steps: usize,
    pub tokens: u64,
    /// Sum of the training steps' times (evaluation and checkpoints excluded).
    pub step_time_s: f64,
    pub tokens_per_sec: f64,
    /// Wall time of this invocation's training and evaluation (less than the run's whole
    /// time if it was resumed).
    pub wall_s: f64,
    pub resumed: bool,
    /// The commit the training binary was built from (with a note if the tree had changes).
    #[serde(default)]
    pub commit: String,
}

/// One configuration of the plan, resolved.
struct Resolved {
    name: String,
    cfg: Config,
    counts: ParamCounts,
}

fn load_plan(path: &Path) -> Result<Plan> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read --plan {}", path.display()))?;
    let plan: Plan = toml::from_str(&text).map_err(|e| anyhow::anyhow!("--plan {}: {}", path.display(), e))?;
    let mut seen = std::collections::HashSet::new();
    for r in &plan.runs {
        if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!(
                "--plan {}: run name {:?} must be non-empty and use only letters, digits, - _ .",
                path.display(),
                r.name
            );
        }
        if !seen.insert(r.name.as_str()) {
            bail!("--plan {}: run name {:?} appears twice", path.display(), r.name);
        }
    }
    if plan.runs.is_empty() || plan.seeds.is_empty() {
        bail!("--plan {}: needs at least one [[run]] and one seed", path.display());
    }
    let known = |n: &str| plan.runs.iter().any(|r| r.name == n);
    if !known(&plan.baseline) {
        bail!("--plan {}: baseline {:?} is not a run of the plan", path.display(), plan.baseline);
    }
    if !plan.charts_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
        bail!("--plan {}: charts_prefix {:?} may only use letters, digits, - _", path.display(), plan.charts_prefix);
    }
    let named = plan.compare.iter().flatten().chain(&plan.deltas);
    for name in named.chain(plan.runs.iter().filter_map(|r| r.match_params.as_ref())) {
        if !known(name) {
            bail!("--plan {}: {:?} (in compare, deltas or match) is not a run of the plan", path.display(), name);
        }
    }
    Ok(plan)
}

/// Resolve every run's config (base + smoke overrides + the run's overrides), with the
/// vocabulary and data directory filled in, and check the parameter matches.
fn resolve(plan: &Plan, smoke: bool, data_dir: &Path, vocab: usize, plan_path: &Path) -> Result<Vec<Resolved>> {
    let base = toml::to_string(&plan.base)?;
    let mut out = vec![];
    for r in &plan.runs {
        let mut sets = vec![];
        if smoke {
            let s = plan
                .smoke
                .as_ref()
                .with_context(|| format!("--smoke: the plan {} has no [smoke] section", plan_path.display()))?;
            sets.extend(s.set.iter().cloned());
        }
        sets.extend(r.set.iter().cloned());
        let origin = format!("{} (run {})", plan_path.display(), r.name);
        let mut cfg = Config::from_toml_str(&base, &sets, &origin)?;
        cfg.model.vocab_size = vocab;
        cfg.data.dir = data_dir.to_string_lossy().into_owned();
        let counts = ParamCounts::from_config(&cfg);
        out.push(Resolved { name: r.name.clone(), cfg, counts });
    }
    for r in &plan.runs {
        if let Some(target) = &r.match_params {
            let a = out.iter().find(|x| x.name == r.name).expect("resolved").counts.total() as f64;
            let b = out.iter().find(|x| &x.name == target).expect("checked in load_plan").counts.total() as f64;
            let rel = a / b - 1.0;
            if rel.abs() > 0.05 {
                bail!(
                    "{}: run {} must match the unique parameters of {} within ±5 %, but has {} vs {} ({:+.1} %): change its dims",
                    plan_path.display(),
                    r.name,
                    target,
                    a,
                    b,
                    100.0 * rel
                );
            }
        }
    }
    Ok(out)
}

fn plan_stem(plan: &Path) -> String {
    plan.file_stem().unwrap_or_default().to_string_lossy().into_owned()
}

/// How a run's rank/schedule/groups read in the table.
fn sharing_desc(cfg: &Config, show_d: bool) -> String {
    let l = &cfg.lors;
    let n = cfg.model.n_layers;
    let mut parts = vec![];
    match l.mode {
        Mode::Vanilla | Mode::Shared => parts.push(format!("{n} layers")),
        Mode::Lors => {
            let attn: Vec<usize> = (0..n).map(|i| l.rank_for("q", i)).collect();
            let ffn: Vec<usize> = (0..n).map(|i| l.rank_for("gate", i)).collect();
            let uniform = |v: &[usize]| v.iter().all(|&x| x == v[0]);
            if uniform(&attn) && uniform(&ffn) && attn[0] == ffn[0] {
                parts.push(format!("r={}", attn[0]));
            } else {
                let show = |v: &[usize]| if uniform(v) { v[0].to_string() } else { format!("{v:?}").replace(' ', "") };
                parts.push(format!("attn r={}, ffn r={}", show(&attn), show(&ffn)));
            }
        }
    }
    if l.mode != Mode::Vanilla && l.groups > 1 {
        parts.push(format!("{} groups", l.groups));
    }
    if l.mode == Mode::Lors {
        if l.init != crate::config::PrivateInit::Paper {
            parts.push(format!(
                "init {}",
                toml::Value::try_from(l.init).map(|v| v.to_string()).unwrap_or_default().trim_matches('"')
            ));
        }
        if let Some(a) = l.alpha {
            parts.push(format!("α={a}"));
        }
        if l.private_lr_mult != 1.0 {
            parts.push(format!("A,B lr×{}", l.private_lr_mult));
        }
        if let Some(m) = l.private_b_lr_mult {
            parts.push(format!("B lr×{m}"));
        }
        if let Some(w) = l.private_weight_decay {
            parts.push(format!("A,B wd {w}"));
        }
    }
    if l.mode != Mode::Vanilla && l.targets.len() < 7 {
        parts.push(format!("targets {}", l.targets.join(",")));
    }
    if show_d {
        parts.push(format!("d={}", cfg.model.d_model));
    }
    parts.join(", ")
}

/// Whether the runs differ in width (then the table names each run's d_model).
fn show_d(resolved: &[Resolved]) -> bool {
    resolved.iter().any(|r| r.cfg.model.d_model != resolved[0].cfg.model.d_model)
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Vanilla => "vanilla",
        Mode::Shared => "shared",
        Mode::Lors => "lors",
    }
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
            let res = train_one(r, *seed, &dir, &data_dir, &args.device, &final_eval)?;
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
    let report = report(&plan, &resolved, &seeds, &out, &meta, train_tokens, args)?;
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
            mode_name(r.cfg.lors.mode),
            sharing_desc(&r.cfg, show_d(resolved)),
            r.counts.total(),
            r.counts.vanilla_total
        );
    }
}

/// Train (or resume, or keep) one run and evaluate it on the whole validation split.
/// The whole validation split and the device, loaded once for every run's final evaluation.
struct FinalEval {
    tokens: Vec<u32>,
    device: candle_core::Device,
}

fn train_one(r: &Resolved, seed: u64, dir: &Path, data_dir: &Path, device: &str, ev: &FinalEval) -> Result<RunResult> {
    let mut cfg = r.cfg.clone();
    cfg.train.seed = seed;
    // One log line per evaluation keeps a long sweep's console readable.
    cfg.train.log_interval = cfg.train.eval_interval.max(1);
    let result_path = dir.join("result.json");
    let saved_cfg = dir.join("config.toml");
    let mut resume = false;
    if saved_cfg.is_file() {
        let old = Config::load(&saved_cfg, &[])?;
        if old != cfg {
            bail!(
                "{} holds a run of a different config (the plan changed?): delete that directory or pass another --out; nothing was overwritten",
                dir.display()
            );
        }
        if result_path.is_file() {
            let res: RunResult = serde_json::from_str(&fs::read_to_string(&result_path)?)
                .with_context(|| format!("{} is corrupt: delete it to evaluate again", result_path.display()))?;
            eprintln!("already finished: kept");
            return Ok(res);
        }
        resume = checkpoint::latest_step(dir)?.is_some();
    }
    fs::create_dir_all(dir)?;
    let plan_cfg = dir.with_extension("plan.toml");
    fs::write(&plan_cfg, cfg.to_toml()?).with_context(|| format!("cannot write {}", plan_cfg.display()))?;
    let start = Instant::now();
    let args = TrainArgs {
        config: Some(plan_cfg.clone()),
        data: Some(data_dir.to_path_buf()),
        out: Some(dir.to_path_buf()),
        sets: vec![],
        device: device.to_string(),
        resume,
        force: !resume,
        log_interval: None,
        stop_at: None,
        quiet: false,
    };
    let summary = train::run(&args)?;
    fs::remove_file(&plan_cfg).ok();
    if summary.final_step < cfg.train.max_steps {
        bail!(
            "{} stopped at step {} of {}: run the sweep again to resume it",
            dir.display(),
            summary.final_step,
            cfg.train.max_steps
        );
    }
    // The whole validation split, windows of train.seq_len (see `lors-lm eval`).
    let (_, ckpt) = checkpoint::resolve(dir, None)?;
    let (model, _) = checkpoint::load_model(&cfg, &ckpt, &ev.device)?;
    let ev = crate::eval::eval_tokens(&model.merged()?, &ev.tokens, cfg.train.seq_len, 16, &ev.device)?;
    let (steps, tokens_seen, step_ms) = step_totals(&read_metrics(&dir.join("metrics.jsonl"))?);
    let res = RunResult {
        name: r.name.clone(),
        seed,
        val_loss: ev.loss,
        val_tokens: ev.tokens,
        steps,
        tokens: tokens_seen,
        step_time_s: step_ms / 1e3,
        tokens_per_sec: tokens_seen as f64 / (step_ms / 1e3).max(1e-9),
        wall_s: start.elapsed().as_secs_f64(),
        resumed: resume,
        commit: git_commit(),
    };
    let tmp = result_path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&res)?)?;
    fs::rename(&tmp, &result_path)?;
    Ok(res)
}

/// The JSON lines of a run's metrics.jsonl.
fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("{} is corrupt", path.display()))).collect()
}

/// Training-step lines (those with a step time).
fn step_lines(metrics: &[serde_json::Value]) -> impl Iterator<Item = &serde_json::Value> {
    metrics.iter().filter(|v| v.get("ms").and_then(|m| m.as_f64()).is_some())
}

/// (last step, tokens seen, sum of step ms).
fn step_totals(metrics: &[serde_json::Value]) -> (usize, u64, f64) {
    step_lines(metrics).fold((0, 0, 0.0), |(_, _, ms), v| {
        (
            v["step"].as_u64().unwrap_or(0) as usize,
            v["tokens"].as_u64().unwrap_or(0),
            ms + v["ms"].as_f64().unwrap_or(0.0),
        )
    })
}

/// Median training-step time in ms: robust to a machine that was briefly busy with something
/// else (or a sweep paused and continued).
fn median_step_ms(metrics: &[serde_json::Value], path: &Path) -> Result<f64> {
    let mut ms: Vec<f64> = step_lines(metrics).filter_map(|v| v["ms"].as_f64()).collect();
    if ms.is_empty() {
        bail!("{} has no training steps", path.display());
    }
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    Ok(if n % 2 == 1 { ms[n / 2] } else { (ms[n / 2 - 1] + ms[n / 2]) / 2.0 })
}

/// (tokens, val_loss) of the periodic evaluations.
fn val_curve(metrics: &[serde_json::Value]) -> Vec<(f64, f64)> {
    metrics.iter().filter_map(|v| Some((v.get("tokens")?.as_f64()?, v.get("val_loss")?.as_f64()?))).collect()
}

/// Per-configuration summary over its seeds.
struct Row<'a> {
    r: &'a Resolved,
    results: Vec<RunResult>,
    curves: Vec<Vec<(f64, f64)>>,
    /// Median step time of each seed's run, ms.
    median_ms: Vec<f64>,
}

impl Row<'_> {
    fn mean(&self) -> Option<f64> {
        (!self.results.is_empty())
            .then(|| self.results.iter().map(|x| x.val_loss).sum::<f64>() / self.results.len() as f64)
    }
    /// Half the range over seeds: mean ± spread covers every seed.
    fn spread(&self) -> f64 {
        let v: Vec<f64> = self.results.iter().map(|x| x.val_loss).collect();
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        if v.is_empty() {
            0.0
        } else {
            (hi - lo) / 2.0
        }
    }
}

pub struct Report {
    /// The generated block, markers included.
    markdown: String,
    begin: String,
    end: String,
    prefix: String,
    curves: Vec<Series>,
    points: Vec<Series>,
    means: Vec<(String, usize, (f64, f64))>,
    front: Vec<(f64, f64)>,
}

fn report(
    plan: &Plan,
    resolved: &[Resolved],
    seeds: &[u64],
    out: &Path,
    meta: &Meta,
    train_tokens: usize,
    args: &SweepArgs,
) -> Result<Report> {
    let mut rows = vec![];
    for r in resolved {
        let mut results = vec![];
        let mut curves = vec![];
        let mut median_ms = vec![];
        for seed in seeds {
            let dir = out.join(&r.name).join(format!("seed{seed}"));
            let p = dir.join("result.json");
            if p.is_file() {
                let res: RunResult = serde_json::from_str(&fs::read_to_string(&p)?)
                    .with_context(|| format!("{} is corrupt: delete it and run the sweep again", p.display()))?;
                results.push(res);
                let path = dir.join("metrics.jsonl");
                let metrics = read_metrics(&path)?;
                curves.push(val_curve(&metrics));
                median_ms.push(median_step_ms(&metrics, &path)?);
            }
        }
        rows.push(Row { r, results, curves, median_ms });
    }
    if rows.iter().all(|row| row.results.is_empty()) {
        bail!("no finished runs in {}: run the sweep without --report-only first", out.display());
    }
    let baseline_total =
        resolved.iter().find(|r| r.name == plan.baseline).expect("checked in load_plan").counts.total() as f64;

    let t = &resolved[0].cfg.train;
    let tokens_per_step = t.batch_size * t.seq_len * t.grad_accum;
    let tokens_per_run = tokens_per_step * t.max_steps;
    let mut md = String::new();
    let mut cmd = format!("lors-lm sweep --plan {}{}", args.plan.display(), if args.smoke { " --smoke" } else { "" });
    for (flag, path) in [("--data", &args.data), ("--out", &args.out)] {
        if let Some(p) = path {
            cmd += &format!(" {flag} {}", p.display());
        }
    }
    let (begin, end) = markers(&plan_stem(&args.plan));
    let _ = writeln!(md, "{begin}");
    let _ = writeln!(md, "## {}\n", plan.title);
    let _ = writeln!(
        md,
        "_Generated by `{cmd}` (data {}, runs in {}); rerun it to regenerate this section. \
         Text outside the generated markers is kept._\n",
        Path::new(&resolved[0].cfg.data.dir).display(),
        out.display()
    );
    let mut commits: Vec<&str> = rows.iter().flat_map(|r| &r.results).map(|r| r.commit.as_str()).collect();
    commits.sort();
    commits.dedup();
    let _ = writeln!(
        md,
        "- trained at commit: {}",
        commits.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(md, "- machine: {}", machine());
    let _ = writeln!(
        md,
        "- data: {train_tokens} train tokens (vocabulary {}); every run: {} steps × {} tokens = {tokens_per_run} tokens ({:.2} epochs), \
         lr {:.0e} cosine to {:.0e}, warmup {}, weight decay {}, seeds {:?}",
        meta.vocab_size,
        t.max_steps,
        t.batch_size * t.seq_len * t.grad_accum,
        tokens_per_run as f64 / train_tokens.max(1) as f64,
        t.lr,
        t.min_lr,
        t.warmup_steps,
        t.weight_decay,
        seeds
    );
    let val_tokens = rows.iter().flat_map(|r| &r.results).map(|r| r.val_tokens).next().unwrap_or(0);
    let _ = writeln!(
        md,
        "- val loss: mean next-token cross-entropy over the whole validation split ({val_tokens} predicted tokens, \
         windows of {}), as `lors-lm eval` defines it; mean over seeds ± spread, where spread = half the range, \
         so the interval covers every seed",
        t.seq_len
    );
    let _ = writeln!(
        md,
        "- unique block params: shared bases + private weights of the projections (norm gains excluded); \
         total unique adds the embedding (tied head) and norms; % is of `{}`'s total",
        plan.baseline
    );
    let _ = writeln!(
        md,
        "- tokens/s: training tokens per second of the median step (forward, backward, clip, AdamW), mean over \
         seeds; train time = median step × steps (evaluations and checkpoints excluded). Runs are sequential, \
         each with every core\n"
    );
    if !plan.deltas.is_empty() {
        let _ = writeln!(
            md,
            "Δ = this row's mean val loss minus the named run's (negative = better); \
             (n.s.) = not significant: the difference is within the two seed spreads combined.\n"
        );
    }
    let _ = writeln!(
        md,
        "| config | mode | rank / schedule / groups / recipe | unique block params | total unique | % of {} | val loss (mean ± spread) | val ppl | tokens/s | train time (s) | seeds |{}",
        plan.baseline,
        plan.deltas.iter().map(|d| format!(" Δ vs {d} |")).collect::<String>()
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|{}", "---:|".repeat(plan.deltas.len()));
    let delta_to = |row: &Row, other: &str| -> String {
        let o = rows.iter().find(|r| r.r.name == other).expect("checked in load_plan");
        match (row.mean(), o.mean()) {
            _ if row.r.name == other => "0".into(),
            (Some(a), Some(b)) if (a - b).abs() > row.spread() + o.spread() => format!("{:+.4}", a - b),
            (Some(a), Some(b)) => format!("{:+.4} (n.s.)", a - b),
            _ => "—".into(),
        }
    };
    for row in &rows {
        let c = &row.r.counts;
        let (loss, ppl, tps, time) = match row.mean() {
            Some(m) => {
                let ms = row.median_ms.iter().sum::<f64>() / row.median_ms.len() as f64;
                (
                    format!("{m:.4} ± {:.4}", row.spread()),
                    format!("{:.1}", m.exp()),
                    format!("{:.0}", tokens_per_step as f64 / (ms / 1e3)),
                    format!("{:.1}", ms * t.max_steps as f64 / 1e3),
                )
            }
            None => ("not run".into(), "—".into(), "—".into(), "—".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} % | {loss} | {ppl} | {tps} | {time} | {}/{} |{}",
            row.r.name,
            mode_name(row.r.cfg.lors.mode),
            sharing_desc(&row.r.cfg, show_d(resolved)),
            c.block_projections(),
            c.total(),
            100.0 * c.total() as f64 / baseline_total,
            row.results.len(),
            seeds.len(),
            plan.deltas.iter().map(|d| format!(" {} |", delta_to(row, d))).collect::<String>()
        );
    }
    if !plan.compare.is_empty() {
        let _ = writeln!(md, "\nDifferences in val loss (negative = the first is better):\n");
        for [a, b] in &plan.compare {
            let (ra, rb) = (rows.iter().find(|r| &r.r.name == a), rows.iter().find(|r| &r.r.name == b));
            let (Some(ra), Some(rb)) = (ra, rb) else { continue };
            let (Some(ma), Some(mb)) = (ra.mean(), rb.mean()) else { continue };
            let d = ma - mb;
            let noise = ra.spread() + rb.spread();
            let verdict =
                if d.abs() > noise { "beyond the seed spread" } else { "within the seed spread: not a difference" };
            let _ = writeln!(
                md,
                "- `{a}` − `{b}`: {d:+.4} ({verdict}; spreads ±{:.4} and ±{:.4}; unique params {} vs {})",
                ra.spread(),
                rb.spread(),
                ra.r.counts.total(),
                rb.r.counts.total()
            );
        }
    }
    let pre = &plan.charts_prefix;
    let _ = writeln!(md, "\n![validation loss vs tokens]({pre}loss_curves.png)\n");
    let _ = writeln!(md, "![final validation loss vs unique parameters]({pre}params_vs_loss.png)\n");
    let _ = write!(md, "{end}");

    // Charts: mean curve per config (over seeds, at the same eval points).
    let mut curves = vec![];
    let mut points = vec![];
    let mut means = vec![];
    for (i, row) in rows.iter().enumerate() {
        if row.results.is_empty() {
            continue;
        }
        let mut by_tokens: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
        for c in &row.curves {
            for &(tok, l) in c {
                let e = by_tokens.entry(tok as u64).or_insert((0.0, 0));
                e.0 += l;
                e.1 += 1;
            }
        }
        let pts = by_tokens.iter().map(|(&tok, &(s, n))| (tok as f64 / 1e6, s / n as f64)).collect();
        curves.push(Series { name: row.r.name.clone(), color: i, points: pts });
        let x = row.r.counts.total() as f64 / 1e6;
        points.push(Series {
            name: row.r.name.clone(),
            color: i,
            points: row.results.iter().map(|res| (x, res.val_loss)).collect(),
        });
        means.push((row.r.name.clone(), i, (x, row.mean().expect("non-empty"))));
    }
    // Pareto front over config means: fewer params and lower loss.
    let mut sorted: Vec<(f64, f64)> = means.iter().map(|m| m.2).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut front: Vec<(f64, f64)> = vec![];
    for p in sorted {
        if front.last().is_none_or(|l| p.1 < l.1) {
            front.push(p);
        }
    }
    Ok(Report { markdown: md, begin, end, prefix: pre.clone(), curves, points, means, front })
}

/// Markers around the block a plan generates in results.md.
fn markers(plan_stem: &str) -> (String, String) {
    (
        format!("<!-- BEGIN GENERATED by lors-lm sweep --plan {plan_stem}: do not edit by hand -->"),
        format!("<!-- END GENERATED {plan_stem} -->"),
    )
}

/// Write results.md (replacing this plan's generated block, keeping everything else; a new
/// block is appended) and the charts.
fn write_results(docs: &Path, rep: &Report) -> Result<()> {
    let path = docs.join("results.md");
    let (begin, end) = (&rep.begin, &rep.end);
    let text = if path.is_file() {
        let old = fs::read_to_string(&path)?;
        match (old.find(begin.as_str()), old.find(end.as_str())) {
            (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], rep.markdown, &old[e + end.len()..]),
            (None, None) => format!("{}\n\n{}\n", old.trim_end(), rep.markdown),
            _ => bail!("{}: its generated block is damaged ({begin} ... {end}): repair or delete it", path.display()),
        }
    } else {
        format!("# Results\n\n{}\n", rep.markdown)
    };
    let tmp = path.with_extension("md.tmp");
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path)?;
    plot::lines(
        &docs.join(format!("{}loss_curves.png", rep.prefix)),
        "Validation loss during training (mean over seeds)",
        "tokens seen (millions)",
        "val loss (fixed val batches)",
        &rep.curves,
    )?;
    plot::scatter(
        &docs.join(format!("{}params_vs_loss.png", rep.prefix)),
        "Final val loss vs unique parameters (dots: seeds, squares: means, dashes: Pareto front)",
        "unique parameters (millions)",
        "val loss (whole val split)",
        &rep.points,
        &rep.means,
        &rep.front,
    )
}

/// The commit this binary was built from (recorded by build.rs).
fn git_commit() -> String {
    env!("LORS_LM_GIT_COMMIT").to_string()
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "{cpu}, {cores} cores available, {} candle threads, {} {}",
        candle_core::utils::get_num_threads(),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}
