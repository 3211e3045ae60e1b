//! What `lors-lm bench --decode` measures: inference of a config with random weights, vanilla
//! merged against LORS (or shared) merged and factored: prompt and decoding tokens/s at each
//! batch size, peak RSS, and the weight bytes each decoding step reads, beside this machine's
//! cache sizes and read bandwidth (docs/performance.md, "Inference"); and the table of them.
//!
//! `cmd/bench.rs` runs every (mode, weights, batch) row of every round in a fresh child process
//! (this binary, `bench --decode --child`), so that peak RSS is that row's alone; rounds
//! alternate the rows.

use crate::config::{Config, Mode};
use crate::device::{cpu_caches, describe_caches, human_bytes, read_bandwidth};
use crate::infer::generate::generate_batch;
use crate::infer::weights::predict;
use crate::model::{Model, ParamStore, Weights};
use crate::monitor::{peak_rss_mb, reset_peak_rss, rss_mb};
use crate::rng::Rng;
use anyhow::{bail, Result};
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
pub fn rows(modes: &[(String, Config)]) -> Vec<(String, Weights)> {
    let mut out = vec![];
    for (m, cfg) in modes {
        out.push((m.clone(), Weights::Merged));
        if cfg.lors.mode != Mode::Vanilla {
            out.push((m.clone(), Weights::Factored));
        }
    }
    out
}

/// Build the model of `cfg` with random weights and keep it as `w`, measure one batch of
/// `prompt` prompt tokens (at least 1) and `gen` decoded ones (at least 2).
pub fn measure(cfg: &Config, w: Weights, batch: usize, prompt: usize, gen: usize) -> Result<DecodeResult> {
    reset_peak_rss();
    let (prompt, gen) = (prompt.max(1), gen.max(2));
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

/// The machine's header: caches from sysfs, read bandwidth at sizes that sit in L2, in the
/// last-level cache and in DRAM.
pub fn machine_header() -> String {
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

/// Medians over rounds.
pub fn combine(rounds: &[DecodeResult]) -> DecodeResult {
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

/// The table of `results` (one per row and batch) with each one's rounds in `per_cell`.
pub fn print_table(results: &[DecodeResult], per_cell: &[Vec<DecodeResult>]) {
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
