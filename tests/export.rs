//! `lors-lm export` and `eval` checked against an independent reference
//! (tests/reference/llama_ref.py: numpy + safetensors only) for LORS, vanilla, shared and
//! untied-head models; the round trip export → `generate --hf`; and `generate --hf` on the
//! config.json shapes of newer checkpoints (transformers >= 5 `rope_parameters`, a list of
//! end-of-sequence ids).

mod common;

use common::{bin, prepare_text, repo, run_err, run_ok, train_tiny};

use candle_core::{Device, Tensor};
use lors_lm::formats::hf;
use lors_lm::infer::generate::{generate_tokens, Sampler};
use lors_lm::model::Model;
use lors_lm::train::RunDir;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn prepared(dir: &Path) -> PathBuf {
    let text = "Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; \
                whenever I find myself involuntarily pausing before coffin warehouses, then, I account it high time to get to sea. ";
    prepare_text(dir, &text.repeat(30), 400)
}

/// Train a tiny model of `mode` (30 steps, so the private factors are non-zero).
fn train(data: &Path, run: &Path, sets: &[&str]) {
    let mut c = train_tiny(data, run);
    c.args(["--set", "train.max_steps=30", "--set", "model.max_seq_len=64"]);
    for s in sets {
        c.args(["--set", s]);
    }
    run_ok(&mut c);
}

fn reference(python: &Path, args: &[&str]) -> Value {
    json(&run_ok(Command::new(python).arg(repo("tests/reference/llama_ref.py")).args(args)))
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn exports_match_the_independent_reference_for_every_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let python = &common::tb_python();
    let prompt: Vec<u32> = vec![5, 17, 42, 9];
    for (name, sets) in [
        ("lors", vec!["lors.mode=lors"]),
        ("vanilla", vec!["lors.mode=vanilla"]),
        ("shared", vec!["lors.mode=shared"]),
        ("lors-untied-groups", vec!["lors.mode=lors", "model.tie_embeddings=false", "lors.groups=2"]),
    ] {
        let run = tmp.path().join(name);
        train(&data, &run, &sets);
        let hf = tmp.path().join(format!("{name}-hf"));
        run_ok(bin().args(["export", "--run"]).arg(&run).arg("--out").arg(&hf));
        for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
            assert!(hf.join(f).is_file(), "{name}: {f} missing");
        }
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["tie_word_embeddings"], name != "lors-untied-groups");

        // lors-lm's own view: logits of the unmerged model and greedy ids of the merged one.
        let loaded = RunDir::open(&run).unwrap().load(None, &Device::Cpu).unwrap();
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let ours: Vec<Vec<f32>> = loaded.model.forward(&x).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let merged = loaded.model.merged().unwrap();
        let mut greedy = Sampler::new(0.0, None, None, 0).unwrap();
        let our_ids = generate_tokens(&merged, &prompt, 32, &mut greedy, &[], |_| Ok(()), || {}).unwrap();
        let our_eval = json(&run_ok(bin().args(["eval", "--json", "--run"]).arg(&run).arg("--data").arg(&data)));

        // Round trip: generate --hf on the export gives generate --run's greedy text.
        let gen = |src: &[&str]| -> String {
            let out = run_ok(
                bin()
                    .args(["generate", "--temperature", "0", "--max-new-tokens", "24", "--prompt", "whenever I"])
                    .args(src),
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let (from_run, from_hf) = (gen(&["--run", run.to_str().unwrap()]), gen(&["--hf", hf.to_str().unwrap()]));
        assert_eq!(from_run, from_hf, "{name}: generate --run and --hf differ");

        let hf_s = hf.to_str().unwrap();
        let theirs = reference(python, &["logits", hf_s, "--ids", &ids_arg(&prompt)]);
        let theirs: Vec<Vec<f64>> = serde_json::from_value(theirs["logits"].clone()).unwrap();
        let scale = theirs.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
        let diff =
            ours.iter().flatten().zip(theirs.iter().flatten()).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(diff / scale <= 1e-4, "{name}: logits differ by {diff} (scale {scale})");

        let seq_len = loaded.cfg.train.seq_len.to_string();
        // The validation split as one headerless u16 file, as the reference reads tokens.
        let val = tmp.path().join("val-tokens.bin");
        let meta = lors_lm::data::Meta::load(&data).unwrap();
        let split = lors_lm::data::TokenFile::open(&data, "val", &meta).unwrap();
        lors_lm::data::write_tokens(&val, &split.window(0, split.len()).unwrap(), "u16").unwrap();
        let ref_eval = reference(
            python,
            &["eval", hf_s, "--tokens", val.to_str().unwrap(), "--dtype", "u16", "--seq-len", &seq_len],
        );
        let (a, b) = (our_eval["loss"].as_f64().unwrap(), ref_eval["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{name}: eval loss {a} vs reference {b}");
        assert_eq!(our_eval["tokens"], ref_eval["tokens"]);
        assert_eq!(our_eval["windows"], ref_eval["windows"]);

        let ref_ids: Vec<u32> = serde_json::from_value(
            reference(python, &["greedy", hf_s, "--ids", &ids_arg(&prompt), "--n", "32"])["ids"].clone(),
        )
        .unwrap();
        assert_eq!(our_ids, ref_ids, "{name}: greedy continuations differ");
    }
}

#[test]
fn export_refuses_to_overwrite_and_bf16_exports_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    train(&data, &run, &[]);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "user file").unwrap();
    let o = bin().args(["export", "--run"]).arg(&run).arg("--out").arg(&out).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(!out.join("model.safetensors").exists(), "nothing may be written on refusal");
    run_ok(bin().args(["export", "--force", "--dtype", "bf16", "--run"]).arg(&run).arg("--out").arg(&out));
    assert!(out.join("keep.txt").is_file());
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    // The bf16 export is half the size of an f32 one and still evaluates close to the run.
    let f32_dir = tmp.path().join("f32");
    run_ok(bin().args(["export", "--run"]).arg(&run).arg("--out").arg(&f32_dir));
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len() as f64;
    assert!((size(&out) / size(&f32_dir) - 0.5).abs() < 0.05);
    run_ok(bin().args(["generate", "--max-new-tokens", "8", "--prompt", "whenever", "--hf"]).arg(&out));
    // eval: --text uses the run's tokenizer; too short a text is refused.
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "a few words").unwrap();
    let o = bin().args(["eval", "--run"]).arg(&run).arg("--text").arg(&short).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("fewer than one window"));
    let long = tmp.path().join("long.txt");
    std::fs::write(&long, "whenever I find myself growing grim about the mouth; ".repeat(20)).unwrap();
    let e = json(&run_ok(bin().args(["eval", "--json", "--run"]).arg(&run).arg("--text").arg(&long)));
    assert!(e["ppl"].as_f64().unwrap() > 1.0 && e["windows"].as_u64().unwrap() >= 1);
    // params --run reports the checkpoint vs merged export sizes.
    let p = json(&run_ok(bin().args(["params", "--json", "--run"]).arg(&run)));
    assert!(p["merged_export_bytes"].as_u64().unwrap() > p["checkpoint_bytes"].as_u64().unwrap());
}

/// transformers >= 5 writes RoPE as `rope_parameters` (no top-level `rope_theta`), and Llama 3
/// configs list several end-of-sequence ids (`[128001, 128008, 128009]`). `generate --hf`
/// must honour that `rope_theta`, stop at any listed id, and refuse a scaled RoPE by name.
#[test]
fn generate_hf_reads_rope_parameters_and_every_eos_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    // A RoPE base other than the default 10000, so that a loader ignoring rope_parameters shows;
    // 100 steps, so that greedy text is the corpus rather than one token repeated.
    train(&data, &run, &["model.rope_theta=500000", "train.max_steps=100"]);
    let hf = tmp.path().join("hf");
    run_ok(bin().args(["export", "--run"]).arg(&run).arg("--out").arg(&hf));
    let prompt = "whenever I";
    let generate = || {
        let mut c = bin();
        c.args(["generate", "--temperature", "0", "--max-new-tokens", "24", "--prompt", prompt, "--hf"]).arg(&hf);
        c
    };
    let text = |c: &mut Command| String::from_utf8(run_ok(c).stdout).unwrap();
    let before = text(&mut generate());

    // The greedy ids behind that text (stopping at the run's eos, 0, as the export says).
    let loaded = RunDir::open(&run).unwrap().load(None, &Device::Cpu).unwrap();
    let tok = &loaded.tokenizer;
    let prompt_ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    let mut greedy = Sampler::new(0.0, None, None, 0).unwrap();
    let merged = loaded.model.merged().unwrap();
    let ids = generate_tokens(&merged, &prompt_ids, 24, &mut greedy, &[0], |_| Ok(()), || {}).unwrap();
    let decoded = |ids: &[u32]| format!("{prompt}{}\n", tok.decode(ids, true).unwrap());
    assert_eq!(before, decoded(&ids));
    // An id generation reaches after a few tokens (first seen at position k >= 4), and one it
    // never reaches.
    let k = (4..ids.len()).find(|&k| !ids[..k].contains(&ids[k])).expect("a new token after position 4");
    let unreached = (1..).find(|i| !ids.contains(i)).unwrap();

    let config_path = hf.join("config.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(original["rope_theta"], 500000.0);
    assert_eq!(original["eos_token_id"], 0);
    let rewrite = |rope_parameters: Value, eos: Value| {
        let mut cfg = original.clone();
        let m = cfg.as_object_mut().unwrap();
        m.remove("rope_theta");
        m.remove("rope_scaling");
        m.insert("rope_parameters".into(), rope_parameters);
        m.insert("eos_token_id".into(), eos);
        std::fs::write(&config_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    };
    let default_rope = serde_json::json!({"rope_theta": 500000.0, "rope_type": "default"});

    // The transformers 5 layout with ids generation does not reach: the same text.
    rewrite(default_rope.clone(), serde_json::json!([0, unreached]));
    assert_eq!(text(&mut generate()), before, "rope_parameters.rope_theta must be honoured");
    // The loader behind --hf reads that RoPE base, so its logits are the run's.
    let (cfg, model, _, _) = hf::load_hf_dir(&hf, &Device::Cpu).unwrap();
    assert_eq!(cfg.model.rope_theta, 500000.0);
    let x = Tensor::new(prompt_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = |m: &Model| -> Vec<f32> { m.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let (ours, theirs) = (logits(&merged), logits(&model));
    let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4, "logits of the rewritten export differ from the run's by {diff}");

    // Generation stops at any listed id, not only the first.
    rewrite(default_rope, serde_json::json!([0, unreached, ids[k]]));
    let stopped = text(&mut generate());
    assert_eq!(stopped, decoded(&ids[..=k]), "generation must stop at eos id {} (token {k})", ids[k]);
    assert!(stopped.len() < before.len());

    // A scaled RoPE (Llama 3.1's) is refused, naming the key.
    let llama3 = serde_json::json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    rewrite(llama3, serde_json::json!([0]));
    let err = run_err(&mut generate());
    assert!(err.contains("rope_parameters.rope_type \"llama3\"") && err.contains("config.json"), "{err}");
}
