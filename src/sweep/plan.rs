//! A sweep plan (TOML): the base config, seeds, and the configurations to compare, each
//! resolved into a full run config.

use crate::config::{Config, Mode, PrivateInit, Proj, Schedule};
use crate::model::ParamCounts;
use crate::train::schedule::{decay_start, same_until};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::fs;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub title: String,
    pub seeds: Vec<u64>,
    /// The run that "% of vanilla" refers to.
    pub baseline: String,
    /// Pairs (a, b) whose difference in val loss the report states.
    #[serde(default)]
    pub compare: Vec<[String; 2]>,
    /// Runs the table shows a "Δ vs" column for.
    #[serde(default)]
    pub deltas: Vec<String>,
    /// Prefix of the chart file names (several plans can report into one results.md).
    #[serde(default)]
    pub charts_prefix: String,
    /// What `match` compares: "total" unique parameters (the default) or "block" (the
    /// blocks' projections alone, for plans whose budgets are in block parameters).
    #[serde(default)]
    pub match_by: MatchBy,
    pub base: toml::Table,
    #[serde(default)]
    pub smoke: Option<Smoke>,
    #[serde(rename = "run")]
    pub runs: Vec<PlanRun>,
}

/// What a run's `match` compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MatchBy {
    #[default]
    Total,
    Block,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoke {
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub set: Vec<String>,
    /// Multiply every run's train.max_steps and train.warmup_steps by this (after all sets;
    /// at least 2 steps): the plan's runs and branches, a few steps each.
    #[serde(default)]
    pub steps_scale: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRun {
    pub name: String,
    #[serde(default)]
    pub set: Vec<String>,
    /// Another run whose unique parameter count this one must match within ±5 %.
    #[serde(default, rename = "match")]
    pub match_params: Option<String>,
    /// A decay branch of another run of the plan (`sweep/branch.rs`): the same config with
    /// fewer `train.max_steps`, both `train.schedule = "wsd"`; it continues that run's
    /// checkpoint at the step where its own decay starts and trains only its decay.
    #[serde(default)]
    pub branch_of: Option<String>,
}

/// One configuration of the plan, resolved.
pub struct Resolved {
    pub name: String,
    pub cfg: Config,
    pub counts: ParamCounts,
    /// A decay branch: (source run, the source's step it continues).
    pub branch: Option<(String, usize)>,
}

pub fn load_plan(path: &Path) -> Result<Plan> {
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
    let branched = plan.runs.iter().filter_map(|r| r.branch_of.as_ref());
    for name in named.chain(plan.runs.iter().filter_map(|r| r.match_params.as_ref())).chain(branched) {
        if !known(name) {
            bail!(
                "--plan {}: {:?} (in compare, deltas, match or branch_of) is not a run of the plan",
                path.display(),
                name
            );
        }
    }
    for r in &plan.runs {
        let Some(src) = &r.branch_of else { continue };
        if plan.runs.iter().any(|s| &s.name == src && s.branch_of.is_some()) {
            bail!(
                "--plan {}: run {} branches from {src}, itself a branch: branch from the long run",
                path.display(),
                r.name
            );
        }
    }
    Ok(plan)
}

/// Resolve every run's config (base + smoke overrides + the run's overrides), with the
/// vocabulary and data directory filled in, and check the parameter matches.
pub fn resolve(plan: &Plan, smoke: bool, data_dir: &Path, vocab: usize, plan_path: &Path) -> Result<Vec<Resolved>> {
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
        if let Some(scale) = plan.smoke.as_ref().and_then(|s| s.steps_scale).filter(|_| smoke) {
            let t = &mut cfg.train;
            t.max_steps = ((t.max_steps as f64 * scale).round() as usize).max(2);
            t.warmup_steps = ((t.warmup_steps as f64 * scale).round() as usize).min(t.max_steps - t.decay_steps());
            cfg.validate().with_context(|| format!("{origin}, steps scaled by smoke.steps_scale = {scale}"))?;
        }
        cfg.model.vocab_size = vocab;
        cfg.data.dir = data_dir.to_string_lossy().into_owned();
        let counts = ParamCounts::new(&cfg.model, &cfg.lors);
        out.push(Resolved { name: r.name.clone(), cfg, counts, branch: None });
    }
    for i in 0..out.len() {
        let Some(src) = &plan.runs[i].branch_of else { continue };
        let from = out.iter().find(|x| &x.name == src).expect("checked in load_plan");
        let at =
            check_branch(&out[i], from).with_context(|| format!("{}: run {}", plan_path.display(), out[i].name))?;
        out[i].branch = Some((src.clone(), at));
    }
    let size = |c: &ParamCounts| match plan.match_by {
        MatchBy::Total => c.total(),
        MatchBy::Block => c.block_projections(),
    };
    for r in &plan.runs {
        if let Some(target) = &r.match_params {
            let a = size(&out.iter().find(|x| x.name == r.name).expect("resolved").counts) as f64;
            let b = size(&out.iter().find(|x| &x.name == target).expect("checked in load_plan").counts) as f64;
            let rel = a / b - 1.0;
            if rel.abs() > 0.05 {
                bail!(
                    "{}: run {} must match the unique {}parameters of {} within ±5 %, but has {} vs {} ({:+.1} %): change its dims",
                    plan_path.display(),
                    r.name,
                    if plan.match_by == MatchBy::Block { "block " } else { "" },
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

/// The step of `from` that the decay branch `b` continues: where b's decay starts. Refused
/// unless both are wsd runs of the same config but for b's fewer steps, and their learning
/// rates agree at every step up to it.
fn check_branch(b: &Resolved, from: &Resolved) -> Result<usize> {
    let (tb, tf) = (&b.cfg.train, &from.cfg.train);
    if tb.schedule != Schedule::Wsd || tf.schedule != Schedule::Wsd {
        bail!("branch_of {}: both runs need train.schedule = \"wsd\"", from.name);
    }
    let mut same = from.cfg.clone();
    same.train.max_steps = tb.max_steps;
    if same != b.cfg {
        let diff = b.cfg.differences(&from.cfg)?.into_iter().filter(|d| !d.starts_with("train.max_steps"));
        bail!(
            "branch_of {}: a branch differs from its source in train.max_steps alone, not in {}",
            from.name,
            diff.collect::<Vec<_>>().join(", ")
        );
    }
    let at = decay_start(tb);
    if tb.max_steps >= tf.max_steps || at == 0 || at > decay_start(tf) || !same_until(tf, tb, at) {
        bail!(
            "branch_of {}: its decay must start ({at}) after step 0 and within the stable phase of {} (steps up to {}), with fewer steps ({} vs {})",
            from.name,
            from.name,
            decay_start(tf),
            tb.max_steps,
            tf.max_steps
        );
    }
    Ok(at)
}

pub fn plan_stem(plan: &Path) -> String {
    plan.file_stem().unwrap_or_default().to_string_lossy().into_owned()
}

/// How a run's rank/schedule/groups read in the table.
pub fn sharing_desc(cfg: &Config, show_d: bool) -> String {
    let l = &cfg.lors;
    let n = cfg.model.n_layers;
    let mut parts = vec![];
    match l.mode {
        Mode::Vanilla | Mode::Shared => parts.push(format!("{n} layers")),
        Mode::Lors | Mode::Lowrank => {
            let attn: Vec<usize> = (0..n).map(|i| l.rank_for(Proj::Q, i)).collect();
            let ffn: Vec<usize> = (0..n).map(|i| l.rank_for(Proj::Gate, i)).collect();
            let uniform = |v: &[usize]| v.iter().all(|&x| x == v[0]);
            if uniform(&attn) && uniform(&ffn) && attn[0] == ffn[0] {
                parts.push(format!("r={}", attn[0]));
            } else {
                let show = |v: &[usize]| if uniform(v) { v[0].to_string() } else { format!("{v:?}").replace(' ', "") };
                parts.push(format!("attn r={}, ffn r={}", show(&attn), show(&ffn)));
            }
        }
    }
    if l.mode != Mode::Vanilla {
        match l.group_size {
            Some(k) => parts.push(format!("groups of {k}")),
            None if l.groups > 1 => parts.push(format!("{} groups", l.groups)),
            None => {}
        }
        if !l.private_layers.is_empty() {
            parts.push(format!("private layers {:?}", l.private_layers).replace(' ', ""));
        }
    }
    if matches!(l.mode, Mode::Lors | Mode::Lowrank) {
        if l.init != PrivateInit::Paper {
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
        parts.push(format!("targets {}", l.targets.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")));
    }
    if show_d {
        parts.push(format!("d={}", cfg.model.d_model));
    }
    parts.join(", ")
}

/// Whether the runs differ in width (then the table names each run's d_model).
pub fn show_d(resolved: &[Resolved]) -> bool {
    resolved.iter().any(|r| r.cfg.model.d_model != resolved[0].cfg.model.d_model)
}
