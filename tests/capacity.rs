//! What the capacity-limited experiment (issue 31) measures with: bits per byte on byte-level
//! data, training FLOPs and decode bytes per token in closed form, the warmup-stable-decay
//! schedule and its decay branches.

mod common;

use common::{bin, prepare_text, run_ok, train_tiny};
use std::path::Path;

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn eval_json(run: &Path, data: &Path) -> serde_json::Value {
    json(&run_ok(bin().args(["eval", "--json", "--run"]).arg(run).arg("--data").arg(data)))
}

/// Text of every byte value (invalid UTF-8 is not allowed in a .txt corpus, so the bytes of
/// a few scripts stand in), long enough for several windows.
fn corpus(eot_every: Option<usize>) -> String {
    let line = "Call me Ishmael. Café naïve, 東京, 🐳 — tabs\tand  spaces.\n";
    (0..200)
        .map(|i| match eot_every {
            Some(k) if i % k == k - 1 => format!("{line}<|endoftext|>"),
            _ => line.to_string(),
        })
        .collect()
}

#[test]
fn bits_per_byte_is_nats_over_ln2_per_byte_on_byte_level_data() {
    let tmp = tempfile::tempdir().unwrap();
    // Byte-level data (vocabulary 257: 256 bytes + <|endoftext|>), no end-of-text tokens.
    let data = prepare_text(tmp.path(), &corpus(None), 257);
    let run = tmp.path().join("run");
    run_ok(train_tiny(&data, &run).args(["--set", "train.max_steps=6"]));
    let e = eval_json(&run, &data);
    let (loss, tokens) = (e["loss"].as_f64().unwrap(), e["tokens"].as_u64().unwrap());
    let bpb = e["bpb"].as_f64().expect("bpb reported for byte-level data");
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-12, "bpb {bpb} vs loss {loss} / ln 2");
    assert_eq!(e["bytes"].as_u64(), Some(tokens), "every predicted token is one byte");

    // With end-of-text tokens: their loss counts, but they are no bytes of text.
    let tmp2 = tempfile::tempdir().unwrap();
    let data2 = prepare_text(tmp2.path(), &corpus(Some(10)), 257);
    let e = eval_json(&run, &data2);
    let (loss, tokens, bytes) =
        (e["loss"].as_f64().unwrap(), e["tokens"].as_u64().unwrap(), e["bytes"].as_u64().unwrap());
    let val = lors_lm::data::TokenFile::open(&data2, "val", &lors_lm::data::Meta::load(&data2).unwrap()).unwrap();
    let ids = val.window(0, val.len()).unwrap();
    let eot = ids[1..=tokens as usize].iter().filter(|&&id| id == 0).count() as u64;
    assert!(eot > 0, "the validation split holds end-of-text targets");
    assert_eq!(bytes, tokens - eot);
    let want = loss * tokens as f64 / std::f64::consts::LN_2 / bytes as f64;
    assert!((e["bpb"].as_f64().unwrap() - want).abs() < 1e-12);

    // A BPE vocabulary is not byte-level: no bpb.
    let tmp3 = tempfile::tempdir().unwrap();
    let data3 = prepare_text(tmp3.path(), &corpus(None), 300);
    let run3 = tmp3.path().join("run");
    run_ok(train_tiny(&data3, &run3).args(["--set", "train.max_steps=6"]));
    let e = eval_json(&run3, &data3);
    assert!(e.get("bpb").is_none(), "{e}");
}

#[test]
fn byte_level_tokenizers_are_recognised() {
    let tmp = tempfile::tempdir().unwrap();
    for d in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let bytes = prepare_text(&tmp.path().join("a"), &corpus(None), 257);
    let bpe = prepare_text(&tmp.path().join("b"), &corpus(None), 300);
    let tok = |d: &Path| lors_lm::data::load_tokenizer(&d.join("tokenizer.json")).unwrap();
    assert!(lors_lm::data::is_byte_level(&tok(&bytes)));
    assert!(!lors_lm::data::is_byte_level(&tok(&bpe)));
}
