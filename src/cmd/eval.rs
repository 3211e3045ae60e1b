//! `lors-lm eval`: mean next-token loss and perplexity of a run or a GGUF model on prepared
//! data or a text file (the definition is in `infer/perplexity.rs`).

use crate::data::{Meta, TokenFile};
use crate::formats::gguf;
use crate::infer::perplexity::{eval_tokens, ByteLevel};
use crate::infer::weights::{prepare, WeightsChoice, Workload};
use crate::train::run_dir::LoadedRun;
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Run directory written by `lors-lm train`.
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "gguf", conflicts_with = "gguf")]
    pub run: Option<PathBuf>,
    /// Instead of a run: a GGUF file (`lors-lm export --format gguf`, or a pretrained Llama),
    /// evaluated in f32.
    #[arg(long, value_name = "FILE")]
    pub gguf: Option<PathBuf>,
    /// Checkpoint step of --run to evaluate [default: the latest].
    #[arg(long, value_name = "STEP", conflicts_with = "gguf")]
    pub checkpoint: Option<usize>,
    /// Prepared data directory to evaluate on.
    #[arg(long, value_name = "DIR", conflicts_with = "text", required_unless_present = "text")]
    pub data: Option<PathBuf>,
    /// Split of --data: val or train.
    #[arg(long, default_value = "val", value_parser = ["val", "train"])]
    pub split: String,
    /// A UTF-8 text file, tokenized with the run's tokenizer.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Window length T [default: the run's train.seq_len].
    #[arg(long, value_name = "T")]
    pub seq_len: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Print {"loss", "ppl", "tokens", "windows"} as one JSON line, with "bpb" (bits per
    /// byte) and "bytes" when the tokenizer is byte-level (`prepare --vocab-size 257`).
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights to evaluate with: merged, factored (the unique parameters only, see
    /// `generate --weights`) or auto (merged: whole windows per pass are compute-bound).
    #[arg(long, default_value = "auto", value_parser = ["auto", "merged", "factored"])]
    pub weights: String,
}

/// The model to evaluate: its config, model as loaded (`--weights` merges or factors it), tokenizer, a description for messages,
/// and where its tokenizer.json lives (for the hint when the data's vocabulary differs).
struct Subject {
    cfg: crate::config::Config,
    model: crate::model::Model,
    tokenizer: tokenizers::Tokenizer,
    describe: String,
    tokenizer_hint: String,
}

fn load(args: &EvalArgs, device: &candle_core::Device) -> Result<Subject> {
    match (&args.run, &args.gguf) {
        (Some(run), _) => {
            let LoadedRun { cfg, model, tokenizer, params, step, .. } =
                RunDir::open(run)?.load(args.checkpoint, device)?;
            drop(params); // handles on every parameter: let conversion free the training tensors
            Ok(Subject {
                describe: format!("step {step} of {}", run.display()),
                tokenizer_hint: format!("--tokenizer {}/tokenizer.json", run.display()),
                model,
                cfg,
                tokenizer,
            })
        }
        (None, Some(path)) => {
            let g = gguf::load_gguf(path, device)?;
            Ok(Subject {
                describe: path.display().to_string(),
                tokenizer_hint: "the model's tokenizer (e.g. `lors-lm compress --from FILE.gguf` writes it as RUN_DIR/tokenizer.json)".into(),
                model: g.model,
                cfg: g.cfg,
                tokenizer: g.tokenizer,
            })
        }
        (None, None) => bail!("pass --run RUN_DIR or --gguf FILE"),
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let choice = WeightsChoice::parse(&args.weights)?;
    let device = crate::device::parse_device(&args.device)?;
    let s = load(args, &device)?;
    let seq_len = args.seq_len.unwrap_or(s.cfg.train.seq_len);
    if seq_len > s.cfg.model.max_seq_len {
        bail!("--seq-len {seq_len} exceeds the model's max_seq_len {}", s.cfg.model.max_seq_len);
    }
    let (tokens, source) = match (&args.data, &args.text) {
        (Some(dir), _) => {
            let meta = Meta::load(dir)?;
            if meta.vocab_size != s.cfg.model.vocab_size {
                bail!(
                    "--data {} has a vocabulary of {} but the model's is {}: prepare it with {}",
                    dir.display(),
                    meta.vocab_size,
                    s.cfg.model.vocab_size,
                    s.tokenizer_hint
                );
            }
            let f = TokenFile::open(dir, &args.split, &meta)?;
            (f.window(0, f.len())?, format!("{} ({} split)", dir.display(), args.split))
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --text {} (is it UTF-8 text?)", path.display()))?;
            let ids = s
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("cannot tokenize {}: {e}", path.display()))?
                .get_ids()
                .to_vec();
            (ids, path.display().to_string())
        }
        (None, None) => bail!("pass --data DIR or --text FILE"),
    };
    if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= s.cfg.model.vocab_size) {
        bail!("{source} holds token id {bad} >= the model's vocabulary {}", s.cfg.model.vocab_size);
    }
    let (model, line) = prepare(s.model, s.cfg.lors.mode, choice, Workload::Windows)?;
    if !args.json {
        eprintln!("{line}");
    }
    let r = eval_tokens(&model, &tokens, seq_len, args.batch_size, &device)
        .with_context(|| format!("cannot evaluate {source}"))?;
    // Bits per byte where every id is a byte (the special tokens excepted: see infer/perplexity.rs).
    let bytes =
        ByteLevel::of(&s.tokenizer).and_then(|b| Some((b.bits_per_byte(&r, &tokens)?, b.bytes(&tokens[1..=r.tokens]))));
    if args.json {
        let mut v = serde_json::json!({"loss": r.loss, "ppl": r.ppl(), "tokens": r.tokens, "windows": r.windows});
        if let Some((bpb, n)) = bytes {
            v["bpb"] = bpb.into();
            v["bytes"] = n.into();
        }
        println!("{v}");
    } else {
        println!(
            "{source}: loss {:.4}{}, perplexity {:.2} over {} predicted tokens ({} windows of {seq_len}+1), {}",
            r.loss,
            bytes.map_or(String::new(), |(bpb, _)| format!(" ({bpb:.4} bits per byte)")),
            r.ppl(),
            r.tokens,
            r.windows,
            s.describe
        );
    }
    Ok(())
}
