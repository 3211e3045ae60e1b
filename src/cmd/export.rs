//! `lors-lm export`: a trained run as a plain Hugging Face Llama directory.

use crate::formats::hf::{hf_config, write_safetensors};
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};
use std::fs;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Run directory written by `lors-lm train`.
    #[arg(long, value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// Checkpoint step to export [default: the latest].
    #[arg(long, value_name = "STEP")]
    pub checkpoint: Option<usize>,
    /// Output format (only hf-llama: a Hugging Face LlamaForCausalLM directory).
    #[arg(long, default_value = "hf-llama", value_parser = ["hf-llama"])]
    pub format: String,
    /// Output directory (refused if it exists and is not empty, unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Weight dtype in model.safetensors.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
    /// Write into a non-empty --out (files of the same name are replaced).
    #[arg(long)]
    pub force: bool,
}

fn parse_dtype(s: &str) -> Result<(DType, &'static str)> {
    Ok(match s {
        "f32" => (DType::F32, "float32"),
        "bf16" => (DType::BF16, "bfloat16"),
        "f16" => (DType::F16, "float16"),
        other => bail!("--dtype {other}: use f32, bf16 or f16"),
    })
}

pub fn run(args: &ExportArgs) -> Result<()> {
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
