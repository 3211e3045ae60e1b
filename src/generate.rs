//! `lors-lm generate`: sample text from a trained run. Weights are merged once at load
//! (`W + B A`), so decoding costs what a vanilla model's does; a KV cache makes each new
//! token one single-position forward pass.

use crate::checkpoint;
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
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

/// How the next token is picked from the logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!("--temperature must be >= 0 (0 = greedy), got {temperature}");
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if top_k == Some(0) {
            bail!("--top-k must be >= 1");
        }
        Ok(Self { temperature, top_k, top_p, rng: Rng::new(seed) })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.top_k {
            idx.truncate(k.min(idx.len()));
        }
        let max = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / self.temperature).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u = self.rng.next_f64();
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if u < cum {
                return idx[i] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate up to `n` tokens after `prompt` with a (merged) model, calling `on_token` for each
/// new token. Stops early at `eos`. When the context would exceed model.max_seq_len, the
/// window slides: the cache is rebuilt from the last half-context of tokens (reported once
/// through `on_slide`).
pub fn generate_tokens(
    model: &Model,
    prompt: &[u32],
    n: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
    mut on_slide: impl FnMut(),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("empty prompt: nothing to condition on");
    }
    let ctx = model.cfg.max_seq_len;
    let device = model.device();
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut out = vec![];
    let mut cache = model.new_cache();
    // Prefill with the last `ctx` prompt tokens.
    let start = seq.len().saturating_sub(ctx);
    if start > 0 {
        on_slide();
    }
    let mut pos = seq.len() - start;
    let ids = Tensor::new(&seq[start..], &device)?.unsqueeze(0)?;
    let mut logits = last_logits(&model.forward_at(&ids, 0, Some(&mut cache))?)?;
    for _ in 0..n {
        let next = sampler.sample(&logits);
        out.push(next);
        seq.push(next);
        on_token(next)?;
        if Some(next) == eos {
            break;
        }
        if pos == ctx {
            on_slide();
            cache = model.new_cache();
            let keep = (ctx / 2).max(1);
            let window = &seq[seq.len() - keep..];
            let ids = Tensor::new(window, &device)?.unsqueeze(0)?;
            logits = last_logits(&model.forward_at(&ids, 0, Some(&mut cache))?)?;
            pos = keep;
        } else {
            let ids = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            logits = last_logits(&model.forward_at(&ids, pos, Some(&mut cache))?)?;
            pos += 1;
        }
    }
    Ok(out)
}

/// logits (1, T, V) → the last position's V logits.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits.narrow(1, t - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
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
            let loaded = checkpoint::load_run(run, args.checkpoint, &device)?;
            let (bos, eos) = (loaded.meta.as_ref().and_then(|m| m.bos_id), loaded.meta.as_ref().and_then(|m| m.eos_id));
            (loaded.model.merged()?, loaded.tokenizer, bos, eos)
        }
        (None, Some(spec)) => {
            let dir = crate::hf::resolve_hf(spec)?;
            let (_, model, tok, hf) = crate::hf::load_hf_dir(&dir, &device)?;
            let id = |k: &str| hf.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
            (model.merged()?, tok, id("bos_token_id"), id("eos_token_id"))
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
        eos,
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
