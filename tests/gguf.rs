//! GGUF both ways on files the tests make: `export --format gguf` read back with `--gguf`
//! (f32: the run's logits, greedy text and loss; f16/q8_0 within tolerance), the tokenizer
//! rebuilt from the metadata, the metadata types llama.cpp checks, `compress --from FILE.gguf`
//! at full rank (lors and lowrank) and with layers dropped, `train --init-from/--teacher FILE.gguf`,
//! the SmolLM2 compression pipeline on a small GGUF made here, and a battery of malformed files
//! (wrong magic, truncations, unsupported architecture, tensors or types, absurd sizes), each
//! refused with an error naming the file, never a panic, nothing written.
//! llama.cpp itself checks the files in scripts/check_llamacpp.sh.

mod common;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{bin, prepare_text, run_err, run_ok, train_tiny};
use lors_lm::formats::gguf::load_gguf;
use lors_lm::train::RunDir;
use serde_json::Value as Json;
use std::fs::File;
use std::path::{Path, PathBuf};

fn prepared(dir: &Path) -> PathBuf {
    let text = "Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; \
                whenever I find myself involuntarily pausing before coffin warehouses, in 1851, then I account it high time. ";
    prepare_text(dir, &text.repeat(30), 400)
}

/// Train a tiny model (100 steps, LORS factors non-zero) with extra `--set`s.
fn train(data: &Path, run: &Path, sets: &[&str]) {
    let mut c = train_tiny(data, run);
    c.args(["--set", "train.max_steps=100", "--set", "model.max_seq_len=64"]);
    for s in sets {
        c.args(["--set", s]);
    }
    run_ok(&mut c);
}

fn export(run: &Path, out: &Path, dtype: &str) {
    run_ok(bin().args(["export", "--format", "gguf", "--dtype", dtype, "--run"]).arg(run).arg("--out").arg(out));
}

const PROMPT_IDS: &str = "5,17,42,9,100,3,77,250";

/// `generate --json` with greedy decoding of `n` tokens after PROMPT_IDS, writing the prompt
/// logits: (generated ids, logits (T, V)).
fn greedy(src: &[&str], n: usize, logits: &Path) -> (Vec<u32>, Vec<Vec<f32>>) {
    let out = run_ok(
        bin()
            .args(["generate", "--json", "--temperature", "0", "--prompt-ids", PROMPT_IDS])
            .args(["--max-new-tokens", &n.to_string(), "--logits-out"])
            .arg(logits)
            .args(src),
    );
    let v: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"].as_array().unwrap().len(), 8);
    let ids = serde_json::from_value(v["ids"].clone()).unwrap();
    (ids, Tensor::read_npy(logits).unwrap().to_vec2().unwrap())
}

/// max |a - b| / max |b|.
fn rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn eval_loss(src: &[&str], data: &Path) -> f64 {
    let out = run_ok(bin().args(["eval", "--json", "--seq-len", "16", "--data"]).arg(data).args(src));
    serde_json::from_slice::<Json>(&out.stdout).unwrap()["loss"].as_f64().unwrap()
}

/// f32 export → `--gguf` gives the run's logits, greedy ids, loss and tokenization (tied and
/// untied heads); f16 and q8_0 stay close and greedy-decode the same 16 tokens.
#[test]
fn gguf_exports_read_back_as_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    for (name, sets) in [("lors", vec![]), ("untied", vec!["model.tie_embeddings=false", "lors.mode=vanilla"])] {
        let run = tmp.path().join(name);
        train(&data, &run, &sets);
        let run_s = run.to_str().unwrap();
        let (run_ids, run_logits) = greedy(&["--run", run_s], 32, &tmp.path().join("run.npy"));
        let run_loss = eval_loss(&["--run", run_s], &data);
        for (dtype, tol, n_same) in [("f32", 1e-5, 32), ("f16", 5e-3, 16), ("q8_0", 2e-2, 16)] {
            let file = tmp.path().join(format!("{name}-{dtype}.gguf"));
            export(&run, &file, dtype);
            let f = file.to_str().unwrap();
            let (ids, logits) = greedy(&["--gguf", f], 32, &tmp.path().join("gguf.npy"));
            let err = rel_err(&logits, &run_logits);
            assert!(err < tol, "{name} {dtype}: logits differ by {err} (relative), tolerance {tol}");
            assert_eq!(ids[..n_same], run_ids[..n_same], "{name} {dtype}: greedy ids differ");
            let loss = eval_loss(&["--gguf", f], &data);
            assert!(
                (loss - run_loss).abs() < 10.0 * tol as f64 * run_loss,
                "{name} {dtype}: loss {loss} vs {run_loss}"
            );
            if dtype == "f32" {
                let g = load_gguf(&file, &Device::Cpu).unwrap();
                let ours = RunDir::open(&run).unwrap().load(None, &Device::Cpu).unwrap();
                assert_eq!(g.cfg.model, ours.cfg.model, "{name}: the config comes back");
                for text in ["whenever I find myself 1851", "  two  spaces, ünïcödé — and 42 digits\n\nnew"] {
                    let enc = |t: &tokenizers::Tokenizer| t.encode(text, false).unwrap().get_ids().to_vec();
                    assert_eq!(enc(&g.tokenizer), enc(&ours.tokenizer), "{name}: tokenization of {text:?}");
                    let dec = g.tokenizer.decode(&enc(&g.tokenizer), false).unwrap();
                    assert_eq!(dec, text, "{name}: decoding");
                }
                assert_eq!((g.bos, g.eos.as_slice()), (Some(0), &[0u32][..]));
            }
        }
    }
}

fn read_content(path: &Path) -> (Content, File) {
    let mut f = File::open(path).unwrap();
    (Content::read(&mut f).unwrap(), f)
}

/// The metadata and tensors llama.cpp's llama architecture reads, with the value types its
/// loader insists on (u32 sizes, f32 RoPE base and epsilon, i32 token types).
#[test]
fn gguf_metadata_has_the_keys_and_types_llama_cpp_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    train(&data, &run, &["model.rope_theta=500000"]);
    let file = tmp.path().join("m.gguf");
    export(&run, &file, "q8_0");
    let (ct, _) = read_content(&file);
    let m = &ct.metadata;
    let u32_of = |k: &str| match m.get(k) {
        Some(Value::U32(x)) => *x,
        other => panic!("{k}: {other:?} is not a u32"),
    };
    assert!(matches!(&m["general.architecture"], Value::String(s) if s == "llama"));
    assert!(matches!(&m["tokenizer.ggml.model"], Value::String(s) if s == "gpt2"));
    assert!(matches!(&m["tokenizer.ggml.pre"], Value::String(s) if s == "gpt-2"));
    for (k, want) in [
        ("llama.context_length", 64),
        ("llama.embedding_length", 32),
        ("llama.block_count", 3),
        ("llama.feed_forward_length", 64),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.rope.dimension_count", 8),
        ("general.file_type", 7),
        ("tokenizer.ggml.bos_token_id", 0),
        ("tokenizer.ggml.eos_token_id", 0),
    ] {
        assert_eq!(u32_of(k), want, "{k}");
    }
    let vocab = u32_of("llama.vocab_size") as usize;
    assert!(matches!(m["llama.rope.freq_base"], Value::F32(x) if x == 500000.0));
    assert!(matches!(m["llama.attention.layer_norm_rms_epsilon"], Value::F32(x) if x == 1e-5));
    assert!(matches!(m["tokenizer.ggml.add_bos_token"], Value::Bool(false)));
    let tokens = m["tokenizer.ggml.tokens"].to_vec().unwrap();
    let types = m["tokenizer.ggml.token_type"].to_vec().unwrap();
    assert_eq!((tokens.len(), types.len()), (vocab, vocab));
    assert!(matches!(&tokens[0], Value::String(s) if s == "<|endoftext|>"));
    assert!(matches!(types[0], Value::I32(3)) && matches!(types[1], Value::I32(1)));
    assert!(m["tokenizer.ggml.merges"].to_vec().unwrap().len() > 10);
    let t = &ct.tensor_infos;
    assert_eq!(t.len(), 2 + 3 * 9, "tied: no output.weight");
    assert_eq!(t["token_embd.weight"].shape.dims(), [vocab, 32]);
    assert_eq!(t["blk.2.attn_k.weight"].shape.dims(), [16, 32]);
    assert_eq!(format!("{:?}", t["blk.0.ffn_down.weight"].ggml_dtype), "Q8_0");
    assert_eq!(format!("{:?}", t["output_norm.weight"].ggml_dtype), "F32");

    // A file that asks for BOS (tokenizer.ggml.add_bos_token = true) gets it before the
    // prompt, as in llama.cpp; ours does not.
    let prompt_ids = |f: &Path| -> Vec<u64> {
        let out = run_ok(
            bin().args(["generate", "--json", "--max-new-tokens", "1", "--prompt", "whenever", "--gguf"]).arg(f),
        );
        let v: Json = serde_json::from_slice(&out.stdout).unwrap();
        v["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    };
    let bos_file = tmp.path().join("bos.gguf");
    rewrite(&file, &bos_file, |m, _| set_meta(m, "tokenizer.ggml.add_bos_token", Value::Bool(true)));
    let (plain, with_bos) = (prompt_ids(&file), prompt_ids(&bos_file));
    assert_ne!(plain[0], 0);
    assert_eq!(with_bos[0], 0);
    assert_eq!(with_bos[1..], plain[..]);
}

/// `compress --from FILE.gguf --energy 1` reproduces the file's model (lors and lowrank);
/// `--keep-layers` from a GGUF exports back to GGUF; `train --init-from` and `--teacher`
/// take a GGUF file.
#[test]
fn gguf_as_a_source_for_compress_and_train() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    train(&data, &run, &["lors.mode=vanilla"]);
    let file = tmp.path().join("m.gguf");
    export(&run, &file, "f32");
    let out = tmp.path().join("compressed");
    run_ok(bin().args(["compress", "--energy", "1", "--rank", "4", "--from"]).arg(&file).arg("--out").arg(&out));
    let (_, gguf_logits) = greedy(&["--gguf", file.to_str().unwrap()], 4, &tmp.path().join("a.npy"));
    let (_, lors_logits) = greedy(&["--run", out.to_str().unwrap()], 4, &tmp.path().join("b.npy"));
    let err = rel_err(&lors_logits, &gguf_logits);
    assert!(err < 1e-4, "compressed at full rank: logits differ by {err}");
    let report: Json = serde_json::from_str(&std::fs::read_to_string(out.join("compress.json")).unwrap()).unwrap();
    assert!(report["source"].as_str().unwrap().ends_with("m.gguf (GGUF)"), "{}", report["source"]);
    // That run has no prepared-data meta.json: its GGUF export still names <|endoftext|> (0)
    // as BOS/EOS, rather than leaving llama.cpp to assume id 11.
    let again = tmp.path().join("again.gguf");
    export(&out, &again, "f32");
    let (ct, _) = read_content(&again);
    assert!(matches!(ct.metadata["tokenizer.ggml.eos_token_id"], Value::U32(0)));
    assert!(matches!(ct.metadata["tokenizer.ggml.bos_token_id"], Value::U32(0)));

    // The compression baselines take a GGUF source too: per-layer SVD (lowrank) at full rank
    // is the file's model; layer dropping keeps 2 of 3 blocks, and that run exports to a GGUF
    // that llama.cpp would read as 2 blocks and lors-lm reads back with the run's logits.
    let lowrank = tmp.path().join("lowrank");
    run_ok(
        bin().args(["compress", "--mode", "lowrank", "--energy", "1", "--from"]).arg(&file).arg("--out").arg(&lowrank),
    );
    let (_, lowrank_logits) = greedy(&["--run", lowrank.to_str().unwrap()], 4, &tmp.path().join("c.npy"));
    let err = rel_err(&lowrank_logits, &gguf_logits);
    assert!(err < 1e-4, "lowrank at full rank: logits differ by {err}");
    let kept = tmp.path().join("kept");
    run_ok(bin().args(["compress", "--keep-layers", "0,last", "--from"]).arg(&file).arg("--out").arg(&kept));
    let kept_file = tmp.path().join("kept.gguf");
    export(&kept, &kept_file, "f32");
    assert!(matches!(read_content(&kept_file).0.metadata["llama.block_count"], Value::U32(2)));
    let (kept_ids, kept_logits) = greedy(&["--run", kept.to_str().unwrap()], 4, &tmp.path().join("d.npy"));
    let (file_ids, file_logits) = greedy(&["--gguf", kept_file.to_str().unwrap()], 4, &tmp.path().join("e.npy"));
    assert_eq!(kept_ids, file_ids);
    let err = rel_err(&file_logits, &kept_logits);
    assert!(err < 1e-5, "2-block run vs its GGUF export: logits differ by {err}");
    let dropped = rel_err(&kept_logits, &gguf_logits);
    assert!(dropped > 1e-3, "dropping a block left the logits unchanged ({dropped})");

    let init = tmp.path().join("init");
    run_ok(
        bin()
            .args(["train", "--quiet", "--set", "train.max_steps=2", "--set", "train.warmup_steps=1", "--data"])
            .arg(&data)
            .arg("--init-from")
            .arg(&file)
            .arg("--out")
            .arg(&init),
    );
    let student = tmp.path().join("student");
    let mut c = train_tiny(&data, &student);
    c.args([
        "--set",
        "train.max_steps=2",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.distill_alpha=0.5",
        "--teacher",
    ])
    .arg(&file);
    run_ok(&mut c);
    assert!(RunDir::open(&student).unwrap().load(None, &Device::Cpu).is_ok());
}

/// The SmolLM2 pipeline (scripts/smollm2_experiment.py) on a small GGUF Llama made here (4
/// layers, grouped-query attention, tied embeddings): data prepared with the file's own
/// tokenizer; compression at full rank gives the file's logits; `--budget 0.5` fits its budget;
/// the student uptrained with the file as teacher exports to a GGUF that reads back with the
/// run's logits and greedy text.
#[test]
fn a_small_gguf_llama_through_the_compression_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    train(
        &data,
        &run,
        &[
            "lors.mode=vanilla",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.tie_embeddings=true",
        ],
    );
    let file = tmp.path().join("llama.gguf");
    export(&run, &file, "f32");

    // Data tokenized by the GGUF's tokenizer: the same ids as the run's own tokenizer.
    let text_dir = tmp.path().join("text");
    std::fs::create_dir_all(&text_dir).unwrap();
    let text = "Whenever I find myself growing grim about the mouth, in 1851, I account it high time. ";
    std::fs::write(text_dir.join("a.txt"), text.repeat(40)).unwrap();
    let by_gguf = tmp.path().join("by-gguf");
    run_ok(bin().args(["prepare", "--tokenizer"]).arg(&file).arg("--input").arg(&text_dir).arg("--out").arg(&by_gguf));
    let by_json = tmp.path().join("by-json");
    run_ok(
        bin()
            .args(["prepare", "--tokenizer"])
            .arg(data.join("tokenizer.json"))
            .arg("--input")
            .arg(&text_dir)
            .arg("--out")
            .arg(&by_json),
    );
    for split in ["train-00000.bin", "val-00000.bin"] {
        let (a, b) = (std::fs::read(by_gguf.join(split)).unwrap(), std::fs::read(by_json.join(split)).unwrap());
        assert!(!a.is_empty() && a == b, "{split}: the GGUF's tokenizer encodes differently");
    }
    let meta: Json = serde_json::from_str(&std::fs::read_to_string(by_gguf.join("meta.json")).unwrap()).unwrap();
    assert!(meta["tokenizer_source"].as_str().unwrap().starts_with("gguf:"), "{}", meta["tokenizer_source"]);
    let teacher_loss = eval_loss(&["--gguf", file.to_str().unwrap()], &by_gguf);

    // Full rank: the file's logits, through grouped-query attention and four layers.
    let (_, gguf_logits) = greedy(&["--gguf", file.to_str().unwrap()], 4, &tmp.path().join("g.npy"));
    let full = tmp.path().join("full");
    run_ok(bin().args(["compress", "--energy", "1", "--group-size", "2", "--from"]).arg(&file).arg("--out").arg(&full));
    let (_, full_logits) = greedy(&["--run", full.to_str().unwrap()], 4, &tmp.path().join("f.npy"));
    let err = rel_err(&full_logits, &gguf_logits);
    assert!(err < 1e-4, "compressed at full rank: logits differ by {err}");

    // Half the block parameters, plain and activation-aware (calibrated on the train split),
    // then uptrained with the file as teacher.
    let compress_half = |out: &Path, calibrate: bool| -> Json {
        let mut c = bin();
        c.args(["compress", "--budget", "0.5", "--json", "--data"]).arg(&by_gguf).arg("--from").arg(&file);
        if calibrate {
            c.arg("--calibrate").arg(&by_gguf);
        }
        serde_json::from_slice(&run_ok(c.arg("--out").arg(out)).stdout).unwrap()
    };
    let plain = compress_half(&tmp.path().join("plain"), false);
    let half = tmp.path().join("half");
    let rep = compress_half(&half, true);
    let (aware_loss, plain_loss) =
        (rep["val"]["compressed_loss"].as_f64().unwrap(), plain["val"]["compressed_loss"].as_f64().unwrap());
    assert!(aware_loss < plain_loss, "activation-aware {aware_loss} vs plain {plain_loss}");
    assert!(rep["calibration"]["tokens"].as_u64().unwrap() > 0, "{}", rep["calibration"]);
    // Calibration data in another tokenizer is refused, nothing written.
    std::fs::create_dir_all(tmp.path().join("other")).unwrap();
    let other = prepare_text(&tmp.path().join("other"), &text.repeat(20), 300);
    let refused = tmp.path().join("refused");
    let err = run_err(
        bin()
            .args(["compress", "--budget", "0.5", "--calibrate"])
            .arg(&other)
            .arg("--from")
            .arg(&file)
            .arg("--out")
            .arg(&refused),
    );
    assert!(err.contains("--calibrate") && err.contains("vocabulary"), "{err}");
    assert!(!refused.exists());
    let frac = rep["params"]["block_fraction"].as_f64().unwrap();
    assert!(frac <= 0.5 && frac > 0.4, "--budget 0.5 gave {frac} of the block parameters");
    let energy = rep["energy"].as_f64().unwrap();
    assert!(energy > 0.0 && energy < 1.0, "{energy}");
    let source_loss = rep["val"]["source_loss"].as_f64().unwrap();
    assert!((source_loss - teacher_loss).abs() < 0.05, "{source_loss} vs eval --gguf {teacher_loss}");
    let student = tmp.path().join("student");
    run_ok(
        bin()
            .args(["train", "--quiet", "--set", "train.max_steps=4", "--set", "train.warmup_steps=1"])
            .args(["--set", "train.distill_alpha=0.5", "--set", "train.lr=1e-3", "--data"])
            .arg(&by_gguf)
            .arg("--init-from")
            .arg(&half)
            .arg("--teacher")
            .arg(&file)
            .arg("--out")
            .arg(&student),
    );
    let student_file = tmp.path().join("student.gguf");
    export(&student, &student_file, "f32");
    let src = ["--run", student.to_str().unwrap()];
    let (run_ids, run_logits) = greedy(&src, 8, &tmp.path().join("s.npy"));
    let (file_ids, file_logits) = greedy(&["--gguf", student_file.to_str().unwrap()], 8, &tmp.path().join("t.npy"));
    assert_eq!(run_ids, file_ids);
    let err = rel_err(&file_logits, &run_logits);
    assert!(err < 1e-5, "the student's GGUF export: logits differ by {err}");
    let (_, factored_logits) = greedy(&[&src[..], &["--weights", "factored"]].concat(), 8, &tmp.path().join("u.npy"));
    let err = rel_err(&factored_logits, &run_logits);
    assert!(err < 1e-4, "factored weights: logits differ by {err}");
    assert!(rel_err(&run_logits, &gguf_logits) > 1e-3, "the student is not the teacher");
}

/// Rewrite a GGUF file through candle's reader and writer, editing metadata and tensors.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>)) {
    let (ct, mut f) = read_content(src);
    let mut meta: Vec<(String, Value)> = ct.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> =
        names.into_iter().map(|n| (n.clone(), ct.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    edit(&mut meta, &mut tensors);
    let mut out = File::create(dst).unwrap();
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &m, &t).unwrap();
}

fn set_meta(meta: &mut Vec<(String, Value)>, key: &str, v: Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.into(), v));
}

/// The byte offset of the tensor info of `name` (just after its name) in a GGUF file.
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let pos = bytes.windows(needle.len()).rposition(|w| w == needle.as_slice()).expect("tensor info");
    pos + needle.len()
}

/// Every malformed file is refused by `generate --gguf`, `eval --gguf` and `compress --from`
/// with an error naming the file and the problem, no panic, and compress writes nothing.
#[test]
fn malformed_gguf_files_are_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    train(&data, &run, &["train.max_steps=5"]);
    let good = tmp.path().join("good.gguf");
    export(&run, &good, "f32");
    let bytes = std::fs::read(&good).unwrap();
    let t = |name: &str| tmp.path().join(name);
    let mut cases: Vec<(PathBuf, &str)> = vec![];

    std::fs::write(t("magic.gguf"), b"GGML\x03\x00\x00\x00 not a gguf file at all").unwrap();
    cases.push((t("magic.gguf"), "not a GGUF file"));
    std::fs::write(t("empty.gguf"), b"").unwrap();
    cases.push((t("empty.gguf"), "not a GGUF file"));
    // Cuts in the header, the metadata, the tensor infos, at the start of the tensor data and in it.
    let in_infos = tensor_info_at(&bytes, "output_norm.weight");
    let data_start = read_content(&good).0.tensor_data_offset as usize;
    let cuts = [6, 20, 200, bytes.len() / 3, in_infos, data_start, bytes.len() - 1000, bytes.len() - 1];
    for (i, cut) in cuts.into_iter().enumerate() {
        let p = t(&format!("cut{i}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        cases.push((p, "truncated"));
    }
    let mut meta_edit = |name: &str, key: &str, v: Value, want: &'static str| {
        rewrite(&good, &t(name), |m, _| set_meta(m, key, v));
        cases.push((t(name), want));
    };
    meta_edit("qwen.gguf", "general.architecture", Value::String("qwen2".into()), "general.architecture = \"qwen2\"");
    meta_edit("moe.gguf", "llama.expert_count", Value::U32(8), "mixture-of-experts");
    meta_edit("rope.gguf", "llama.rope.scaling.type", Value::String("yarn".into()), "scaled RoPE");
    meta_edit("tok.gguf", "tokenizer.ggml.model", Value::String("llama".into()), "tokenizer.ggml.model = \"llama\"");
    meta_edit("pre.gguf", "tokenizer.ggml.pre", Value::String("qwen2".into()), "tokenizer.ggml.pre = \"qwen2\"");
    meta_edit("align.gguf", "general.alignment", Value::U32(0), "general.alignment is 0");
    meta_edit("heads.gguf", "llama.attention.head_count", Value::U32(3), "unsupported model metadata");
    meta_edit("ctx.gguf", "llama.context_length", Value::U64(1 << 40), "context_length");
    // A block count far beyond the tensors the file holds: refused before anything loops or
    // allocates per layer (2^63 used to spin in validation, 10^10 to allocate until killed).
    meta_edit("blocks63.gguf", "llama.block_count", Value::U64(1 << 63), "llama.block_count = 9223372036854775808");
    meta_edit("blocks10.gguf", "llama.block_count", Value::U64(10_000_000_000), "room for at most");
    // Layer numbers only in their canonical form (blk.00 or blk.+0 would collide with blk.0),
    // and no tensor named twice.
    let rename = |ts: &mut Vec<(String, QTensor)>, from: &str, to: &str| {
        ts.iter_mut().filter(|(n, _)| n == from).for_each(|(n, _)| *n = to.to_string());
    };
    rewrite(&good, &t("blk00.gguf"), |_, ts| rename(ts, "blk.0.attn_q.weight", "blk.00.attn_q.weight"));
    cases.push((t("blk00.gguf"), "tensor blk.00.attn_q.weight is not part of a plain"));
    rewrite(&good, &t("blkplus.gguf"), |_, ts| rename(ts, "blk.1.ffn_up.weight", "blk.+1.ffn_up.weight"));
    cases.push((t("blkplus.gguf"), "tensor blk.+1.ffn_up.weight is not part of a plain"));
    rewrite(&good, &t("twice.gguf"), |_, ts| {
        let (name, q) = ts.iter().find(|(n, _)| n == "blk.0.attn_k.weight").unwrap();
        let again =
            QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap().affine(2.0, 0.0).unwrap(), GgmlDType::F32).unwrap();
        ts.push((name.clone(), again));
    });
    cases.push((t("twice.gguf"), "a tensor name is repeated"));
    rewrite(&good, &t("bias.gguf"), |_, ts| {
        let bias = Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap();
        ts.push(("blk.0.attn_q.bias".into(), QTensor::quantize(&bias, GgmlDType::F32).unwrap()));
    });
    cases.push((t("bias.gguf"), "tensor blk.0.attn_q.bias is not part of a plain"));
    rewrite(&good, &t("missing.gguf"), |_, ts| ts.retain(|(n, _)| n != "blk.1.ffn_up.weight"));
    cases.push((t("missing.gguf"), "tensor blk.1.ffn_up.weight is missing"));

    // Byte patches of a tensor info: [n_dims u32][dims u64 ..., columns first][type u32][offset u64].
    let patched = |base: &[u8], name: &str, tensor: &str, at: usize, value: &[u8]| {
        let mut b = base.to_vec();
        let pos = tensor_info_at(&b, tensor) + at;
        b[pos..pos + value.len()].copy_from_slice(value);
        std::fs::write(t(name), b).unwrap();
        t(name)
    };
    let (q, ty) = ("blk.0.attn_q.weight", 4 + 16);
    // Type 16 (IQ2_XXS) is unknown to candle; 9 (Q8_1) it cannot dequantize.
    cases.push((patched(&bytes, "iq2.gguf", q, ty, &16u32.to_le_bytes()), "unknown dtype for tensor 16"));
    cases.push((patched(&bytes, "q81.gguf", q, ty, &9u32.to_le_bytes()), "stored as Q8_1"));
    // Absurd sizes: a layer tensor's rows; the embedding's rows (the vocabulary) against
    // llama.vocab_size, and without that key against the file size; a data offset past the end.
    let huge = (1u64 << 40).to_le_bytes();
    cases.push((patched(&bytes, "rows.gguf", "blk.0.ffn_up.weight", 4 + 8, &huge), "has shape"));
    cases.push((patched(&bytes, "vocab.gguf", "token_embd.weight", 4 + 8, &huge), "llama.vocab_size = "));
    rewrite(&good, &t("novocab.gguf"), |m, _| m.retain(|(k, _)| k != "llama.vocab_size"));
    let novocab = std::fs::read(t("novocab.gguf")).unwrap();
    cases.push((
        patched(&novocab, "embd.gguf", "token_embd.weight", 4 + 8, &huge),
        "vocab_size = 1099511627776 exceeds",
    ));
    let rows = (1u64 << 22).to_le_bytes(); // within the bounds on a config, past the file's end
    cases.push((patched(&novocab, "embd22.gguf", "token_embd.weight", 4 + 8, &rows), "runs past the end"));
    cases.push((patched(&bytes, "offset.gguf", "blk.2.ffn_down.weight", 4 + 16 + 4, &huge), "runs past the end"));
    let mut header = bytes.clone();
    header[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes()); // metadata count
    std::fs::write(t("kvcount.gguf"), header).unwrap();
    cases.push((t("kvcount.gguf"), "metadata"));

    for (path, want) in &cases {
        let p = path.to_str().unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        let out = t(&format!("out-{name}"));
        for cmd in [
            vec!["generate", "--max-new-tokens", "2", "--prompt", "x", "--gguf", p],
            vec!["eval", "--data", data.to_str().unwrap(), "--gguf", p],
            vec!["compress", "--from", p, "--out", out.to_str().unwrap()],
        ] {
            let err = run_err(bin().args(&cmd));
            assert!(err.contains(p), "{cmd:?}: the error does not name the file: {err}");
            assert!(err.contains(want), "{cmd:?}: expected {want:?} in: {err}");
        }
        assert!(!out.exists(), "{name}: compress wrote {}", out.display());
    }
}

/// Export refusals: an existing file without --force, a directory, dtypes of the other format.
#[test]
fn gguf_export_refuses_bad_requests_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepared(tmp.path());
    let run = tmp.path().join("run");
    train(&data, &run, &["train.max_steps=5"]);
    let file = tmp.path().join("m.gguf");
    std::fs::write(&file, "user file").unwrap();
    let export = |extra: &[&str], out: &Path| {
        let mut c = bin();
        c.args(["export", "--format", "gguf", "--run"]).arg(&run).arg("--out").arg(out).args(extra);
        c
    };
    assert!(run_err(&mut export(&[], &file)).contains("--force"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "user file");
    assert!(run_err(&mut export(&[], tmp.path())).contains("is a directory"));
    let other = tmp.path().join("other.gguf");
    assert!(run_err(&mut export(&["--dtype", "bf16"], &other)).contains("f32, f16 or q8_0"));
    assert!(!other.exists());
    let hf = tmp.path().join("hf");
    let e = run_err(bin().args(["export", "--dtype", "q8_0", "--run"]).arg(&run).arg("--out").arg(&hf));
    assert!(e.contains("--format gguf"), "{e}");
    run_ok(&mut export(&["--force"], &file));
    assert!(load_gguf(&file, &Device::Cpu).is_ok());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    // A file that is not GGUF, given to --from without the .gguf extension.
    let e = run_err(
        bin().args(["compress", "--from"]).arg(tmp.path().join("corpus.txt")).arg("--out").arg(tmp.path().join("c")),
    );
    assert!(e.contains("not a GGUF file"), "{e}");
}
