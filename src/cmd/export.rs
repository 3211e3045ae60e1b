//! `lors-lm export`: a trained run as a plain Hugging Face Llama directory, or as one GGUF
//! file for llama.cpp, Ollama and LM Studio.

use crate::formats::gguf::{write_gguf, GgufDtype, GgufInfo};
use crate::formats::hf::{hf_config, write_safetensors};
use crate::train::{LoadedRun, RunDir};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Run directory written by `lors-lm train`.
    #[arg(long, value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// Checkpoint step to export [default: the latest].
    #[arg(long, value_name = "STEP")]
    pub checkpoint: Option<usize>,
    /// Output format: hf-llama (a Hugging Face LlamaForCausalLM directory) or gguf (one file
    /// for llama.cpp, Ollama, LM Studio: weights, llama metadata and tokenizer).
    #[arg(long, default_value = "hf-llama", value_parser = ["hf-llama", "gguf"])]
    pub format: String,
    /// Output directory (hf-llama: refused if it exists and is not empty, unless --force), or
    /// file (gguf, e.g. model.gguf: refused if it exists, unless --force); outside --run.
    #[arg(long, value_name = "DIR|FILE")]
    pub out: PathBuf,
    /// Weight dtype: f32, bf16 or f16 for hf-llama; f32, f16 or q8_0 for gguf (norms stay f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16", "q8_0"])]
    pub dtype: String,
    /// Write into a non-empty --out: the export's own files (model.safetensors, config.json,
    /// generation_config.json, tokenizer.json; or the GGUF file) are replaced, nothing else.
    #[arg(long)]
    pub force: bool,
}

fn parse_dtype(s: &str) -> Result<(DType, &'static str)> {
    Ok(match s {
        "f32" => (DType::F32, "float32"),
        "bf16" => (DType::BF16, "bfloat16"),
        "f16" => (DType::F16, "float16"),
        other => bail!("--dtype {other}: an hf-llama export is f32, bf16 or f16 (q8_0 is for --format gguf)"),
    })
}

pub fn run(args: &ExportArgs) -> Result<()> {
    // An export inside the run (or the run inside the export) would overwrite the run's own
    // files (tokenizer.json, config files) or leave foreign ones in it.
    let overlap = match args.format.as_str() {
        "gguf" => {
            let dir = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            crate::files::is_within(dir, &args.run)
        }
        _ => crate::files::is_within(&args.out, &args.run) || crate::files::is_within(&args.run, &args.out),
    };
    if overlap {
        bail!(
            "--out {} and --run {} overlap: export to a path outside the run directory",
            args.out.display(),
            args.run.display()
        );
    }
    if args.format == "gguf" {
        return run_gguf(args);
    }
    let (dtype, torch_dtype) = parse_dtype(&args.dtype)?;
    if args.out.exists() {
        let non_empty = fs::read_dir(&args.out)
            .with_context(|| format!("--out {} exists but is not a readable directory", args.out.display()))?
            .next()
            .is_some();
        if non_empty && !args.force {
            bail!(
                "--out {} is not empty: pass --force to write into it, or choose another directory",
                args.out.display()
            );
        }
    }
    let loaded = RunDir::open(&args.run)?.load(args.checkpoint, &Device::Cpu)?;
    fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let m = &loaded.cfg.model;
    let (bos, eos) = (loaded.meta.as_ref().and_then(|x| x.bos_id), loaded.meta.as_ref().and_then(|x| x.eos_id));
    let size = write_safetensors(&loaded.model, &args.out.join("model.safetensors"), dtype)?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        fs::write(args.out.join(name), serde_json::to_string_pretty(v)? + "\n")
            .with_context(|| format!("cannot write {}", args.out.join(name).display()))
    };
    write_json("config.json", &hf_config(m, torch_dtype, bos, eos))?;
    write_json(
        "generation_config.json",
        &json!({"bos_token_id": bos, "eos_token_id": eos, "do_sample": true, "temperature": 0.8, "top_k": 50}),
    )?;
    fs::copy(args.run.join("tokenizer.json"), args.out.join("tokenizer.json"))
        .with_context(|| format!("cannot copy {}", args.run.join("tokenizer.json").display()))?;
    println!(
        "exported step {} of {} ({:?} stack, merged) to {} as {}: model.safetensors {:.2} MB, config.json, generation_config.json, tokenizer.json",
        loaded.step,
        args.run.display(),
        loaded.cfg.lors.mode,
        args.out.display(),
        args.dtype,
        size as f64 / 1e6
    );
    Ok(())
}

/// `--format gguf`: one file, written through a temporary file (nothing is left on an error).
fn run_gguf(args: &ExportArgs) -> Result<()> {
    let dtype = GgufDtype::parse(&args.dtype)?;
    if args.out.is_dir() {
        bail!("--out {} is a directory: a GGUF export is one file, e.g. --out model.gguf", args.out.display());
    }
    if args.out.exists() && !args.force {
        bail!("--out {} exists: pass --force to replace it, or choose another file", args.out.display());
    }
    let loaded: LoadedRun = RunDir::open(&args.run)?.load(args.checkpoint, &Device::Cpu)?;
    let name = args.run.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    // BOS/EOS from the prepared data's meta.json; a run without one (e.g. compressed from a
    // GGUF or HF model) gets them from the usual spellings, else llama.cpp would assume its
    // gpt2 default (id 11) and stop generating at that token.
    let (bos, eos) = match &loaded.meta {
        Some(m) => (m.bos_id, m.eos_id),
        None => crate::data::find_bos_eos(&loaded.tokenizer),
    };
    let info = GgufInfo { name: &name.unwrap_or_else(|| "lors-lm".into()), tokenizer: &loaded.tokenizer, bos, eos };
    let (size, fell_back) = write_gguf(&loaded.model, &info, dtype, &args.out)
        .with_context(|| format!("cannot export {} as GGUF", args.run.display()))?;
    if !fell_back.is_empty() {
        eprintln!(
            "note: {} tensor(s) have rows that are not a multiple of 32 values and were written as f16: {}",
            fell_back.len(),
            fell_back.join(", ")
        );
    }
    println!(
        "exported step {} of {} ({:?} stack, merged) to {} as GGUF {}: {:.2} MB (llama architecture, tokenizer embedded; run it with llama.cpp, e.g. llama-cli -m {})",
        loaded.step,
        args.run.display(),
        loaded.cfg.lors.mode,
        args.out.display(),
        args.dtype,
        size as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}
