//! `lors-lm generate`: sample text from a trained run or a Hugging Face Llama directory,
//! streaming it to stdout.

use crate::formats::hf;
use crate::infer::generate::{generate_tokens, Sampler};
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

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

pub fn run(args: &GenerateArgs) -> Result<()> {
    let sampler = Sampler::new(args.temperature, args.top_k, args.top_p, args.seed)?;
    let device = crate::device::parse_device(&args.device)?;
    let (model, tok, bos, eos) = match (&args.run, &args.hf) {
        (Some(run), _) => {
            let loaded = RunDir::open(run)?.load(args.checkpoint, &device)?;
            let (bos, eos) = (loaded.meta.as_ref().and_then(|m| m.bos_id), loaded.meta.as_ref().and_then(|m| m.eos_id));
            (loaded.model.merged()?, loaded.tokenizer, bos, eos.into_iter().collect())
        }
        (None, Some(spec)) => {
            let dir = hf::resolve_hf(spec)?;
            let (_, model, tok, hf_cfg) = hf::load_hf_dir(&dir, &device)?;
            let bos = hf::token_ids(&hf_cfg, "bos_token_id").first().copied();
            (model.merged()?, tok, bos, hf::token_ids(&hf_cfg, "eos_token_id"))
        }
        (None, None) => bail!("pass --run RUN_DIR or --hf DIR"),
    };
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
    generate_tokens(
        &model,
        &ids,
        args.max_new_tokens,
        &mut sampler,
        &eos,
        |t| {
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
    Ok(())
}
