//! `lors-lm generate`: sample text from a trained run or a Hugging Face Llama directory,
//! streaming it to stdout.

use crate::config::Mode;
use crate::formats::hf;
use crate::infer::generate::{generate_tokens, Sampler};
use crate::infer::weights::{prepare, WeightsChoice, Workload};
use crate::model::Model;
use crate::train::run_dir::LoadedRun;
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Run directory written by `lors-lm train`.
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "hf", conflicts_with = "hf")]
    pub run: Option<PathBuf>,
    /// Instead of a run: a Hugging Face Llama directory (e.g. from `lors-lm export`), or
    /// hf:OWNER/NAME through the Hugging Face cache.
    #[arg(long, value_name = "DIR|hf:OWNER/NAME")]
    pub hf: Option<String>,
    /// Checkpoint step to load [default: the latest].
    #[arg(long, value_name = "STEP")]
    pub checkpoint: Option<usize>,
    /// Prompt text. Without --prompt or --prompt-file, the prompt is read from stdin when it
    /// is not a terminal; an empty prompt starts from the BOS token if the tokenizer has one.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Tokens to generate. Beyond model.max_seq_len the context window slides.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only from the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with probability mass >= P, in (0, 1].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights to decode with: merged (W_shared + B_l A_l folded per layer, a vanilla model's
    /// cost), factored (the shared bases and private factors as trained: the unique parameters
    /// only), or auto (the faster for this model on this machine; says which on stderr).
    #[arg(long, default_value = "auto", value_parser = ["auto", "merged", "factored"])]
    pub weights: String,
    /// Print prompt and decoding tokens/s and the peak RSS to stderr at the end.
    #[arg(long)]
    pub stats: bool,
}

fn read_prompt(args: &GenerateArgs) -> Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    if let Some(f) = &args.prompt_file {
        return std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --prompt-file {} (is it UTF-8 text?)", f.display()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(String::new());
    }
    let mut s = String::new();
    stdin.lock().read_to_string(&mut s).context("cannot read the prompt from stdin (is it UTF-8 text?)")?;
    Ok(s)
}

/// A trained run or HF model, its tokenizer, BOS and EOS ids, and its sharing mode.
type Loaded = (Model, tokenizers::Tokenizer, Option<u32>, Vec<u32>, Mode);

fn load(args: &GenerateArgs, device: &candle_core::Device) -> Result<Loaded> {
    match (&args.run, &args.hf) {
        (Some(run), _) => {
            let LoadedRun { cfg, model, tokenizer, meta, params, .. } =
                RunDir::open(run)?.load(args.checkpoint, device)?;
            drop(params); // handles on every parameter: let conversion free the training tensors
            let (bos, eos) = (meta.as_ref().and_then(|m| m.bos_id), meta.as_ref().and_then(|m| m.eos_id));
            Ok((model, tokenizer, bos, eos.into_iter().collect(), cfg.lors.mode))
        }
        (None, Some(spec)) => {
            let dir = hf::resolve_hf(spec)?;
            let (cfg, model, tok, hf_cfg) = hf::load_hf_dir(&dir, device)?;
            let bos = hf::token_ids(&hf_cfg, "bos_token_id").first().copied();
            Ok((model, tok, bos, hf::token_ids(&hf_cfg, "eos_token_id"), cfg.lors.mode))
        }
        (None, None) => bail!("pass --run RUN_DIR or --hf DIR"),
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let sampler = Sampler::new(args.temperature, args.top_k, args.top_p, args.seed)?;
    let choice = WeightsChoice::parse(&args.weights)?;
    let device = crate::device::parse_device(&args.device)?;
    let (model, tok, bos, eos, mode) = load(args, &device)?;
    let (model, line) = prepare(model, mode, choice, Workload::Decode)?;
    eprintln!("{line}");
    let tok = &tok;
    let prompt = read_prompt(args)?;
    let mut ids = tok
        .encode(prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        match bos {
            Some(b) => ids.push(b),
            None => bail!("empty prompt and the tokenizer has no BOS token: pass --prompt TEXT"),
        }
    }
    let mut sampler = sampler;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{prompt}")?;
    stdout.flush()?;
    let mut generated: Vec<u32> = vec![];
    let mut printed = 0usize;
    let mut slid = false;
    let start = Instant::now();
    let mut marks: Vec<f64> = vec![];
    generate_tokens(
        &model,
        &ids,
        args.max_new_tokens,
        &mut sampler,
        &eos,
        |t| {
            marks.push(start.elapsed().as_secs_f64());
            generated.push(t);
            let text = tok.decode(&generated, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
            // Hold back an incomplete UTF-8 sequence (shown as U+FFFD) until it completes.
            if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
                write!(stdout, "{}", &text[printed..])?;
                stdout.flush()?;
                printed = text.len();
            }
            Ok(())
        },
        || {
            if !slid {
                eprintln!(
                    "\n[note: the context exceeds model.max_seq_len ({}); the window slides]",
                    model.cfg.max_seq_len
                );
                slid = true;
            }
        },
    )?;
    writeln!(stdout)?;
    if args.stats {
        eprintln!("{}", stats_line(ids.len(), &marks));
    }
    Ok(())
}

/// "prompt: 12 tokens at 812.3 tokens/s; decoding: 199 tokens at 95.1 tokens/s; peak RSS 61 MB",
/// from the times (s since the start) at which each new token was known.
fn stats_line(prompt: usize, marks: &[f64]) -> String {
    let mut parts = vec![];
    if let Some(&first) = marks.first() {
        // The first token comes out of the prompt's forward pass.
        parts.push(format!("prompt: {prompt} tokens at {:.1} tokens/s", prompt as f64 / first.max(1e-9)));
    }
    if marks.len() > 1 {
        let n = marks.len() - 1;
        let secs = (marks[n] - marks[0]).max(1e-9);
        parts.push(format!("decoding: {n} tokens at {:.1} tokens/s", n as f64 / secs));
    }
    let rss = crate::monitor::peak_rss_mb().map_or("unknown".into(), |mb| format!("{mb:.0} MB"));
    parts.push(format!("peak RSS {rss}"));
    format!("stats: {}", parts.join("; "))
}
