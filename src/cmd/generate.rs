//! `lors-lm generate`: sample text from a trained run, a Hugging Face Llama directory or a
//! GGUF file, streaming it to stdout (or, with `--json`, printing ids and text at the end).

use crate::config::Mode;
use crate::formats::{gguf, hf};
use crate::infer::generate::{generate_tokens, Sampler};
use crate::infer::weights::{prepare, WeightsChoice, Workload};
use crate::model::Model;
use crate::train::run_dir::LoadedRun;
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Run directory written by `lors-lm train`.
    #[arg(long, value_name = "RUN_DIR", required_unless_present_any = ["hf", "gguf"], conflicts_with_all = ["hf", "gguf"])]
    pub run: Option<PathBuf>,
    /// Instead of a run: a Hugging Face Llama directory (e.g. from `lors-lm export`), or
    /// hf:OWNER/NAME through the Hugging Face cache.
    #[arg(long, value_name = "DIR|hf:OWNER/NAME", conflicts_with = "gguf")]
    pub hf: Option<String>,
    /// Instead of a run: a GGUF file (llama.cpp's format: `lors-lm export --format gguf`, or a
    /// pretrained Llama in f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 or a k-quant), run in f32.
    /// A text prompt starts with BOS when the file sets `tokenizer.ggml.add_bos_token`, as in
    /// llama.cpp.
    #[arg(long, value_name = "FILE")]
    pub gguf: Option<PathBuf>,
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
    /// The prompt as token ids, comma-separated, instead of text (to give another
    /// implementation exactly the same input).
    #[arg(long, value_name = "IDS", value_delimiter = ',', conflicts_with_all = ["prompt", "prompt_file"])]
    pub prompt_ids: Option<Vec<u32>>,
    /// Print one JSON object at the end instead of streaming text: prompt_ids, ids (the
    /// generated ones), text (the generated text), tokens_per_s (of the decoding loop).
    #[arg(long)]
    pub json: bool,
    /// Also write the logits the model gives at every prompt position, (prompt length,
    /// vocabulary) f32, to FILE as a NumPy .npy (one forward pass over the whole prompt).
    #[arg(long, value_name = "FILE.npy")]
    pub logits_out: Option<PathBuf>,
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

/// What `generate` runs: the model (as loaded; `--weights` then merges or factors it), its
/// sharing mode, tokenizer, BOS, end-of-sequence ids, and whether prompts start with BOS
/// (GGUF files that say so, as llama.cpp does).
struct Generator {
    model: Model,
    mode: Mode,
    tok: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
}

fn load(args: &GenerateArgs, device: &Device) -> Result<Generator> {
    if args.checkpoint.is_some() && args.run.is_none() {
        bail!("--checkpoint applies to --run only");
    }
    Ok(match (&args.run, &args.hf, &args.gguf) {
        (Some(run), _, _) => {
            let LoadedRun { cfg, model, tokenizer, meta, params, .. } =
                RunDir::open(run)?.load(args.checkpoint, device)?;
            drop(params); // handles on every parameter: let conversion free the training tensors
            let (bos, eos) = (meta.as_ref().and_then(|m| m.bos_id), meta.as_ref().and_then(|m| m.eos_id));
            let eos = eos.into_iter().collect();
            Generator { model, mode: cfg.lors.mode, tok: tokenizer, bos, eos, add_bos: false }
        }
        (None, Some(spec), _) => {
            let dir = hf::resolve_hf(spec)?;
            let (cfg, model, tok, hf_cfg) = hf::load_hf_dir(&dir, device)?;
            let bos = hf::token_ids(&hf_cfg, "bos_token_id").first().copied();
            let eos = hf::token_ids(&hf_cfg, "eos_token_id");
            Generator { model, mode: cfg.lors.mode, tok, bos, eos, add_bos: false }
        }
        (None, None, Some(path)) => {
            let g = gguf::load_gguf(path, device)?;
            let mode = g.cfg.lors.mode;
            Generator { model: g.model, mode, tok: g.tokenizer, bos: g.bos, eos: g.eos, add_bos: g.add_bos }
        }
        (None, None, None) => bail!("pass --run RUN_DIR, --hf DIR or --gguf FILE"),
    })
}

/// The prompt's token ids (`--prompt-ids` as given, or the tokenized text, after BOS when
/// `add_bos`; BOS alone for an empty prompt) and its text.
fn prompt(args: &GenerateArgs, g: &Generator) -> Result<(Vec<u32>, String)> {
    let (tok, bos, vocab) = (&g.tok, g.bos, g.model.cfg.vocab_size);
    if let Some(ids) = &args.prompt_ids {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("--prompt-ids: token id {bad} >= the model's vocabulary {vocab}");
        }
        let text = tok.decode(ids, false).map_err(|e| anyhow::anyhow!("cannot decode --prompt-ids: {e}"))?;
        return Ok((ids.clone(), text));
    }
    let text = read_prompt(args)?;
    let mut ids = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    match bos {
        Some(b) if ids.is_empty() || (g.add_bos && ids[0] != b) => ids.insert(0, b),
        None if ids.is_empty() => bail!("empty prompt and the tokenizer has no BOS token: pass --prompt TEXT"),
        _ => {}
    }
    Ok((ids, text))
}

/// `--logits-out`: the logits at every prompt position as a (T, V) f32 .npy file.
fn write_logits(model: &Model, ids: &[u32], path: &std::path::Path) -> Result<()> {
    if ids.len() > model.cfg.max_seq_len {
        bail!(
            "--logits-out: the prompt has {} tokens, more than model.max_seq_len {}",
            ids.len(),
            model.cfg.max_seq_len
        );
    }
    let x = Tensor::new(ids, &model.device())?.unsqueeze(0)?;
    let logits = model.forward(&x)?.squeeze(0)?.to_device(&Device::Cpu)?; // (T, V)
    logits.write_npy(path).with_context(|| format!("cannot write --logits-out {}", path.display()))
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let sampler = Sampler::new(args.temperature, args.top_k, args.top_p, args.seed)?;
    let device = crate::device::parse_device(&args.device)?;
    let choice = WeightsChoice::parse(&args.weights)?;
    let g = load(args, &device)?;
    let (ids, prompt) = prompt(args, &g)?;
    let (model, line) = prepare(g.model, g.mode, choice, Workload::Decode)?;
    eprintln!("{line}");
    let (model, tok, eos) = (&model, &g.tok, &g.eos);
    if let Some(path) = &args.logits_out {
        write_logits(model, &ids, path)?;
    }
    let mut sampler = sampler;
    let mut stdout = std::io::stdout().lock();
    if !args.json {
        write!(stdout, "{prompt}")?;
        stdout.flush()?;
    }
    let mut generated: Vec<u32> = vec![];
    let mut printed = 0usize;
    let mut slid = false;
    let start = Instant::now();
    let mut marks: Vec<f64> = vec![];
    generate_tokens(
        model,
        &ids,
        args.max_new_tokens,
        &mut sampler,
        eos,
        |t| {
            marks.push(start.elapsed().as_secs_f64());
            generated.push(t);
            if args.json {
                return Ok(());
            }
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
    if args.json {
        let secs = start.elapsed().as_secs_f64();
        let text = tok.decode(&generated, true).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
        let out = serde_json::json!({"prompt_ids": ids, "ids": generated, "text": text,
            "tokens_per_s": generated.len() as f64 / secs.max(1e-9)});
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
    }
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
