//! `lors-lm compress`: a trained model → a LORS run directory (checkpoint 0), with a table of
//! the residual energy each projection keeps, the unique parameters before and after, and
//! (with `--data`) the validation loss of the source and of the compressed model.

use crate::cmd::source::{self, Kind, Loaded};
use crate::compress::calibrate::Calibration;
use crate::compress::{compress_calibrated, keep_layers, mean_energy_by_proj, Compressed, ProjReport, Spec};
use crate::config::{Config, LorsConfig, Mode, Proj};
use crate::data::{Meta, TokenFile};
use crate::infer::perplexity::eval_tokens;
use crate::model::{Model, ParamCounts, ParamStore};
use crate::rng::Rng;
use crate::train::checkpoint::Contents;
use crate::train::optim::AdamW;
use crate::train::{RunDir, TrainState};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct CompressArgs {
    /// The model to compress: a lors-lm run directory (vanilla, or LORS to re-compress), a
    /// Hugging Face Llama directory, or hf:OWNER/NAME.
    #[arg(long, value_name = "SOURCE")]
    pub from: String,
    /// Checkpoint step of a run source [default: the latest].
    #[arg(long, value_name = "STEP")]
    pub checkpoint: Option<usize>,
    /// Run directory to write: new or empty (refused if it holds anything but a run, or a
    /// source of this command).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: PathBuf,
    /// Rank of every private residual B_l A_l.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Rank of the attention projections (q, k, v, o) instead of --rank.
    #[arg(long, value_name = "R")]
    pub attn_rank: Option<usize>,
    /// Rank of the FFN projections (gate, up, down) instead of --rank.
    #[arg(long, value_name = "R")]
    pub ffn_rank: Option<usize>,
    /// Layers per group sharing one base (consecutive layers; the last group may be smaller).
    #[arg(long, value_name = "K", conflicts_with = "groups")]
    pub group_size: Option<usize>,
    /// Number of groups of consecutive layers, each sharing one base.
    #[arg(long, value_name = "G")]
    pub groups: Option<usize>,
    /// Projection types to share, comma-separated (the others stay private).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// Layers kept fully private, comma-separated; `L-1` (or `last`) is the last layer.
    /// E.g. 0,L-1 for the "sandwich" pattern.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    pub private_layers: Vec<String>,
    /// Choose each projection's rank to keep this fraction of its residual energy (0-1]
    /// instead of a fixed rank.
    #[arg(long, value_name = "F", conflicts_with_all = ["attn_rank", "ffn_rank"])]
    pub energy: Option<f64>,
    /// Choose the ranks to fit this fraction of the source's block (projection) parameters
    /// (0-1]: every projection keeps the same fraction of its residual energy, the largest
    /// that fits (printed). Instead of a fixed rank or --energy.
    #[arg(long, value_name = "F", conflicts_with_all = ["attn_rank", "ffn_rank", "energy"])]
    pub budget: Option<f64>,
    /// Activation-aware truncation (SVD-LLM): run the source over windows of the train split of
    /// this prepared data (same tokenizer) and make every residual's SVD minimise the error
    /// on the inputs the layer sees, not on its weights. Far better for pretrained models.
    #[arg(long, value_name = "DIR")]
    pub calibrate: Option<PathBuf>,
    /// Calibration tokens for --calibrate.
    #[arg(long, value_name = "N", default_value_t = 16384, requires = "calibrate")]
    pub calibration_tokens: usize,
    /// lors (shared bases + private low-rank residuals) or lowrank (no sharing: each layer's
    /// weight truncated to rank r, the per-layer SVD baseline).
    #[arg(long, default_value = "lors", value_parser = ["lors", "lowrank"])]
    pub mode: String,
    /// Layer dropping instead (a baseline): keep only these layers (comma-separated, `L-1` =
    /// the last), as a vanilla model.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS", conflicts_with_all = ["energy", "budget", "private_layers", "group_size", "groups", "calibrate"])]
    pub keep_layers: Vec<String>,
    /// Prepared data (same tokenizer): report the validation loss of the source and of the
    /// compressed model before any training.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Start over in an --out that holds a run: that run's own files (config, checkpoints,
    /// logs, reports) are deleted first, nothing else.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON (it is always saved as RUN_DIR/compress.json).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &CompressArgs) -> Result<()> {
    check_out(args)?;
    let device = Device::Cpu;
    let src = source::load(&args.from, args.checkpoint, &device, "--from")?;
    let n = src.cfg.model.n_layers;
    let before = ParamCounts::new(&src.cfg.model, &src.cfg.lors);
    let spec = spec(args, n, before.block_projections())?;
    let tensors: HashMap<_, _> = src.model.merged_tensors()?.into_iter().collect();
    if args.keep_layers.is_empty() {
        check_groups_align(&src.cfg.lors, &spec.lors_config(), n)?;
    }
    // After the cheap checks; --calibrate conflicts with --keep-layers (clap).
    let calib = match &args.calibrate {
        Some(dir) => Some(calibration(dir, &src, args.calibration_tokens)?),
        None => None,
    };
    let (model_cfg, compressed) = if args.keep_layers.is_empty() {
        (src.cfg.model.clone(), compress_calibrated(&src.cfg.model, &tensors, &spec, calib.as_ref())?)
    } else {
        let keep = args.keep_layers.iter().map(|s| parse_layer(s, n, "--keep-layers")).collect::<Result<Vec<_>>>()?;
        let (m, tensors) = keep_layers(&src.cfg.model, &tensors, &keep)?;
        let lors = LorsConfig { mode: Mode::Vanilla, ..LorsConfig::default() };
        (m, Compressed { lors, tensors, report: vec![], energy: None })
    };
    let mut cfg = Config { model: model_cfg, lors: compressed.lors.clone(), ..src.cfg.clone() };
    cfg.train.seq_len = cfg.train.seq_len.min(cfg.model.max_seq_len);
    if let Some(d) = &args.data {
        cfg.data.dir = d.to_string_lossy().into_owned();
    }
    cfg.validate().context("the compressed config is invalid")?;
    let mut store = ParamStore::from_tensors(compressed.tensors.clone(), DType::F32, &device);
    let model =
        Model::new(&cfg.model, &cfg.lors, &mut store).context("the compressed tensors do not form the model")?;
    let losses = match &args.data {
        Some(dir) => Some(validation_losses(dir, &src, &model, &cfg)?),
        None => None,
    };
    let after = ParamCounts::new(&cfg.model, &cfg.lors);
    let report = json!({
        "source": src.describe(),
        "spec": format!("{spec:?}"),
        "params": {
            "before": {"block": before.block_projections(), "total": before.total()},
            "after": {"block": after.block_projections(), "total": after.total()},
            "block_fraction": after.block_projections() as f64 / before.block_projections().max(1) as f64,
        },
        "energy": compressed.energy,
        "calibration": args.calibrate.as_ref().map(|d| json!({"data": d, "tokens": calib.as_ref().map(|c| c.tokens)})),
        "energy_by_projection": mean_energy_by_proj(&compressed.report).into_iter().map(|(p, e)| (p.to_string(), e)).collect::<HashMap<_, _>>(),
        "projections": compressed.report,
        "val": losses.map(|(s, c, n)| json!({"source_loss": s, "compressed_loss": c, "tokens": n})),
    });
    write_run(&args.out, args.force, &cfg, &src, &store, &compressed, &report, args.data.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&compressed.report, cfg.model.n_layers));
        println!(
            "unique block parameters {} -> {} ({:.1} %), total unique {} -> {}",
            before.block_projections(),
            after.block_projections(),
            100.0 * after.block_projections() as f64 / before.block_projections().max(1) as f64,
            before.total(),
            after.total()
        );
        if let (Some(f), Some(e)) = (args.budget, compressed.energy) {
            println!("--budget {f}: every projection keeps {:.2} % of its residual energy", 100.0 * e);
        }
        if let Some((s, c, n)) = losses {
            println!(
                "validation loss over {n} tokens: source {s:.4} (ppl {:.2}), compressed {c:.4} (ppl {:.2})",
                s.exp(),
                c.exp()
            );
        }
        println!(
            "wrote {} (checkpoint 0, compress.json); uptrain with `lors-lm train --init-from {}`",
            args.out.display(),
            args.out.display()
        );
    }
    Ok(())
}

/// Refuse, before any work is done, an --out that holds anything but a run (a run only with
/// --force), or that is or contains a source this command reads.
fn check_out(args: &CompressArgs) -> Result<()> {
    let run = RunDir::at(&args.out);
    run.check_new(args.force)?;
    let sources = [
        ("--from", Some(Path::new(&args.from))),
        ("--data", args.data.as_deref()),
        ("--calibrate", args.calibrate.as_deref()),
    ];
    for (flag, path) in sources {
        if let Some(p) = path {
            run.check_not_source(p, flag)?;
        }
    }
    Ok(())
}

/// The compression spec from the flags, for a model of `n_layers` with `block` unique block
/// parameters.
fn spec(args: &CompressArgs, n_layers: usize, block: usize) -> Result<Spec> {
    let targets = args
        .targets
        .iter()
        .map(|t| {
            Proj::from_name(t.trim())
                .with_context(|| format!("--targets: unknown projection type {t:?} (q, k, v, o, gate, up, down)"))
        })
        .collect::<Result<Vec<_>>>()?;
    let private_layers =
        args.private_layers.iter().map(|s| parse_layer(s, n_layers, "--private-layers")).collect::<Result<Vec<_>>>()?;
    if args.rank == 0 {
        bail!("--rank must be >= 1");
    }
    let budget = match args.budget {
        Some(f) if !(f > 0.0 && f <= 1.0) => {
            bail!("--budget {f}: the fraction of the source's block parameters must be in (0, 1], e.g. 0.5")
        }
        Some(f) => Some((f * block as f64).floor() as usize),
        None => None,
    };
    Ok(Spec {
        mode: Mode::from_name(&args.mode).with_context(|| format!("--mode {}: use lors or lowrank", args.mode))?,
        rank: args.rank,
        attn_rank: args.attn_rank,
        ffn_rank: args.ffn_rank,
        groups: args.groups.unwrap_or(1),
        group_size: args.group_size,
        targets,
        private_layers,
        energy: args.energy,
        budget,
    })
}

/// A layer number: `k`, `L-k` (k from the end) or `last`.
fn parse_layer(s: &str, n_layers: usize, flag: &str) -> Result<usize> {
    let s = s.trim();
    let layer = match s {
        "last" => n_layers.checked_sub(1),
        _ if s.starts_with("L-") => s[2..].parse::<usize>().ok().and_then(|k| n_layers.checked_sub(k)),
        _ => s.parse::<usize>().ok(),
    };
    layer.filter(|l| *l < n_layers).with_context(|| format!("{flag} {s}: expected a layer 0..{} or L-k", n_layers - 1))
}

/// Re-compressing a shared or LORS source: each new group must lie within one of the
/// source's groups, or each source group within one new group; otherwise a new base would
/// average layers that the source gave different bases, which the flags almost surely did
/// not mean.
fn check_groups_align(src: &LorsConfig, dst: &LorsConfig, n: usize) -> Result<()> {
    if !matches!(src.mode, Mode::Shared | Mode::Lors) || !matches!(dst.mode, Mode::Shared | Mode::Lors) {
        return Ok(());
    }
    let both: Vec<usize> = (0..n).filter(|&l| src.group_of(l, n).is_some() && dst.group_of(l, n).is_some()).collect();
    let same = |c: &LorsConfig, a: usize, b: usize| c.group_of(a, n) == c.group_of(b, n);
    let pairs = || both.iter().flat_map(|&a| both.iter().map(move |&b| (a, b)));
    let refines = pairs().all(|(a, b)| !same(dst, a, b) || same(src, a, b));
    let coarsens = pairs().all(|(a, b)| !same(src, a, b) || same(dst, a, b));
    if !refines && !coarsens {
        let groups = |c: &LorsConfig| {
            (0..n).map(|l| c.group_of(l, n).map_or("-".into(), |g| g.to_string())).collect::<Vec<_>>().join(",")
        };
        bail!(
            "the source's groups ({}) and the requested groups ({}) do not divide each other: choose --group-size/--groups whose groups each lie within one source group, or each contain whole source groups",
            groups(src),
            groups(dst)
        );
    }
    Ok(())
}

/// The calibration of `src` on the prepared data `dir` (windows of up to 512 tokens).
fn calibration(dir: &Path, src: &Loaded, n_tokens: usize) -> Result<Calibration> {
    let meta = Meta::load(dir).with_context(|| format!("--calibrate {}", dir.display()))?;
    if meta.vocab_size != src.cfg.model.vocab_size {
        bail!(
            "--calibrate {} has a vocabulary of {} but the model's is {}: prepare it with the model's tokenizer (`lors-lm prepare --tokenizer ...`)",
            dir.display(),
            meta.vocab_size,
            src.cfg.model.vocab_size
        );
    }
    if n_tokens == 0 {
        bail!("--calibration-tokens must be >= 1");
    }
    let t = std::time::Instant::now();
    let seq_len = src.cfg.model.max_seq_len.min(512);
    let cal = Calibration::from_data(&src.model.merged()?, dir, n_tokens, seq_len, 4)?;
    eprintln!("calibration: {} tokens of {} in {:.1}s", cal.tokens, dir.display(), t.elapsed().as_secs_f64());
    Ok(cal)
}

/// (source loss, compressed loss, predicted tokens) over the validation split of `dir`.
fn validation_losses(dir: &Path, src: &Loaded, model: &Model, cfg: &Config) -> Result<(f64, f64, usize)> {
    let meta = Meta::load(dir)?;
    if meta.vocab_size != cfg.model.vocab_size {
        bail!(
            "--data {} has a vocabulary of {} but the model's is {}: prepare it with the model's tokenizer",
            dir.display(),
            meta.vocab_size,
            cfg.model.vocab_size
        );
    }
    let val = TokenFile::open(dir, "val", &meta)?;
    let tokens = val.window(0, val.len())?;
    let t = cfg.train.seq_len;
    let device = model.device();
    let s = eval_tokens(&src.model.merged()?, &tokens, t, 16, &device)?;
    let c = eval_tokens(&model.merged()?, &tokens, t, 16, &device)?;
    Ok((s.loss, c.loss, s.tokens))
}

/// Write the run directory: config, tokenizer, data meta, checkpoint 0 (fresh optimizer
/// state), compress.json.
#[allow(clippy::too_many_arguments)]
fn write_run(
    out: &Path,
    force: bool,
    cfg: &Config,
    src: &Loaded,
    store: &ParamStore,
    compressed: &Compressed,
    report: &serde_json::Value,
    data: Option<&Path>,
) -> Result<()> {
    let run = RunDir::at(out);
    run.create(force)?; // a run's own files only: check_out refused anything else
    run.write_config(cfg)?;
    src.tokenizer
        .save(run.tokenizer_path(), false)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", run.tokenizer_path().display()))?;
    let meta_src = match (&src.kind, data) {
        (Kind::Run { dir, .. }, _) => Some(RunDir::at(dir).data_meta_path()),
        (_, Some(d)) => Some(d.join("meta.json")),
        _ => None,
    };
    if let Some(m) = meta_src.filter(|m| m.is_file()) {
        fs::copy(&m, run.data_meta_path()).with_context(|| format!("cannot copy {}", m.display()))?;
    }
    let opt = AdamW::from_config(store.vars_with_roles(), cfg)?;
    let val_loss = report["val"]["compressed_loss"].as_f64();
    let state = TrainState {
        step: 0,
        data_rng: Rng::new(cfg.train.seed).fork(1).state,
        opt_t: 0,
        tokens_seen: 0,
        val_loss,
        rank_data_rngs: vec![],
    };
    let optimizer = opt.state_tensors();
    run.save_checkpoint(&Contents { cfg, params: &compressed.tensors, optimizer: &optimizer, state: &state }, 0)?;
    let text = serde_json::to_string_pretty(report)? + "\n";
    crate::files::write_atomic(&out.join("compress.json"), |w| w.write_all(text.as_bytes()))
}

/// Rank and energy kept per layer (rows) and projection type (columns).
fn table(report: &[ProjReport], n_layers: usize) -> String {
    let mut s = String::from(
        "rN P% = rank N of the private residual B·A, and P = the share of the residual's energy ‖W_l − W_shared‖²_F it keeps\n(energy_kept in compress.json; W_shared = 0 in lowrank mode; with --calibrate, of ‖(W_l − W_shared)·X‖²_F); private = not shared\n",
    );
    let _ = write!(s, "{:<6}", "layer");
    for p in Proj::ALL {
        let _ = write!(s, " {:>13}", p.name());
    }
    s.push('\n');
    for l in 0..n_layers {
        let _ = write!(s, "{l:<6}");
        for p in Proj::ALL {
            let cell = match report.iter().find(|r| r.layer == l && r.proj == p) {
                Some(r) if r.rank > 0 => format!("r{} {:.1}%", r.rank, 100.0 * r.energy_kept),
                Some(_) => "private".into(),
                None => "-".into(),
            };
            let _ = write!(s, " {cell:>13}");
        }
        s.push('\n');
    }
    s
}
