//! `lors-lm bench`: training-step and generation throughput of a config, per sharing mode, on
//! random tokens: median of several steps after warm-up. Prints a table and one JSON line per
//! mode.
//!
//! With `--decode`, inference instead: what `bench_decode.rs` measures, per mode, weights and
//! batch size.
//!
//! Each mode of each round is measured in a fresh child process (this binary, `bench
//! --child`): the allocator keeps freed memory for reuse (`device::tune_allocator`), so a
//! second mode measured in the same process would inherit the first one's heap and its peak
//! RSS. Rounds alternate the modes (vanilla, lors, vanilla, lors, ...) so that a slow spell
//! of the machine hits both; the lors/vanilla line is the median of the per-round ratios.

use crate::cmd::bench_decode::{self, DecodeResult};
use crate::config::{Config, Mode};
use crate::infer::generate::{generate_tokens, Sampler};
use crate::model::{Model, Ops, Weights};
use crate::monitor::{peak_rss_mb, reset_peak_rss};
use crate::rng::Rng;
use crate::train::{Source, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// TOML config file (its [model], [lors] and [train] batch_size/seq_len are used).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config key, e.g. --set model.d_model=384 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Sharing modes to measure, comma-separated.
    #[arg(long, default_value = "vanilla,lors", value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Vocabulary size when the config says 0 (taken from data otherwise).
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Timed training steps per mode (after --warmup steps).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed warm-up steps per mode.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Prompt tokens for the generation benchmark (0 = skip generation).
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens decoded for the generation benchmark [default: 64, with --decode 128].
    #[arg(long)]
    pub gen_tokens: Option<usize>,
    /// Only print the JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Run RMSNorm, RoPE, attention, SwiGLU, the LORS merge and the head + loss as plain candle
    /// compositions instead of the fused CPU kernels (to measure what the kernels buy).
    #[arg(long)]
    pub plain_ops: bool,
    /// Rounds over the mode list, alternating modes; the table gives medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Internal: measure the one mode of --modes in this process and print its JSON line.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Measure inference instead of training: prompt and decoding tokens/s, peak RSS and the
    /// weight bytes read per step of each mode merged and (shared, lors) factored, at each of
    /// --batches, beside this machine's cache sizes and read bandwidth.
    #[arg(long)]
    pub decode: bool,
    /// Batch sizes (sequences decoded together) for --decode, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Internal (--decode --child): merged or factored.
    #[arg(long, hide = true)]
    pub weights: Option<String>,
}

impl BenchArgs {
    /// Tokens to decode: --gen-tokens, else 64 (128 with --decode).
    pub fn gen_tokens(&self) -> usize {
        self.gen_tokens.unwrap_or(if self.decode { 128 } else { 64 })
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BenchResult {
    pub mode: String,
    pub params_unique: usize,
    pub tokens_per_step: usize,
    pub step_ms_median: f64,
    /// Medians of the step's phases: forward + loss, backward, gradient gather + AdamW.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub train_tokens_per_sec: f64,
    pub peak_rss_mb: Option<f64>,
    pub prefill_tokens_per_sec: Option<f64>,
    pub decode_tokens_per_sec: Option<f64>,
    pub threads: usize,
    /// "fused" (the kernels of src/kernels) or "plain" (candle compositions).
    pub ops: String,
    /// The library that ran the f32 matmuls (`device::cpu_matmul`).
    #[serde(default)]
    pub matmul: String,
    /// Rounds the medians are taken over, and each round's median step (ms).
    #[serde(default)]
    pub rounds: usize,
    #[serde(default)]
    pub step_ms_rounds: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Benchmark one config (mode already set): training steps through the `Trainer` on random
/// tokens, then prefill and decoding with the merged model.
pub fn bench_one(cfg: &Config, args: &BenchArgs) -> Result<BenchResult> {
    let device = candle_core::Device::Cpu;
    let v = cfg.model.vocab_size;
    reset_peak_rss();
    let mut trainer = Trainer::new(cfg.clone(), Source::Random { vocab: v }, &device)?;
    if args.plain_ops {
        trainer.set_ops(Ops::Plain)?;
    }
    let mut times = vec![];
    let mut phases = vec![]; // (forward + loss, backward, the rest) ms per timed step
    for i in 0..args.warmup + args.steps {
        let s = trainer.step()?;
        if i >= args.warmup {
            times.push(s.ms);
            phases.push([s.forward_ms, s.backward_ms, s.optimizer_ms]);
        }
    }
    let step_ms = median(times);
    let phase = |k: usize| median(phases.iter().map(|p| p[k]).collect());
    let (forward_ms, backward_ms, optimizer_ms) = (phase(0), phase(1), phase(2));
    let peak = peak_rss_mb();
    let (prefill, decode) = match args.prompt_tokens {
        0 => (None, None),
        _ => {
            let (p, d) = bench_generation(trainer.model(), cfg, args)?;
            (Some(p), Some(d))
        }
    };
    let tokens_per_step = trainer.tokens_per_step();
    Ok(BenchResult {
        mode: cfg.lors.mode.to_string(),
        params_unique: trainer.store().num_params(),
        tokens_per_step,
        step_ms_median: step_ms,
        forward_ms,
        backward_ms,
        optimizer_ms,
        train_tokens_per_sec: tokens_per_step as f64 / (step_ms / 1e3),
        peak_rss_mb: peak,
        prefill_tokens_per_sec: prefill,
        decode_tokens_per_sec: decode,
        threads: candle_core::utils::get_num_threads(),
        matmul: crate::device::cpu_matmul()?,
        ops: if args.plain_ops { "plain" } else { "fused" }.into(),
        rounds: 1,
        step_ms_rounds: vec![step_ms],
    })
}

/// Prefill and decoding speed (tokens/s, medians of 3) of the merged model on a random prompt.
fn bench_generation(model: &Model, cfg: &Config, args: &BenchArgs) -> Result<(f64, f64)> {
    let device = model.device();
    let mut rng = Rng::new(7);
    let p = args.prompt_tokens.min(cfg.model.max_seq_len.saturating_sub(args.gen_tokens() + 1)).max(1);
    let merged = model.merged()?;
    let prompt: Vec<u32> = (0..p).map(|_| rng.below(cfg.model.vocab_size as u64) as u32).collect();
    let (mut pre, mut dec) = (vec![], vec![]);
    for _ in 0..3 {
        let ids = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
        let t0 = Instant::now();
        let mut cache = merged.new_cache();
        let _ = merged.forward_at(&ids, 0, Some(&mut cache))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        pre.push(p as f64 / t0.elapsed().as_secs_f64());
        let mut s = Sampler::new(0.0, None, None, 0)?;
        let n = args.gen_tokens().min(cfg.model.max_seq_len - p);
        let t0 = Instant::now();
        // generate_tokens prefills again; subtract one prefill to time decoding alone.
        let out = generate_tokens(&merged, &prompt, n, &mut s, &[], |_| Ok(()), || {})?;
        let total = t0.elapsed().as_secs_f64() - p as f64 / pre[pre.len() - 1];
        dec.push(out.len() as f64 / total.max(1e-9));
    }
    Ok((median(pre), median(dec)))
}

fn parse_mode(m: &str) -> Result<Mode> {
    Mode::from_name(m.trim())
        .with_context(|| format!("--modes: unknown mode {:?} (vanilla, shared, lors, lowrank)", m.trim()))
}

/// The config of each of --modes, validated.
fn modes_of(base: &Config, args: &BenchArgs) -> Result<Vec<(String, Config)>> {
    let mut modes = vec![];
    for m in &args.modes {
        let mut cfg = base.clone();
        cfg.lors.mode = parse_mode(m)?;
        if cfg.model.vocab_size == 0 {
            cfg.model.vocab_size = args.vocab_size;
        }
        cfg.validate()?;
        modes.push((m.trim().to_string(), cfg));
    }
    Ok(modes)
}

/// Run this binary as `bench --child --json --config FILE --set ... SWITCHES FLAG VALUE ...`
/// (one measurement in a fresh process) and parse the JSON line it prints last; `what` names
/// the measurement in errors.
fn in_child<T: serde::de::DeserializeOwned>(
    args: &BenchArgs,
    switches: &[&str],
    flags: &[(&str, String)],
    what: &str,
) -> Result<T> {
    let exe = std::env::current_exe().context("bench: cannot find this program's executable")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["bench", "--child", "--json", "--config"]).arg(&args.config);
    for s in &args.sets {
        cmd.arg("--set").arg(s);
    }
    cmd.args(switches);
    for (flag, v) in flags {
        cmd.arg(flag).arg(v);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("bench: running {}", exe.display()))?;
    if !out.status.success() {
        bail!("{what} failed ({}); its error is above", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().with_context(|| format!("{what} printed no result"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}, not a result"))
}

/// Measure the training of one mode in a fresh process.
fn bench_in_child(args: &BenchArgs, mode: &str) -> Result<BenchResult> {
    let switches: &[&str] = if args.plain_ops { &["--plain-ops"] } else { &[] };
    let flags = [
        ("--modes", mode.to_string()),
        ("--vocab-size", args.vocab_size.to_string()),
        ("--steps", args.steps.to_string()),
        ("--warmup", args.warmup.to_string()),
        ("--prompt-tokens", args.prompt_tokens.to_string()),
        ("--gen-tokens", args.gen_tokens().to_string()),
    ];
    in_child(args, switches, &flags, &format!("bench: mode {mode}"))
}

/// Measure the inference of one (mode, weights, batch) row in a fresh process.
fn decode_in_child(args: &BenchArgs, mode: &str, w: Weights, batch: usize) -> Result<DecodeResult> {
    let flags = [
        ("--modes", mode.to_string()),
        ("--weights", w.name().to_string()),
        ("--batches", batch.to_string()),
        ("--vocab-size", args.vocab_size.to_string()),
        ("--prompt-tokens", args.prompt_tokens.to_string()),
        ("--gen-tokens", args.gen_tokens().to_string()),
    ];
    in_child(args, &["--decode"], &flags, &format!("bench --decode: {mode} {} batch {batch}", w.name()))
}

/// Median over rounds of every measured field.
fn combine(rounds: &[BenchResult]) -> BenchResult {
    let med = |f: &dyn Fn(&BenchResult) -> f64| median(rounds.iter().map(f).collect());
    let opt = |f: &dyn Fn(&BenchResult) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let step_ms = med(&|r| r.step_ms_median);
    BenchResult {
        step_ms_median: step_ms,
        forward_ms: med(&|r| r.forward_ms),
        backward_ms: med(&|r| r.backward_ms),
        optimizer_ms: med(&|r| r.optimizer_ms),
        train_tokens_per_sec: rounds[0].tokens_per_step as f64 / (step_ms / 1e3),
        peak_rss_mb: opt(&|r| r.peak_rss_mb),
        prefill_tokens_per_sec: opt(&|r| r.prefill_tokens_per_sec),
        decode_tokens_per_sec: opt(&|r| r.decode_tokens_per_sec),
        rounds: rounds.len(),
        step_ms_rounds: rounds.iter().map(|r| r.step_ms_median).collect(),
        ..rounds[0].clone()
    }
}

/// Median and range over rounds of lors/vanilla for one measure, as "1.02x (0.98-1.05)".
fn ratio(l: &[BenchResult], v: &[BenchResult], f: impl Fn(&BenchResult) -> Option<f64>) -> String {
    let r: Vec<f64> = l.iter().zip(v).filter_map(|(l, v)| Some(f(l)? / f(v)?)).collect();
    if r.is_empty() {
        return "-".into();
    }
    let (lo, hi) = r.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let m = median(r.clone());
    if r.len() == 1 {
        format!("{m:.2}x")
    } else {
        format!("{m:.2}x ({lo:.2}-{hi:.2})")
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let base = Config::load(&args.config, &args.sets)?;
    if args.decode {
        return run_decode(args, &modes_of(&base, args)?);
    }
    if args.steps == 0 {
        bail!("--steps must be > 0");
    }
    if args.rounds == 0 {
        bail!("--rounds must be > 0");
    }
    let matmul = crate::device::cpu_matmul()?;
    let modes = modes_of(&base, args)?;
    if args.child {
        let [(_, cfg)] = modes.as_slice() else { bail!("bench --child measures exactly one mode") };
        println!("{}", serde_json::to_string(&bench_one(cfg, args)?)?);
        return Ok(());
    }
    if !args.json {
        eprintln!("bench: {} threads, matmul: {matmul}", candle_core::utils::get_num_threads());
    }
    // per_mode[i][round]
    let mut per_mode: Vec<Vec<BenchResult>> = vec![vec![]; modes.len()];
    for round in 0..args.rounds {
        for (i, (m, _)) in modes.iter().enumerate() {
            let r = bench_in_child(args, m)?;
            if !args.json {
                eprintln!("bench: round {}/{} {m:<8} {:.1} ms/step", round + 1, args.rounds, r.step_ms_median);
            }
            per_mode[i].push(r);
        }
    }
    let results: Vec<BenchResult> = per_mode.iter().map(|r| combine(r)).collect();
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    if !args.json {
        println!(
            "\n{:<8} {:>11} {:>9} {:>17} {:>11} {:>9} {:>11} {:>11}",
            "mode", "params", "step ms", "fwd/bwd/opt ms", "train tok/s", "peak MB", "prefill t/s", "decode t/s"
        );
        let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
        for r in &results {
            println!(
                "{:<8} {:>11} {:>9.1} {:>17} {:>11.0} {:>9} {:>11} {:>11}",
                r.mode,
                r.params_unique,
                r.step_ms_median,
                format!("{:.0}/{:.0}/{:.0}", r.forward_ms, r.backward_ms, r.optimizer_ms),
                r.train_tokens_per_sec,
                opt(r.peak_rss_mb),
                opt(r.prefill_tokens_per_sec),
                opt(r.decode_tokens_per_sec)
            );
        }
        let find = |name: &str| modes.iter().position(|(m, _)| m == name).map(|i| &per_mode[i]);
        if let (Some(v), Some(l)) = (find("vanilla"), find("lors")) {
            println!(
                "lors / vanilla (median of {} rounds, range): step time {}, peak RSS {}, decode speed {}",
                args.rounds,
                ratio(l, v, |r| Some(r.step_ms_median)),
                ratio(l, v, |r| r.peak_rss_mb),
                ratio(l, v, |r| r.decode_tokens_per_sec)
            );
        }
    }
    Ok(())
}

/// `bench --decode`: every row of `bench_decode::rows` at every batch size, each round in
/// fresh processes (or, as the child, the one row of --modes, --weights and --batches).
fn run_decode(args: &BenchArgs, modes: &[(String, Config)]) -> Result<()> {
    if args.batches.is_empty() || args.batches.contains(&0) {
        bail!("--batches must list batch sizes >= 1");
    }
    if args.child {
        let ([(_, cfg)], [batch]) = (modes, args.batches.as_slice()) else {
            bail!("bench --decode --child measures exactly one mode and one batch size")
        };
        let w = match args.weights.as_deref() {
            Some("merged") | None => Weights::Merged,
            Some("factored") => Weights::Factored,
            Some(other) => bail!("--weights {other}: expected merged or factored"),
        };
        let r = bench_decode::measure(cfg, w, *batch, args.prompt_tokens, args.gen_tokens())?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let rows = bench_decode::rows(modes);
    eprintln!("{}", bench_decode::machine_header());
    let cells: Vec<(String, Weights, usize)> =
        args.batches.iter().flat_map(|&b| rows.iter().map(move |(m, w)| (m.clone(), *w, b))).collect();
    let mut per_cell: Vec<Vec<DecodeResult>> = vec![vec![]; cells.len()];
    for round in 0..args.rounds {
        for (i, (m, w, b)) in cells.iter().enumerate() {
            let r = decode_in_child(args, m, *w, *b)?;
            eprintln!(
                "bench --decode: round {}/{} {m} {} batch {b}: decode {:.1} tok/s, prompt {:.0} tok/s",
                round + 1,
                args.rounds,
                w.name(),
                r.decode_tokens_per_sec,
                r.prompt_tokens_per_sec
            );
            per_cell[i].push(r);
        }
    }
    let results: Vec<DecodeResult> = per_cell.iter().map(|r| bench_decode::combine(r)).collect();
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    if !args.json {
        bench_decode::print_table(&results, &per_cell);
    }
    Ok(())
}
