//! The sweep's report: a markdown table (mean ± spread over seeds, % of the baseline, tokens
//! per block parameter, epochs, training FLOPs, bits per byte on byte-level data, decode bytes
//! and speed, deltas and comparisons) in a generated block of results.md; the validation
//! curves, and three frontier charts (val loss against unique parameters, training FLOPs and
//! batch-1 decode tokens/s), whose points and Pareto fronts are also listed in
//! `<prefix>frontiers.csv` and, the fronts, in the markdown.

use crate::config::Mode;
use crate::data::Meta;
use crate::model::{ParamCounts, Weights};
use crate::monitor::plot::{self, Series};
use crate::sweep::plan::{sharing_desc, show_d, Plan, Resolved};
use crate::sweep::run::{final_train_loss, median_step_ms, read_metrics, val_curve, RunResult};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// What the report is about.
pub struct ReportInput<'a> {
    pub plan: &'a Plan,
    pub plan_stem: &'a str,
    pub resolved: &'a [Resolved],
    pub seeds: &'a [u64],
    /// Where the runs are.
    pub out: &'a Path,
    pub meta: &'a Meta,
    pub train_tokens: usize,
    /// The command that regenerates the report.
    pub command: String,
    /// The data's tokenizer is byte-level: the table shows bits per byte.
    pub byte_level: bool,
}

/// The chart files a report writes (each name after the plan's `charts_prefix`).
pub const CHARTS: [&str; 4] = ["loss_curves.png", "params_vs_loss.png", "flops_vs_loss.png", "decode_vs_loss.png"];
/// The points of the three frontier charts, with whether each mean is on its Pareto front.
pub const FRONTIERS_CSV: &str = "frontiers.csv";

/// Per-configuration summary over its seeds.
struct Row<'a> {
    r: &'a Resolved,
    results: Vec<RunResult>,
    curves: Vec<Vec<(f64, f64)>>,
    /// Median step time of each seed's run, ms.
    median_ms: Vec<f64>,
    /// Each seed's val loss minus its training loss at the end (`final_train_loss`).
    gaps: Vec<Option<f64>>,
}

impl Row<'_> {
    /// Mean over seeds of `f` (None without finished seeds, or where any lacks it).
    fn mean_of(&self, f: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
        mean_all(self.results.iter().map(f))
    }
    /// Half the range over seeds of `f`.
    fn spread_of(&self, f: impl Fn(&RunResult) -> Option<f64>) -> f64 {
        half_range(self.results.iter().filter_map(f))
    }
    /// Mean over seeds of val − train (None where a seed lacks training steps).
    fn mean_gap(&self) -> Option<f64> {
        mean_all(self.gaps.iter().copied())
    }
    /// Half the range over seeds of val − train.
    fn gap_spread(&self) -> f64 {
        half_range(self.gaps.iter().flatten().copied())
    }
    /// Mean val loss over seeds (None without finished seeds).
    fn mean(&self) -> Option<f64> {
        self.mean_of(|x| Some(x.val_loss))
    }
    /// Half the range over seeds: mean ± spread covers every seed.
    fn spread(&self) -> f64 {
        self.spread_of(|x| Some(x.val_loss))
    }
}

/// Mean of `v` (None when empty or where any value is missing).
fn mean_all(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = v.collect();
    v.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// Half the range of `v` (0 when empty): mean ± this covers every value.
fn half_range(v: impl Iterator<Item = f64>) -> f64 {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if lo > hi {
        0.0
    } else {
        (hi - lo) / 2.0
    }
}

pub struct Report {
    /// The generated block, markers included.
    markdown: String,
    begin: String,
    end: String,
    prefix: String,
    curves: Vec<Series>,
    frontiers: Vec<Frontier>,
}

/// One frontier chart: every finished configuration's seeds and mean against one axis.
struct Frontier {
    /// File name after the prefix, and what the CSV calls it.
    file: &'static str,
    title: &'static str,
    x_desc: &'static str,
    points: Vec<Series>,
    means: Vec<(String, usize, (f64, f64))>,
    /// Pareto front over the means, in x order.
    front: Vec<(f64, f64)>,
    /// Lower x is better (parameters, FLOPs), else higher (decode speed).
    lower_better: bool,
}

/// Build the report from the finished runs in `input.out`.
pub fn report(input: &ReportInput) -> Result<Report> {
    let rows = collect_rows(input)?;
    let (begin, end) = markers(input.plan_stem);
    let mut md = String::new();
    let _ = writeln!(md, "{begin}");
    header(&mut md, input, &rows);
    table(&mut md, input, &rows);
    comparisons(&mut md, input.plan, &rows);
    let pre = &input.plan.charts_prefix;
    let (curves, frontiers) = chart_series(&rows);
    let _ = writeln!(md, "\n![validation loss vs tokens]({pre}loss_curves.png)\n");
    // A frontier with nothing to place (runs from before decode timing) gets no chart.
    for f in frontiers.iter().filter(|f| !f.means.is_empty()) {
        let _ = writeln!(md, "![{}]({pre}{})\n", f.title, f.file);
        let mut on: Vec<&(String, usize, (f64, f64))> = f.means.iter().filter(|m| f.front.contains(&m.2)).collect();
        on.sort_by(|a, b| a.2 .0.total_cmp(&b.2 .0)); // in x order, as the front is drawn
        let on: Vec<&str> = on.iter().map(|m| m.0.as_str()).collect();
        let _ = writeln!(md, "Pareto front ({}): {}\n", f.x_desc, on.join(" → "));
    }
    let _ = writeln!(md, "Every finished row's points: [{pre}{FRONTIERS_CSV}]({pre}{FRONTIERS_CSV}).\n");
    let _ = write!(md, "{end}");
    Ok(Report { markdown: md, begin, end, prefix: pre.clone(), curves, frontiers })
}

/// Each configuration's finished seeds: results, validation curves, median step times.
fn collect_rows<'a>(input: &ReportInput<'a>) -> Result<Vec<Row<'a>>> {
    let mut rows = vec![];
    for r in input.resolved {
        let (mut results, mut curves, mut median_ms, mut gaps) = (vec![], vec![], vec![], vec![]);
        for seed in input.seeds {
            let dir = input.out.join(&r.name).join(format!("seed{seed}"));
            if let Some(res) = RunResult::read(&dir)? {
                let path = dir.join("metrics.jsonl");
                let metrics = read_metrics(&path)?;
                curves.push(val_curve(&metrics));
                median_ms.push(median_step_ms(&metrics, &path)?);
                gaps.push(final_train_loss(&metrics).map(|train| res.val_loss - train));
                results.push(res);
            }
        }
        rows.push(Row { r, results, curves, median_ms, gaps });
    }
    if rows.iter().all(|row| row.results.is_empty()) {
        bail!("no finished runs in {}: run the sweep without --report-only first", input.out.display());
    }
    Ok(rows)
}

/// Title, provenance, data, and how to read the table.
fn header(md: &mut String, input: &ReportInput, rows: &[Row]) {
    let (plan, resolved, seeds, meta, train_tokens) =
        (input.plan, input.resolved, input.seeds, input.meta, input.train_tokens);
    let _ = writeln!(md, "## {}\n", plan.title);
    let _ = writeln!(
        md,
        "_Generated by `{}` (data {}, runs in {}); rerun it to regenerate this section. \
         Text outside the generated markers is kept._\n",
        input.command,
        Path::new(&resolved[0].cfg.data.dir).display(),
        input.out.display()
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
    let t = &resolved[0].cfg.train;
    let tokens_per_step = t.batch_size * t.seq_len * t.grad_accum;
    let tokens_per_run = tokens_per_step * t.max_steps;
    let schedule = match t.schedule {
        crate::config::Schedule::Cosine => format!("lr {:.0e} cosine to {:.0e}", t.lr, t.min_lr),
        crate::config::Schedule::Wsd => format!(
            "lr {:.0e} warmup-stable-decay (held, then linear to {:.0e} over the last {:.0} % of each run's steps)",
            t.lr,
            t.min_lr,
            100.0 * t.decay_frac
        ),
    };
    let same_steps = resolved.iter().all(|r| r.cfg.train.max_steps == t.max_steps);
    let _ = writeln!(
        md,
        "- data: {train_tokens} train tokens (vocabulary {}{}); {}, {schedule}, warmup {}, weight decay {}, seeds {:?}",
        meta.vocab_size,
        if input.byte_level { ", byte-level" } else { "" },
        match same_steps {
            true => format!(
                "every run: {} steps × {tokens_per_step} tokens = {tokens_per_run} tokens ({:.2} epochs)",
                t.max_steps,
                tokens_per_run as f64 / train_tokens.max(1) as f64
            ),
            false => format!("{tokens_per_step} tokens per step, steps per row (tokens column)"),
        },
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
    if input.byte_level {
        let _ = writeln!(
            md,
            "- val bpb: bits per byte, the same loss in bits per byte of text (every id is a byte but <|endoftext|>, \
             whose loss counts and which adds no byte: infer/perplexity.rs); mean ± spread over seeds"
        );
    }
    let _ = writeln!(
        md,
        "- val − train: val loss minus the training loss over the run's last 5 % of steps (at least 10; each \
         batch's loss before its update), mean ± spread over seeds: it grows where text repeats (epochs > 1) and \
         the model starts to memorise it; a loss still falling inside that window makes it read low in short runs"
    );
    let _ = writeln!(
        md,
        "- tokens / block param: training tokens per unique block parameter; epochs: passes over the train split; \
         train FLOPs: forward + backward of the run, `ParamCounts::train_flops` × tokens (PaLM's 6N over the layers \
         applied + 12·L·d·T attention + 6·V·d LM head + the LORS merge: `lors-lm params` breaks it down)"
    );
    let _ = writeln!(
        md,
        "- decode: weight MB one batch-1 step reads / distinct MB among them (f32; f = factored, the unique \
         parameters, for shared and LORS models; m = merged for vanilla), and tokens/s of batch-1 decoding in that \
         form, measured at the end of each run (128 tokens after 16, median of 3; mean over seeds; as many threads \
         as the training had, so rows trained side by side (--jobs) are timed on a shared machine)"
    );
    let branches: Vec<String> = resolved
        .iter()
        .filter_map(|r| r.branch.as_ref().map(|(from, at)| format!("`{}` from `{from}` at step {at}", r.name)))
        .collect();
    if !branches.is_empty() {
        let _ = writeln!(
            md,
            "- decay branches (wsd: same run as the source up to where the branch's decay starts, then its own decay; \
             its tokens, FLOPs and train time count the shared part too): {}",
            branches.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "- tokens/s: training tokens per second of the median step (forward, backward, clip, AdamW), mean over \
         seeds; train time = median step × steps (evaluations and checkpoints excluded)\n"
    );
    if !plan.deltas.is_empty() {
        let _ = writeln!(
            md,
            "Δ = this row's mean val loss minus the named run's (negative = better); \
             (n.s.) = not significant: the difference is within the two seed spreads combined.\n"
        );
    }
}

/// One row per configuration.
fn table(md: &mut String, input: &ReportInput, rows: &[Row]) {
    let (plan, resolved, seeds) = (input.plan, input.resolved, input.seeds);
    let baseline_total = resolved.iter().find(|r| r.name == plan.baseline).map_or(1.0, |r| r.counts.total() as f64);
    let (bpb_head, bpb_align) = if input.byte_level { (" val bpb |", "---:|") } else { (" val ppl |", "---:|") };
    let _ = writeln!(
        md,
        "| config | mode | rank / schedule / groups / recipe | unique block params | total unique | % of {} | tokens | tokens / block param | epochs | train FLOPs | val loss (mean ± spread) |{bpb_head} val − train | decode MB read / distinct | decode tok/s | tokens/s | train time (s) | seeds |{}",
        plan.baseline,
        plan.deltas.iter().map(|d| format!(" Δ vs {d} |")).collect::<String>()
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|{bpb_align}---:|---:|---:|---:|---:|---:|{}",
        "---:|".repeat(plan.deltas.len())
    );
    let delta_to = |row: &Row, other: &str| -> String {
        let o = rows.iter().find(|r| r.r.name == other).expect("checked in load_plan");
        match (row.mean(), o.mean()) {
            _ if row.r.name == other => "0".into(),
            (Some(a), Some(b)) if (a - b).abs() > row.spread() + o.spread() => format!("{:+.4}", a - b),
            (Some(a), Some(b)) => format!("{:+.4} (n.s.)", a - b),
            _ => "—".into(),
        }
    };
    for row in rows {
        let c = &row.r.counts;
        let cfg = &row.r.cfg;
        let t = &cfg.train;
        let tokens_per_step = t.batch_size * t.seq_len * t.grad_accum;
        let tokens = tokens_per_step * t.max_steps;
        let flops = ParamCounts::train_flops(&cfg.model, &cfg.lors, t.seq_len, t.batch_size * t.seq_len).total();
        let w = if cfg.lors.mode == Mode::Vanilla { Weights::Merged } else { Weights::Factored };
        let bytes = ParamCounts::decode_bytes(&cfg.model, &cfg.lors, w);
        let (loss, second, tps, time) = match row.mean() {
            Some(m) => {
                let ms = row.median_ms.iter().sum::<f64>() / row.median_ms.len() as f64;
                let second = match input.byte_level {
                    true => row
                        .mean_of(|r| r.val_bpb)
                        .map_or("—".into(), |b| format!("{b:.4} ± {:.4}", row.spread_of(|r| r.val_bpb))),
                    false => format!("{:.1}", m.exp()),
                };
                (
                    format!("{m:.4} ± {:.4}", row.spread()),
                    second,
                    format!("{:.0}", tokens_per_step as f64 / (ms / 1e3)),
                    format!("{:.1}", ms * t.max_steps as f64 / 1e3),
                )
            }
            None => ("not run".into(), "—".into(), "—".into(), "—".into()),
        };
        let decode =
            row.mean_of(|r| r.decode.as_ref().map(|d| d.tokens_per_sec)).map_or("—".into(), |x| format!("{x:.0}"));
        let gap = row.mean_gap().map_or("—".into(), |g| format!("{g:+.4} ± {:.4}", row.gap_spread()));
        let mut sharing = sharing_desc(cfg, show_d(resolved));
        if let Some((from, at)) = &row.r.branch {
            sharing += &format!(", branch of {from} @ {at}");
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} % | {tokens} | {:.1} | {:.2} | {:.3e} | {loss} | {second} | {gap} | {:.3} / {:.3} ({}) | {decode} | {tps} | {time} | {}/{} |{}",
            row.r.name,
            cfg.lors.mode,
            sharing,
            c.block_projections(),
            c.total(),
            100.0 * c.total() as f64 / baseline_total,
            tokens as f64 / c.block_projections().max(1) as f64,
            tokens as f64 / input.train_tokens.max(1) as f64,
            flops * tokens as f64,
            bytes.read as f64 / 1e6,
            bytes.distinct as f64 / 1e6,
            &w.name()[..1],
            row.results.len(),
            seeds.len(),
            plan.deltas.iter().map(|d| format!(" {} |", delta_to(row, d))).collect::<String>()
        );
    }
}

/// The plan's `compare` pairs: difference of means against the seed spreads.
fn comparisons(md: &mut String, plan: &Plan, rows: &[Row]) {
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
}

/// Chart data: each configuration's mean validation curve (over seeds, at the same eval
/// points), and the three frontiers: its seeds' final losses and their mean against unique
/// parameters, training FLOPs (log10) and batch-1 decode tokens/s, with the Pareto fronts.
fn chart_series(rows: &[Row]) -> (Vec<Series>, Vec<Frontier>) {
    let mut curves = vec![];
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
    }
    type X = fn(&Row, &RunResult) -> Option<f64>;
    let axes: [(&'static str, &'static str, &'static str, bool, X); 3] = [
        (
            "params_vs_loss.png",
            "Final val loss vs unique parameters (dots: seeds, squares: means, dashes: Pareto front)",
            "unique parameters (millions)",
            true,
            |row, _| Some(row.r.counts.total() as f64 / 1e6),
        ),
        (
            "flops_vs_loss.png",
            "Final val loss vs training FLOPs (dots: seeds, squares: means, dashes: Pareto front)",
            "training FLOPs (log10)",
            true,
            |_, res| (res.train_flops > 0.0).then(|| res.train_flops.log10()),
        ),
        (
            "decode_vs_loss.png",
            "Final val loss vs batch-1 decode speed, factored where it applies (Pareto front: dashes)",
            "decode tokens/s (batch 1)",
            false,
            |_, res| res.decode.as_ref().map(|d| d.tokens_per_sec),
        ),
    ];
    let frontiers = axes
        .into_iter()
        .map(|(file, title, x_desc, lower_better, x)| {
            let (mut points, mut means) = (vec![], vec![]);
            for (i, row) in rows.iter().enumerate() {
                let pts: Vec<(f64, f64)> =
                    row.results.iter().filter_map(|res| Some((x(row, res)?, res.val_loss))).collect();
                if pts.is_empty() {
                    continue;
                }
                let n = pts.len() as f64;
                let mean = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
                means.push((row.r.name.clone(), i, mean));
                points.push(Series { name: row.r.name.clone(), color: i, points: pts });
            }
            let front = pareto(means.iter().map(|m| m.2), lower_better);
            Frontier { file, title, x_desc, points, means, front, lower_better }
        })
        .collect();
    (curves, frontiers)
}

/// The Pareto front of `points` (x, loss): those no other point beats in both, lower loss and
/// lower x (`lower_better`) or higher x; in x order.
fn pareto(points: impl Iterator<Item = (f64, f64)>, lower_better: bool) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = points.collect();
    // Best x first, ties by loss.
    sorted.sort_by(|a, b| {
        let by_x = if lower_better { a.0.total_cmp(&b.0) } else { b.0.total_cmp(&a.0) };
        by_x.then(a.1.total_cmp(&b.1))
    });
    let mut front: Vec<(f64, f64)> = vec![];
    for p in sorted {
        if front.last().is_none_or(|l| p.1 < l.1) {
            front.push(p);
        }
    }
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    front
}

/// Markers around the block a plan generates in results.md.
pub fn markers(plan_stem: &str) -> (String, String) {
    (
        format!("<!-- BEGIN GENERATED by lors-lm sweep --plan {plan_stem}: do not edit by hand -->"),
        format!("<!-- END GENERATED {plan_stem} -->"),
    )
}

/// Write results.md (replacing this plan's generated block, keeping everything else; a new
/// block is appended) and the charts.
pub fn write_results(docs: &Path, rep: &Report) -> Result<()> {
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
    let mut csv = String::from("chart,config,seed_points,x_mean,val_loss_mean,on_front\n");
    for f in &rep.frontiers {
        for (name, _, (x, y)) in &f.means {
            let n = f.points.iter().find(|s| &s.name == name).map_or(0, |s| s.points.len());
            let on = f.front.contains(&(*x, *y));
            let _ = writeln!(csv, "{},{name},{n},{x},{y},{on}", f.file.trim_end_matches(".png"));
        }
        let x_desc = format!("{}{}", f.x_desc, if f.lower_better { "" } else { " (higher is better)" });
        let path = docs.join(format!("{}{}", rep.prefix, f.file));
        if f.means.is_empty() {
            // Nothing to place (e.g. runs from before decode timing): no chart rather than an error.
            let _ = fs::remove_file(&path);
            continue;
        }
        plot::scatter(&path, f.title, &x_desc, "val loss (whole val split)", &f.points, &f.means, &f.front)?;
    }
    let csv_path = docs.join(format!("{}{FRONTIERS_CSV}", rep.prefix));
    fs::write(&csv_path, csv).with_context(|| format!("cannot write {}", csv_path.display()))
}

/// The CPU, cores and threads, for the report's provenance line.
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

#[cfg(test)]
mod tests {
    use super::pareto;

    #[test]
    fn pareto_fronts_keep_the_points_nothing_beats() {
        let pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (4.0, 3.0), (2.5, 6.0)];
        // Fewer parameters (or FLOPs) and lower loss.
        assert_eq!(pareto(pts.into_iter(), true), [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]);
        // Faster decoding (higher x) and lower loss: (4, 3) beats everything.
        assert_eq!(pareto(pts.into_iter(), false), [(4.0, 3.0)]);
        let pts = [(1.0, 2.0), (3.0, 4.0)];
        assert_eq!(pareto(pts.into_iter(), false), [(1.0, 2.0), (3.0, 4.0)]);
    }
}
