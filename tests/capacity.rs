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
    let tok = |d: &Path| lors_lm::formats::load_tokenizer(&d.join("tokenizer.json")).unwrap();
    assert!(lors_lm::data::is_byte_level(&tok(&bytes)));
    assert!(!lors_lm::data::is_byte_level(&tok(&bpe)));
}

// ---------------------------------------------------------------------------------------------
// Training FLOPs and decode bytes per token
// ---------------------------------------------------------------------------------------------

/// `lors-lm params --json` of configs/tiny.toml with `sets`.
fn params_json(sets: &[String]) -> serde_json::Value {
    let mut c = bin();
    c.args(["params", "--json", "--config"]).arg(common::repo("configs/tiny.toml"));
    for s in sets {
        c.args(["--set", s]);
    }
    json(&run_ok(&mut c))
}

/// (d, L, heads, kv heads, ffn, T, B, V) and the sets that give them.
struct Dims {
    d: usize,
    l: usize,
    kv: usize,
    f: usize,
    t: usize,
    b: usize,
    v: usize,
    sets: Vec<String>,
}

fn dims(d: usize, l: usize, heads: usize, kv_heads: usize, f: usize, t: usize, b: usize) -> Dims {
    let sets = [
        format!("model.d_model={d}"),
        format!("model.n_layers={l}"),
        format!("model.n_heads={heads}"),
        format!("model.n_kv_heads={kv_heads}"),
        format!("model.ffn_hidden={f}"),
        format!("model.max_seq_len={t}"),
        format!("train.seq_len={t}"),
        format!("train.batch_size={b}"),
        "model.vocab_size=257".to_string(),
    ];
    Dims { d, l, kv: kv_heads * (d / heads), f, t, b, v: 257, sets: sets.to_vec() }
}

#[test]
fn training_flops_per_token_are_the_closed_form_for_every_mode() {
    // Two configurations: the issue's d_model 64 × 8 layers at T 256 (no GQA), and a small
    // GQA one (4 heads, 2 kv heads).
    for dm in [dims(64, 8, 4, 4, 172, 256, 16), dims(32, 3, 4, 2, 64, 16, 4)] {
        let Dims { d, l, kv, f, t, b, v, .. } = dm;
        // Weights of one block as applied: q, o (d×d), k, v (kv×d), gate, up, down (d×f), gains.
        let block = 2 * d * d + 2 * kv * d + 3 * d * f;
        let dense = 6.0 * (l * (block + 2 * d) + d) as f64;
        let attention = 12.0 * (l * d * t) as f64;
        let head = 6.0 * (v * d) as f64;
        for (mode, extra, merge) in [
            ("vanilla", vec![], 0.0),
            ("shared", vec![], 0.0),
            // LORS rank 3 everywhere: 6·r·(Σ out·in) per layer, over the B·T tokens of a micro-batch.
            ("lors", vec!["lors.rank=3".to_string()], 6.0 * (3 * l * block) as f64 / (b * t) as f64),
            (
                "lors",
                vec![
                    "lors.rank=2".to_string(),
                    "lors.groups=2".to_string(),
                    "lors.targets=[\"q\", \"up\"]".to_string(),
                ],
                6.0 * (2 * l * (d * d + d * f)) as f64 / (b * t) as f64,
            ),
        ] {
            let mut sets = dm.sets.clone();
            sets.push(format!("lors.mode=\"{mode}\""));
            sets.extend(extra.iter().cloned());
            let p = params_json(&sets);
            let fl = &p["train_flops_per_token"];
            let close =
                |got: &serde_json::Value, want: f64| (got.as_f64().unwrap() - want).abs() <= 1e-9 * want.max(1.0);
            assert!(close(&fl["dense"], dense), "{mode} {extra:?}: dense {} vs {dense}", fl["dense"]);
            assert!(close(&fl["attention"], attention), "{mode}: attention {}", fl["attention"]);
            assert!(close(&fl["head"], head), "{mode}: head {}", fl["head"]);
            assert!(close(&fl["lors_merge"], merge), "{mode} {extra:?}: merge {} vs {merge}", fl["lors_merge"]);
            assert!(close(&fl["total"], dense + attention + head + merge), "{mode}: total");
            // The MFU log's PaLM figure is dense + attention.
            assert!(close(&fl["mfu_formula"], dense + attention), "{mode}: mfu formula");
        }
    }
}

#[test]
fn decode_bytes_are_what_merged_and_factored_steps_read() {
    use lors_lm::config::Config;
    use lors_lm::model::{Model, ParamCounts, ParamStore, Weights};
    let base = Config::tiny();
    let variants: &[&[&str]] = &[
        &["lors.mode=\"vanilla\""],
        &["lors.mode=\"shared\""],
        &["lors.mode=\"lors\"", "lors.rank=3"],
        &["lors.mode=\"lors\"", "lors.rank=2", "model.n_layers=4", "lors.groups=2"],
        &["lors.mode=\"lors\"", "lors.attn_rank_schedule=[1, 2, 3]", "lors.ffn_rank_schedule=[4, 2, 1]"],
        &["lors.mode=\"lors\"", "lors.private_layers=[0]", "lors.targets=[\"o\", \"down\", \"gate\"]"],
        &["lors.mode=\"shared\"", "lors.targets=[\"o\", \"down\"]", "model.tie_embeddings=false"],
        &["lors.mode=\"lowrank\"", "lors.rank=2"],
    ];
    for sets in variants {
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.push("model.vocab_size=61".into());
        let cfg = base.with_sets(&sets, "test").unwrap();
        let mut store = ParamStore::new_init(1, candle_core::DType::F32, &candle_core::Device::Cpu);
        let model = Model::new(&cfg.model, &cfg.lors, &mut store).unwrap();
        for w in [Weights::Merged, Weights::Factored] {
            let closed = ParamCounts::decode_bytes(&cfg.model, &cfg.lors, w);
            assert_eq!(closed, model.weight_bytes(w), "{sets:?} {}", w.name());
        }
        // And as parameters: a merged step reads a vanilla model's weights; factored holds
        // exactly the unique parameters (tied heads).
        let c = ParamCounts::new(&cfg.model, &cfg.lors);
        if cfg.model.tie_embeddings {
            assert_eq!(
                ParamCounts::decode_bytes(&cfg.model, &cfg.lors, Weights::Merged).read,
                4 * c.vanilla_total as u64
            );
            assert_eq!(
                ParamCounts::decode_bytes(&cfg.model, &cfg.lors, Weights::Factored).distinct,
                4 * c.total() as u64
            );
        }
        // `params --json` reports the same figures.
        let p = params_json(&sets);
        for w in [Weights::Merged, Weights::Factored] {
            let b = ParamCounts::decode_bytes(&cfg.model, &cfg.lors, w);
            let j = &p["decode_bytes_per_token"][w.name()];
            assert_eq!((j["read"].as_u64(), j["distinct"].as_u64()), (Some(b.read), Some(b.distinct)), "{sets:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Warmup-stable-decay branches in a sweep
// ---------------------------------------------------------------------------------------------

/// A wsd plan on byte-level data: `long` (16 steps; decay 4, from step 12), its decay branch
/// `b8` (8 steps: decay 2, so it continues `long`'s checkpoint at step 6), and the same two
/// configurations trained from scratch without branching.
const WSD_PLAN: &str = r#"
title = "wsd branches"
seeds = [1]
baseline = "long"
[base.model]
vocab_size = 0
d_model = 32
n_layers = 2
n_heads = 4
ffn_hidden = 64
max_seq_len = 32
[base.lors]
mode = "lors"
rank = 4
[base.train]
batch_size = 4
seq_len = 16
max_steps = 16
warmup_steps = 2
schedule = "wsd"
decay_frac = 0.25
eval_interval = 4
eval_batches = 1
ckpt_interval = 0
keep_checkpoints = 1
[[run]]
name = "long"
[[run]]
name = "b8"
set = ["train.max_steps=8"]
branch_of = "long"
[[run]]
name = "fresh8"
set = ["train.max_steps=8"]
[[run]]
name = "fresh16"
"#;

fn sweep_plan(plan: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["sweep", "--plan"])
        .arg(plan)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--docs")
        .arg(out.join("report"))
        .args(extra)
        .output()
        .unwrap()
}

fn result(out: &Path, name: &str) -> serde_json::Value {
    let p = out.join(name).join("seed1/result.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn weights(out: &Path, name: &str, step: usize) -> Vec<u8> {
    std::fs::read(out.join(name).join(format!("seed1/checkpoints/{step}/model.safetensors"))).unwrap()
}

#[test]
fn a_decay_branch_equals_the_run_of_its_length_from_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_text(tmp.path(), &corpus(Some(20)), 257);
    let plan = tmp.path().join("plan.toml");
    std::fs::write(&plan, WSD_PLAN).unwrap();
    let out = tmp.path().join("runs");
    let o = sweep_plan(&plan, &data, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("branch b8 seed 1: continues long from step 6"), "{err}");

    // The branch continued long's step-6 checkpoint (weights, AdamW moments, data order) with
    // its own decay: it ends where the 8-step run from scratch ends, bit for bit.
    assert_eq!(weights(&out, "b8", 8), weights(&out, "fresh8", 8), "branch vs fresh 8-step run");
    let (b, f) = (result(&out, "b8"), result(&out, "fresh8"));
    assert_eq!(b["val_loss"], f["val_loss"]);
    assert_eq!((b["steps"].as_u64(), b["tokens"].as_u64()), (Some(8), Some(8 * 64)), "{b}");
    assert_eq!(b["branched_from"], "long@6");
    assert_eq!(b["train_flops"], f["train_flops"]);
    // Training long in two segments changed nothing either.
    assert_eq!(weights(&out, "long", 16), weights(&out, "fresh16", 16), "segmented vs straight 16-step run");
    // The branch's metrics hold long's first 6 steps, then its own: the whole run it stands for.
    let metrics = std::fs::read_to_string(out.join("b8/seed1/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("ms").and(Some(l.to_string())))
        .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let lrs: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("lr")?.as_f64())
        .collect();
    assert_eq!(lrs[5], 3e-3, "stable until step 6");
    assert!(lrs[6] < lrs[5] && (lrs[7] - 3e-4).abs() < 1e-12, "{lrs:?}: decays to min_lr at step 8");

    // The report shows bits per byte, tokens per block parameter and the branch.
    let md = std::fs::read_to_string(out.join("report/results.md")).unwrap();
    assert!(md.contains("| val bpb |") && md.contains("branch of long @ 6"), "{md}");
    // A rerun keeps everything.
    let o = sweep_plan(&plan, &data, &out, &[]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).matches("already finished: kept").count(), 4);

    // Side by side (--jobs 2, one thread each), from scratch: the same rows finish, each
    // chain logged.
    let out2 = tmp.path().join("runs2");
    let o = sweep_plan(&plan, &data, &out2, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["long", "b8", "fresh8", "fresh16"] {
        assert!(result(&out2, name)["val_loss"].as_f64().unwrap() > 0.0);
    }
    assert!(out2.join("logs/long-seed1.log").is_file());
    // --only the branch: its source goes only as far as the branch needs.
    let out3 = tmp.path().join("runs3");
    let o = sweep_plan(&plan, &data, &out3, &["--only", "b8", "--no-report"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(weights(&out3, "b8", 8), weights(&out, "b8", 8));
    assert!(!out3.join("long/seed1/result.json").exists());
    assert_eq!(std::fs::read_to_string(out3.join("long/seed1/checkpoints/latest")).unwrap().trim(), "6");
}

#[test]
fn branches_that_would_not_equal_a_fresh_run_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_text(tmp.path(), &corpus(None), 257);
    let cases = [
        (WSD_PLAN.replace("schedule = \"wsd\"", "schedule = \"cosine\""), "wsd"),
        (
            WSD_PLAN.replace(
                "set = [\"train.max_steps=8\"]\nbranch_of",
                "set = [\"train.max_steps=8\", \"train.lr=1e-3\"]\nbranch_of",
            ),
            "train.lr",
        ),
        (
            WSD_PLAN.replace("set = [\"train.max_steps=8\"]\nbranch_of", "set = [\"train.max_steps=20\"]\nbranch_of"),
            "fewer steps",
        ),
        (WSD_PLAN.replace("name = \"fresh8\"", "name = \"fresh8\"\nbranch_of = \"b8\""), "itself a branch"),
        (WSD_PLAN.replace("branch_of = \"long\"", "branch_of = \"nope\""), "\"nope\""),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        assert_ne!(text, WSD_PLAN, "case {i} changed nothing");
        let plan = tmp.path().join(format!("plan{i}.toml"));
        std::fs::write(&plan, text).unwrap();
        let o = sweep_plan(&plan, &data, &tmp.path().join("runs"), &["--dry-run"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "case {i}: want {want:?} in {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The experiment's plans
// ---------------------------------------------------------------------------------------------

#[test]
fn the_capacity_plans_hold_their_budgets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_text(tmp.path(), &corpus(None), 257);
    for (plan, budget) in [
        ("configs/capacity.toml", 98_816.0),
        ("configs/capacity-2p.toml", 2.0 * 98_816.0),
        ("configs/capacity-stdlib.toml", 98_816.0),
    ] {
        for smoke in [false, true] {
            let mut c = bin();
            c.args(["sweep", "--dry-run", "--plan"]).arg(common::repo(plan)).arg("--data").arg(&data);
            if smoke {
                c.arg("--smoke");
            }
            let o = run_ok(&mut c);
            let err = String::from_utf8_lossy(&o.stderr);
            if smoke {
                continue; // resolves (steps scaled, branches still valid)
            }
            // config mode sharing... block unique tokens tok/block epochs GFLOP/tok FLOPs [branch]
            let rows: Vec<&str> =
                err.lines().filter(|l| l.contains("-t") && l.split_whitespace().count() > 8).collect();
            assert!(rows.len() >= 6, "{err}");
            for row in rows {
                let name = row.split_whitespace().next().unwrap();
                let t: f64 = name.rsplit("-t").next().unwrap().parse().unwrap();
                // Every arm trains t × budget tokens; those at the budget see t tokens per block parameter (±5 %).
                let mut cells: Vec<&str> = row.split_whitespace().collect();
                if row.contains(" @ step ") {
                    cells.truncate(cells.len() - 4); // the branch column: SOURCE @ step N
                }
                let i = cells.len() - 7; // block params, then unique, tokens, ...
                let (block, tokens): (f64, f64) = (cells[i].parse().unwrap(), cells[i + 2].parse().unwrap());
                assert!((tokens / (t * budget) - 1.0).abs() < 0.01, "{row}");
                if !name.starts_with("c-") && !name.starts_with("f-") {
                    assert!((block / budget - 1.0).abs() <= 0.05, "{row}: block params off the budget");
                }
            }
        }
    }
}

#[test]
fn the_training_memory_estimate_is_its_closed_form_and_scales_with_batch_and_context() {
    // The GQA configuration of the FLOPs test: d 32, 3 layers, 4 heads (2 kv), F 64, T 16, B 4.
    let dm = dims(32, 3, 4, 2, 64, 16, 4);
    let mem = |extra: &[&str]| {
        let mut sets = dm.sets.clone();
        sets.extend(extra.iter().map(|s| s.to_string()));
        let p = params_json(&sets);
        (p["train_memory_bytes"].clone(), p["total_unique"].as_u64().unwrap())
    };
    let get = |m: &serde_json::Value, k: &str| m[k].as_u64().unwrap();
    for (mode, dtype, per_score) in [("vanilla", "f32", 16), ("lors", "f32", 16), ("lors", "bf16", 20)] {
        let (m, unique) = mem(&[&format!("lors.mode=\"{mode}\""), &format!("train.dtype=\"{dtype}\"")]);
        // f32 parameters, gradients and AdamW's two moments: 16 bytes per unique parameter.
        assert_eq!(get(&m, "params") + get(&m, "grads") + get(&m, "optimizer"), 16 * unique, "{mode} {dtype}");
        // L · B · H · T² scores, 16 bytes each in f32 (scores, scaled, masked, softmax), 20 in bf16.
        assert_eq!(get(&m, "attention_scores"), (3 * 4 * 4 * 16 * 16 * per_score) as u64, "{mode} {dtype}");
        let parts = ["params", "grads", "optimizer", "step_weights", "activations", "attention_scores", "logits"];
        assert_eq!(parts.iter().map(|k| get(&m, k)).sum::<u64>(), get(&m, "total"), "{mode} {dtype}");
        // Twice the batch: twice every per-token term; twice the context: four times the scores.
        let (b2, _) =
            mem(&[&format!("lors.mode=\"{mode}\""), &format!("train.dtype=\"{dtype}\""), "train.batch_size=8"]);
        for k in ["activations", "attention_scores", "logits"] {
            assert_eq!(get(&b2, k), 2 * get(&m, k), "{mode} {dtype} {k}");
        }
        let (t2, _) = mem(&[
            &format!("lors.mode=\"{mode}\""),
            &format!("train.dtype=\"{dtype}\""),
            "train.seq_len=32",
            "model.max_seq_len=32",
        ]);
        assert_eq!(get(&t2, "attention_scores"), 4 * get(&m, "attention_scores"), "{mode} {dtype}");
        assert_eq!(get(&t2, "activations"), 2 * get(&m, "activations"), "{mode} {dtype}");
    }
    // LORS keeps each layer's merged W + B·A and B·A (8 bytes per vanilla weight) that vanilla does not.
    let (van, _) = mem(&["lors.mode=\"vanilla\""]);
    let (lors, _) = mem(&["lors.mode=\"lors\"", "lors.rank=2"]);
    let block = 3 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64) as u64; // kv width 2 · 8 = 16
    assert_eq!(get(&lors, "step_weights") - get(&van, "step_weights"), 8 * block);
}
