//! `lors-lm bench --decode`: inference of a config with random weights, vanilla merged
//! against LORS (or shared) merged and factored: prompt and decoding tokens/s at each batch
//! size, peak RSS, and the weight bytes each decoding step reads, beside this machine's cache
//! sizes and read bandwidth (docs/performance.md, "Inference").
//!
//! Every (mode, weights, batch) row of every round runs in a fresh child process (this binary,
//! `bench --decode --child`), so that peak RSS is that row's alone; rounds alternate the rows.

use crate::cmd::bench::BenchArgs;
use crate::config::{Config, Mode};
use crate::device::{cpu_caches, describe_caches, human_bytes, read_bandwidth};
use crate::infer::generate::generate_batch;
use crate::infer::weights::predict;
use crate::model::{Model, ParamStore, Weights};
use crate::monitor::{peak_rss_mb, reset_peak_rss, rss_mb};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// One row: a (mode, weights, batch) of one config, or the median of its rounds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DecodeResult {
    pub mode: String,
    pub weights: String,
    pub batch: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub params_unique: usize,
    /// Weight bytes one decoding step reads (`Model::weight_bytes`), and how many distinct
    /// bytes those are (what has to stay in cache).
    pub weight_bytes_read: u64,
    pub weight_bytes_distinct: u64,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub prompt_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
    /// The child process's peak RSS (building the random model, converting it, prompt and
    /// decoding), and its RSS once the model was built and converted (freed memory returned).
    pub peak_rss_mb: Option<f64>,
    pub model_rss_mb: Option<f64>,
    /// What `--weights auto` would pick for this model on this machine.
    pub auto: String,
    pub threads: usize,
    pub matmul: String,
    pub rounds: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The rows of `--modes`: vanilla merged; every other mode merged and factored.
fn rows(modes: &[(String, Config)]) -> Vec<(String, Weights)> {
    let mut out = vec![];
    for (m, cfg) in modes {
        out.push((m.clone(), Weights::Merged));
        if cfg.lors.mode != Mode::Vanilla {
            out.push((m.clone(), Weights::Factored));
        }
    }
    out
}

/// Build the model of `cfg` with random weights and keep it as `w`, measure one batch.
pub fn measure(cfg: &Config, w: Weights, batch: usize, args: &BenchArgs) -> Result<DecodeResult> {
    reset_peak_rss();
    let (prompt, gen) = (args.prompt_tokens.max(1), args.gen_tokens().max(2));
    if prompt + gen > cfg.model.max_seq_len {
        bail!("--prompt-tokens {prompt} + --gen-tokens {gen} exceed model.max_seq_len {}", cfg.model.max_seq_len);
    }
    let device = Device::Cpu;
    let (model, params_unique) = {
        let mut store = ParamStore::new_init(1, DType::F32, &device);
        let model = Model::new(&cfg.model, &cfg.lors, &mut store)?;
        (model, store.num_params())
    }; // the store's handles drop here, so converting can free the training tensors
    let bytes = model.weight_bytes(w);
    let auto = predict(&model, cfg.lors.mode)?.choice.name().to_string();
    let model = model.into_weights(w)?;
    crate::device::trim_heap();
    let model_rss = rss_mb();
    let mut rng = Rng::new(7);
    let v = cfg.model.vocab_size as u64;
    let ids: Vec<u32> = (0..batch * prompt).map(|_| rng.below(v) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, prompt), &device)?;
    let t0 = Instant::now();
    let mut marks = vec![];
    generate_batch(&model, &ids, gen, |_| marks.push(t0.elapsed().as_secs_f64()))?;
    let (first, last) = (marks[0], marks[marks.len() - 1]);
    Ok(DecodeResult {
        mode: cfg.lors.mode.to_string(),
        weights: w.name().into(),
        batch,
        d_model: cfg.model.d_model,
        n_layers: cfg.model.n_layers,
        params_unique,
        weight_bytes_read: bytes.read,
        weight_bytes_distinct: bytes.distinct,
        prompt_tokens: prompt,
        gen_tokens: gen,
        prompt_tokens_per_sec: (batch * prompt) as f64 / first,
        decode_tokens_per_sec: (batch * (gen - 1)) as f64 / (last - first),
        peak_rss_mb: peak_rss_mb(),
        model_rss_mb: model_rss,
        auto,
        threads: candle_core::utils::get_num_threads(),
        matmul: crate::device::cpu_matmul()?,
        rounds: 1,
    })
}

/// One row in a fresh process of this binary.
fn in_child(args: &BenchArgs, mode: &str, w: Weights, batch: usize) -> Result<DecodeResult> {
    let exe = std::env::current_exe().context("bench: cannot find this program's executable")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["bench", "--decode", "--child", "--json", "--config"]).arg(&args.config);
    for s in &args.sets {
        cmd.arg("--set").arg(s);
    }
    for (flag, v) in [
        ("--modes", mode.to_string()),
        ("--weights", w.name().to_string()),
        ("--batches", batch.to_string()),
        ("--vocab-size", args.vocab_size.to_string()),
        ("--prompt-tokens", args.prompt_tokens.to_string()),
        ("--gen-tokens", args.gen_tokens().to_string()),
    ] {
        cmd.arg(flag).arg(v);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("bench: running {}", exe.display()))?;
    if !out.status.success() {
        bail!("bench --decode: {mode} {} batch {batch} failed ({}); its error is above", w.name(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("bench --decode: the child printed no result")?;
    serde_json::from_str(line).with_context(|| format!("bench --decode: the child printed {line:?}, not a result"))
}

/// The machine's header: caches from sysfs, read bandwidth at sizes that sit in L2, in the
/// last-level cache and in DRAM.
fn machine_header() -> String {
    let bw: Vec<String> = [1usize << 20, 16 << 20, 1 << 30]
        .iter()
        .map(|&b| format!("{} {:.1}", human_bytes(b as u64), read_bandwidth(b, if b > 1 << 28 { 3 } else { 50 })))
        .collect();
    format!(
        "caches (sysfs): {}\nread bandwidth, GB/s, {} threads (buffer size): {}",
        describe_caches(&cpu_caches()),
        rayon::current_num_threads(),
        bw.join(", ")
    )
}

pub fn run(args: &BenchArgs, modes: &[(String, Config)]) -> Result<()> {
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
        println!("{}", serde_json::to_string(&measure(cfg, w, *batch, args)?)?);
        return Ok(());
    }
    let rows = rows(modes);
    eprintln!("{}", machine_header());
    let cells: Vec<(String, Weights, usize)> =
        args.batches.iter().flat_map(|&b| rows.iter().map(move |(m, w)| (m.clone(), *w, b))).collect();
    let mut per_cell: Vec<Vec<DecodeResult>> = vec![vec![]; cells.len()];
    for round in 0..args.rounds {
        for (i, (m, w, b)) in cells.iter().enumerate() {
            let r = in_child(args, m, *w, *b)?;
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
    let results: Vec<DecodeResult> = per_cell.iter().map(|r| combine(r)).collect();
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    if !args.json {
        print_table(&results, &per_cell);
    }
    Ok(())
}

/// Medians over rounds.
fn combine(rounds: &[DecodeResult]) -> DecodeResult {
    let med = |f: &dyn Fn(&DecodeResult) -> f64| median(rounds.iter().map(f).collect());
    let opt = |f: &dyn Fn(&DecodeResult) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    DecodeResult {
        prompt_tokens_per_sec: med(&|r| r.prompt_tokens_per_sec),
        decode_tokens_per_sec: med(&|r| r.decode_tokens_per_sec),
        peak_rss_mb: opt(&|r| r.peak_rss_mb),
        model_rss_mb: opt(&|r| r.model_rss_mb),
        rounds: rounds.len(),
        ..rounds[0].clone()
    }
}

fn print_table(results: &[DecodeResult], per_cell: &[Vec<DecodeResult>]) {
    println!(
        "\n{:<8} {:<8} {:>5} {:>11} {:>11} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "mode",
        "weights",
        "batch",
        "decode t/s",
        "prompt t/s",
        "peak MB",
        "model MB",
        "read/step",
        "distinct",
        "vs first"
    );
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
    for (r, rounds) in results.iter().zip(per_cell) {
        // Per-round ratio against the first row of the same batch (vanilla merged).
        let first = results.iter().position(|x| x.batch == r.batch).unwrap_or(0);
        let ratios: Vec<f64> = rounds
            .iter()
            .zip(&per_cell[first])
            .map(|(a, b)| a.decode_tokens_per_sec / b.decode_tokens_per_sec)
            .collect();
        println!(
            "{:<8} {:<8} {:>5} {:>11.1} {:>11.0} {:>9} {:>9} {:>10} {:>10} {:>8.2}x",
            r.mode,
            r.weights,
            r.batch,
            r.decode_tokens_per_sec,
            r.prompt_tokens_per_sec,
            opt(r.peak_rss_mb),
            opt(r.model_rss_mb),
            human_bytes(r.weight_bytes_read),
            human_bytes(r.weight_bytes_distinct),
            median(ratios)
        );
    }
    println!("vs first: decode speed against the first row of the same batch (median of per-round ratios)");
    // A vanilla model always gets merged: say what auto does for the shared one.
    if let Some(r) = results.iter().find(|r| r.mode != Mode::Vanilla.name()).or(results.first()) {
        println!("`--weights auto` picks {} for this config ({} model) on this machine", r.auto, r.mode);
    }
}
