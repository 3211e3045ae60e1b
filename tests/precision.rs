//! Mixed precision and MFU, checked on the CPU (the CUDA run is scripts/gpu_check.sh):
//! bf16 matmuls keep f32 weights and gradients and stay within tolerance of f32; the FLOP
//! count is the PaLM formula; MFU is logged exactly as tokens/s × FLOPs/token / peak;
//! `check-device` passes for f32 and bf16 on the CPU.

mod common;

use common::{bin, repo};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lors_lm::cmd::check_device as devcheck;
use lors_lm::config::Config;
use lors_lm::model::Model;
use lors_lm::model::ParamCounts;
use lors_lm::model::ParamStore;
use std::path::Path;

fn tiny(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let mut c = Config::load(&repo("configs/tiny.toml"), &sets).unwrap();
    c.model.vocab_size = 50;
    c
}

#[test]
fn bf16_matmuls_keep_f32_weights_and_gradients() -> Result<()> {
    let c = tiny(&[]);
    let mut store = ParamStore::new_init(1, DType::F32, &Device::Cpu);
    let model = Model::new(&c.model, &c.lors, &mut store)?.with_matmul_dtype(DType::BF16);
    let x = Tensor::new(&[[1u32, 7, 3, 9, 4, 4, 2, 8]], &Device::Cpu)?;
    let y = Tensor::new(&[[7u32, 3, 9, 4, 4, 2, 8, 1]], &Device::Cpu)?;
    let logits = model.forward(&x)?;
    assert_eq!(logits.dtype(), DType::F32, "logits and the loss are f32");
    let grads = Model::loss(&logits, &y)?.backward()?;
    for (name, var) in store.vars() {
        assert_eq!(var.dtype(), DType::F32, "{name}: master weights stay f32");
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient through the bf16 casts"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        if !name.ends_with("lors_a") {
            // A's gradient is exactly zero at init (B = 0), the rest must flow.
            let n = g.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(n > 0.0, "{name}: zero gradient");
        }
    }
    Ok(())
}

#[test]
fn check_device_on_cpu_f32_is_exact_and_bf16_is_close_but_rounded() -> Result<()> {
    let f32 = devcheck::check(&tiny(&[]), &Device::Cpu, "cpu")?;
    assert!(f32.ok);
    assert_eq!(f32.logits_rel_err, 0.0, "same device, same dtype: bit-identical");
    assert_eq!(f32.loss_after_step_cpu, f32.loss_after_step_device);
    assert!(f32.loss_after_step_cpu < f32.loss_cpu, "one step lowers the loss on its batch");

    let bf16 = devcheck::check(&tiny(&["train.dtype=\"bf16\""]), &Device::Cpu, "cpu")?;
    assert!(bf16.ok, "{bf16:?}");
    assert!(bf16.logits_rel_err > 0.0, "bf16 must actually round the matmul inputs: {bf16:?}");
    assert!(bf16.logits_rel_err < 3e-2, "{bf16:?}");
    assert!((bf16.loss_device - bf16.loss_cpu).abs() / bf16.loss_cpu < 1e-2, "{bf16:?}");
    Ok(())
}

#[test]
fn flops_per_token_is_the_palm_formula() {
    // d 32, L 3, 4 heads / 2 kv heads (hd 8: k,v are 16×32), ffn 64, T = seq_len 16.
    let c = tiny(&[]);
    let per_layer = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32 + 2 * 32;
    let n = 3 * per_layer + 32;
    let want = 6.0 * n as f64 + 12.0 * (3 * 32 * 16) as f64;
    assert_eq!(ParamCounts::flops_per_token(&c.model, c.train.seq_len), want);
    // Sharing does not change the compute: merged weights count once per layer.
    for mode in ["vanilla", "shared"] {
        let other = tiny(&[&format!("lors.mode=\"{mode}\"")]);
        assert_eq!(ParamCounts::flops_per_token(&other.model, other.train.seq_len), want, "{mode}");
    }
}

#[test]
fn peak_table_knows_hopper_and_ampere() {
    use lors_lm::device::peak_tflops_of;
    assert_eq!(peak_tflops_of("NVIDIA H100 80GB HBM3", "bf16"), Some(989.0));
    assert_eq!(peak_tflops_of("NVIDIA H200", "bf16"), Some(989.0));
    assert_eq!(peak_tflops_of("NVIDIA H200", "tf32"), Some(494.5));
    assert_eq!(peak_tflops_of("NVIDIA A100-SXM4-40GB", "bf16"), Some(312.0));
    assert_eq!(peak_tflops_of("Tesla T4", "bf16"), None);
}

/// A learnable synthetic corpus (vocab 50).
fn data(dir: &Path) {
    let seq: Vec<u32> = (0..3000u32).map(|i| (i * 7 + 3) % 50).collect();
    lors_lm::data::write_prepared_dir(dir, &seq[..2500], &seq[2500..], 50, None).unwrap();
}

#[test]
fn mfu_is_logged_from_tokens_per_second_and_the_peak() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, run) = (tmp.path().join("data"), tmp.path().join("run"));
    data(&d);
    let out = bin()
        .args(["train", "--config"])
        .arg(repo("configs/tiny.toml"))
        .arg("--data")
        .arg(&d)
        .arg("--out")
        .arg(&run)
        .args(["--set", "train.max_steps=6", "--set", "train.peak_tflops=0.001", "--set", "train.dtype=\"bf16\""])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("mfu       ") && stdout.contains("| mfu "), "{stdout}");
    assert!(stdout.contains("bf16"), "{stdout}");
    let mut c = tiny(&[]);
    c.train.seq_len = 16;
    let fpt = ParamCounts::flops_per_token(&c.model, c.train.seq_len);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("ms").is_some())
        .collect();
    assert_eq!(lines.len(), 6);
    for v in lines {
        let (mfu, tps) = (v["mfu"].as_f64().unwrap(), v["tokens_per_sec"].as_f64().unwrap());
        let want = fpt * tps / 1e9; // peak 0.001 TFLOP/s
        assert!((mfu - want).abs() <= 1e-9 * want, "{mfu} vs {want}");
    }
}

#[test]
fn check_device_command_reports_ok_on_the_cpu() {
    let out = bin()
        .args(["check-device", "--device", "cpu", "--json", "--set", "train.dtype=\"bf16\"", "--config"])
        .arg(repo("configs/tiny.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["dtype"], "bf16");
}
