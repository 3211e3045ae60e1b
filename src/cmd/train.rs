//! `lors-lm train`: resolve the config, the starting weights (`--init-from`) and the teacher
//! (`--teacher`) from the command line, then run a training session (`train::session`).

use crate::cmd::source;
use crate::config::{Config, Mode};
use crate::data::Meta;
use crate::train::distributed::{self, Dist};
use crate::train::{session, FitSummary, RunDir, SessionOptions};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// TOML config file (see configs/). With --resume it defaults to RUN_DIR/config.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Prepared data directory from `lors-lm prepare` (overrides data.dir).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Run directory for config, checkpoints and logs [default: runs/<config name>].
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start afresh in an --out that holds another run (its checkpoints and logs are deleted).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Print a log line every N steps (overrides train.log_interval).
    #[arg(long, value_name = "N")]
    pub log_interval: Option<usize>,
    /// Stop after this step, checkpointing it, as if interrupted (continue with --resume).
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<usize>,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
    /// Start a new run from the weights of a trained model (a run directory, e.g. from
    /// `lors-lm compress`, a Hugging Face Llama directory or hf:OWNER/NAME) with a fresh
    /// optimizer and schedule. Without --config, the model's own config is used.
    #[arg(long, value_name = "SOURCE", conflicts_with = "resume")]
    pub init_from: Option<String>,
    /// Distil from this model (run directory, Hugging Face dir or hf:OWNER/NAME; same
    /// tokenizer): loss = (1−α)·CE + α·T²·KL(teacher ‖ student), with α =
    /// train.distill_alpha (set it, e.g. --set train.distill_alpha=0.5) and T =
    /// train.distill_temperature.
    #[arg(long, value_name = "SOURCE")]
    pub teacher: Option<String>,
    /// Data-parallel runs (under mpirun or srun): a rank that waits longer than this in one
    /// collective (a gradient all-reduce, a checkpoint, an eval) ends the job with an error,
    /// rather than hang on a lost or stuck rank.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub collective_timeout: f64,
}

/// Train, as one rank of a data-parallel run when a launcher (mpirun, srun) started this
/// process as one of several (docs/distributed.md).
pub fn run(args: &TrainArgs) -> Result<FitSummary> {
    if !(args.collective_timeout.is_finite() && args.collective_timeout > 0.0) {
        bail!("--collective-timeout must be a positive number of seconds");
    }
    let Some(dist) = distributed::start(Duration::from_secs_f64(args.collective_timeout))? else {
        return run_as(args, None);
    };
    match run_as(args, Some(&dist)) {
        // Checkpointed, flushed and closed: exit 0 now rather than be SIGKILLed in
        // MPI_Finalize by a launcher that is tearing the job down.
        Ok(_) if distributed::launcher_is_ending_the_job() => distributed::exit_now(0),
        Ok(summary) => Ok(summary),
        Err(e) => {
            // MPI_Abort ends every rank at once; returning would leave the others waiting in
            // a collective for this one (and MPI_Finalize would wait for them).
            distributed::eprint_line(&format!("error: rank {} of {}: {e:#}", dist.rank(), dist.size()));
            dist.abort(1)
        }
    }
}

fn run_as(args: &TrainArgs, dist: Option<&Dist>) -> Result<FitSummary> {
    let out = match (&args.out, &args.config) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => PathBuf::from("runs").join(c.file_stem().unwrap_or_default()),
        (None, None) => {
            bail!("pass --out RUN_DIR (and --config FILE, unless --resume or --init-from gives the config)")
        }
    };
    let run = RunDir::at(&out);
    if args.resume {
        // Say what is missing in the run directory before which file could not be read.
        run.checkpoint(None).with_context(|| format!("--resume: nothing to resume in {}", out.display()))?;
    }
    let device = match dist {
        Some(d) => {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok().map(|v| v.split(',').count());
            let spec = distributed::rank_device_spec(&args.device, d.local(), visible)?;
            crate::device::parse_device(&spec).with_context(|| {
                let (index, n) = d.local();
                format!("rank {} is rank {index} of {n} on its machine: start one rank per GPU", d.rank())
            })?
        }
        None => crate::device::parse_device(&args.device)?,
    };
    let mut sets = args.sets.clone();
    if let Some(t) = &args.teacher {
        sets.push(format!("train.teacher={}", toml::Value::String(t.clone())));
    }
    let init = match &args.init_from {
        Some(spec) => Some(source::load(spec, None, &device, "--init-from")?),
        None => None,
    };
    let mut cfg = match (&args.config, args.resume, &init) {
        (Some(c), _, _) => Config::load(c, &sets)?,
        (None, true, _) => resume_config(&run, &sets)?,
        (None, false, Some(src)) => {
            src.cfg.with_sets(&sets, &format!("the config of --init-from {}", src.describe()))?
        }
        (None, false, None) => bail!("pass --config FILE (or --init-from SOURCE, whose config is then used)"),
    };
    if let Some(n) = args.log_interval {
        if n == 0 {
            bail!("--log-interval must be > 0");
        }
        cfg.train.log_interval = n;
    }
    let data_dir = match &args.data {
        Some(d) => d.clone(),
        None if !cfg.data.dir.is_empty() => PathBuf::from(&cfg.data.dir),
        None => bail!("no data: pass --data DIR (from `lors-lm prepare`) or set data.dir in the config"),
    };
    if !args.resume {
        // A new run (with --force) clears its directory's run files: never where a source is.
        run.check_not_source(&data_dir, "--data")?;
        for (flag, spec) in [("--init-from", &args.init_from), ("--teacher", &args.teacher)] {
            if let Some(spec) = spec {
                run.check_not_source(Path::new(spec), flag)?;
            }
        }
    }
    if cfg.model.vocab_size == 0 {
        // "Take it from the prepared data": resolved before --init-from compares dimensions.
        cfg.model.vocab_size = Meta::load(&data_dir)?.vocab_size;
    }
    let init_weights = match init {
        Some(src) => {
            cfg.train.init_from = args.init_from.clone().unwrap_or_default();
            Some(init_weights(src, &cfg)?)
        }
        None => None,
    };
    let teacher = match cfg.train.teacher.as_str() {
        "" => None,
        spec => {
            if cfg.train.distill_alpha == 0.0 {
                bail!("--teacher {spec}: set the weight of the distillation term, e.g. --set train.distill_alpha=0.5");
            }
            let t = source::load(spec, None, &device, "--teacher")?;
            check_same_tokenizer(&t, &data_dir)?;
            Some(t.model)
        }
    };
    let opts = SessionOptions {
        resume: args.resume,
        force: args.force,
        quiet: args.quiet,
        stop_at: args.stop_at,
        init_weights,
        teacher,
        dist: dist.cloned(),
    };
    session::train(cfg, &data_dir, &run, &device, &opts)
}

/// The config a `--resume` without `--config` continues with: RUN_DIR/config.toml, checked
/// against the copy saved with the latest checkpoint (written atomically with its weights).
/// A file that differs (damaged, edited by hand, or from a resume whose `--set` changes no
/// checkpoint has recorded yet) is refused with both ways on; a missing one gives the
/// checkpoint's config.
fn resume_config(run: &RunDir, sets: &[String]) -> Result<Config> {
    let ckpt = run.checkpoint(None)?;
    let saved = ckpt.config()?;
    let path = run.config_path();
    let (shown, step) = (path.display(), ckpt.step);
    if !path.exists() {
        eprintln!("note: {shown} is missing: resuming with the config saved with checkpoint {step}");
        return saved.with_sets(sets, &format!("the config of checkpoint {step}"));
    }
    let file = Config::load(&path, &[]).with_context(|| {
        format!("{shown} cannot be used (damaged by a crash?): delete it to resume with the config saved with checkpoint {step}, or pass --config FILE")
    })?;
    let diff = file.differences(&saved)?;
    if !diff.is_empty() {
        bail!(
            "{shown} differs from the config saved with checkpoint {step}: {}. Pass --config {shown} to resume with the file's values, or delete the file to resume with the checkpoint's (add --set KEY=VALUE for changes)",
            diff.join(", ")
        );
    }
    file.with_sets(sets, &shown.to_string())
}

/// The weights a new run starts from: the source's own parameters when they fit the config
/// (a LORS run into the same LORS config, any model into a vanilla one, merged); else a clear
/// error pointing at `lors-lm compress`.
fn init_weights(src: source::Loaded, cfg: &Config) -> Result<HashMap<String, Tensor>> {
    if cfg.model != src.cfg.model {
        let (a, b) = (&cfg.model, &src.cfg.model);
        bail!(
            "--init-from {}: the model dimensions differ from the config's (d_model {} vs {}, n_layers {} vs {}, heads {}/{} vs {}/{}, ffn {} vs {}, vocab {} vs {}, max_seq_len {} vs {}): use the source's own config (leave out --config) or matching [model] values",
            src.describe(),
            b.d_model, a.d_model, b.n_layers, a.n_layers, b.n_heads, b.kv_heads(), a.n_heads, a.kv_heads(),
            b.ffn_hidden, a.ffn_hidden, b.vocab_size, a.vocab_size, b.max_seq_len, a.max_seq_len
        );
    }
    if cfg.lors.mode == Mode::Vanilla {
        return Ok(src.model.merged_tensors()?.into_iter().collect());
    }
    if src.cfg.lors != cfg.lors {
        bail!(
            "--init-from {}: its sharing ([lors] mode {}) differs from the config's (mode {}): compress it first (`lors-lm compress --from {} ...`) and start from that run",
            src.describe(),
            src.cfg.lors.mode,
            cfg.lors.mode,
            src.describe()
        );
    }
    Ok(src.params)
}

/// The teacher must tokenize as the training data does (same vocabulary, same ids).
fn check_same_tokenizer(teacher: &source::Loaded, data_dir: &Path) -> Result<()> {
    let meta = Meta::load(data_dir)?;
    let theirs = teacher.cfg.model.vocab_size;
    if theirs != meta.vocab_size {
        bail!(
            "--teacher {}: it predicts over {theirs} tokens but the data in {} has a vocabulary of {}: the teacher needs the data's tokenizer",
            teacher.describe(),
            data_dir.display(),
            meta.vocab_size
        );
    }
    let ours = data_dir.join("tokenizer.json");
    if ours.is_file() {
        let data_tok = crate::formats::load_tokenizer(&ours)?;
        if data_tok.get_vocab(true) != teacher.tokenizer.get_vocab(true) {
            bail!(
                "--teacher {}: its tokenizer differs from the data's ({}): distillation compares next-token distributions, so both must use the same tokens",
                teacher.describe(),
                ours.display()
            );
        }
    }
    Ok(())
}
