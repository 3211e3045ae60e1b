//! Property tests over the parts that parse user data: config text with `--set` overrides,
//! prepared-data metadata and token files, safetensors checkpoints, and prompt text through
//! the tokenizer. Each must answer arbitrary input with `Ok` or an error, never a panic.
//! Bounded: `PROPTEST_CASES` (default 256 here) cases per property.
//!
//! And a seeded mutation fuzzer (tests/common/mutate.rs) over four valid files made here, a
//! GGUF model, a checkpoint (safetensors, state and config), a prepared data directory and a
//! tokenizer.json: every mutated file is loaded as the commands load it and must be refused
//! with an error or loaded, never a panic; a case that runs 30 s is a hang and aborts the run.
//! `FUZZ_CASES` cases per file (default 300; `FUZZ_VERBOSE=1` prints each case before it
//! runs); scripts/fuzz_files.sh runs 10,000 each and reports the counts, the slowest case and
//! the peak RSS.

mod common;

use candle_core::Device;
use lors_lm::config::Config;
use lors_lm::data::{Meta, TokenFile};
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
}

/// A prepared directory and a trained run, made once.
fn fixtures() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static F: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("c.txt");
        std::fs::write(&corpus, "Loomings. Call me Ishmael; ünïcödé ✓ 鯨 🐋 \u{0}\t\r\n".repeat(40)).unwrap();
        let data = tmp.path().join("data");
        let bin = env!("CARGO_BIN_EXE_lors-lm");
        let st = std::process::Command::new(bin)
            .args(["prepare", "--vocab-size", "300", "--input"])
            .arg(&corpus)
            .arg("--out")
            .arg(&data)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let run = tmp.path().join("run");
        let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml");
        let st = std::process::Command::new(bin)
            .args(["train", "--quiet", "--config", cfg, "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .args(["--set", "train.max_steps=6"])
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let st = std::process::Command::new(bin)
            .args(["export", "--format", "gguf", "--run"])
            .arg(&run)
            .arg("--out")
            .arg(tmp.path().join("model.gguf"))
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        (tmp, data, run)
    })
}

const VALID: &str = include_str!("../configs/tiny.toml");

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn config_text_never_panics(text in ".{0,300}", cut in 0usize..VALID.len()) {
        let _ = Config::from_toml_str(&text, &[], "fuzz");
        // Truncated and spliced real configs too.
        let mut spliced = VALID[..cut].to_string();
        spliced.push_str(&text);
        let _ = Config::from_toml_str(&spliced, &[], "fuzz");
    }

    #[test]
    fn set_overrides_never_panic(key in "[a-z_.]{0,20}", value in ".{0,40}", raw in ".{0,60}") {
        let _ = Config::from_toml_str(VALID, &[format!("{key}={value}")], "fuzz");
        let _ = Config::from_toml_str(VALID, &[raw], "fuzz");
    }

    #[test]
    fn meta_and_token_files_never_panic(meta in proptest::collection::vec(any::<u8>(), 0..400),
                                        tokens in proptest::collection::vec(any::<u8>(), 0..64),
                                        use_real_meta in any::<bool>()) {
        let (_, data, _) = fixtures();
        let dir = tempfile::tempdir().unwrap();
        if use_real_meta {
            std::fs::copy(data.join("meta.json"), dir.path().join("meta.json")).unwrap();
        } else {
            std::fs::write(dir.path().join("meta.json"), &meta).unwrap();
        }
        // The prepared directory's first train shard, and an old directory's train.bin.
        std::fs::write(dir.path().join("train-00000.bin"), &tokens).unwrap();
        std::fs::write(dir.path().join("train.bin"), &tokens).unwrap();
        if let Ok(m) = Meta::load(dir.path()) {
            if let Ok(f) = TokenFile::open(dir.path(), "train", &m) {
                let _ = f.max_id();
                let _ = f.window(0, f.len());
                let _ = f.window(f.len(), 1);
            }
        }
    }

    #[test]
    fn damaged_checkpoints_are_errors_not_panics(cut in 0usize..4096, flip in any::<(u16, u8)>(), noise in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (_, _, run) = fixtures();
        let good = std::fs::read(run.join("checkpoints/6/model.safetensors")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for bytes in [
            good[..cut.min(good.len())].to_vec(),
            { let mut b = good.clone(); let i = flip.0 as usize % b.len(); b[i] ^= flip.1 | 1; b },
            noise.clone(),
        ] {
            std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
            let ckpt = lors_lm::train::Checkpoint { step: 6, dir: dir.path().to_path_buf() };
            if let Ok(t) = ckpt.params(&Device::Cpu) {
                let cfg = Config::load(&run.join("config.toml"), &[]).unwrap();
                let mut store = lors_lm::model::ParamStore::from_tensors(t, candle_core::DType::F32, &Device::Cpu);
                let _ = lors_lm::model::Model::new(&cfg.model, &cfg.lors, &mut store);
            }
        }
    }

    #[test]
    fn any_prompt_text_round_trips_through_the_tokenizer(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (_, data, _) = fixtures();
        let tok = lors_lm::formats::load_tokenizer(&data.join("tokenizer.json")).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let enc = tok.encode(text.as_str(), false).unwrap();
        let back = tok.decode(enc.get_ids(), false).unwrap();
        prop_assert_eq!(back, text);
    }
}

// ---------------------------------------------------------------- hostile files

use common::mutate::{self, Rng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn fuzz_cases() -> usize {
    std::env::var("FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

/// A case running this long is a hang: the watchdog prints it and aborts the process.
const HANG: Duration = Duration::from_secs(30);

/// What one file's cases came to.
#[derive(Default)]
struct Tally {
    cases: usize,
    loaded: usize,
    refused: usize,
    panics: Vec<String>,
    max_ms: f64,
    over_1s: usize,
}

/// Runs cases one at a time with a panic catcher and a hang watchdog.
struct Harness {
    /// Milliseconds since `t0` at which the running case started (0: none running).
    started: Arc<AtomicU64>,
    what: Arc<Mutex<String>>,
    t0: Instant,
    panic_msg: Arc<Mutex<Option<String>>>,
}

impl Harness {
    fn new() -> Self {
        let h = Harness {
            started: Arc::new(AtomicU64::new(0)),
            what: Arc::new(Mutex::new(String::new())),
            t0: Instant::now(),
            panic_msg: Arc::new(Mutex::new(None)),
        };
        let (started, what, t0) = (h.started.clone(), h.what.clone(), h.t0);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = started.load(Ordering::SeqCst);
            if s > 0 && (t0.elapsed().as_millis() as u64).saturating_sub(s) > HANG.as_millis() as u64 {
                eprintln!("HANG: a case ran {} s: {}", HANG.as_secs(), what.lock().unwrap());
                std::process::abort();
            }
        });
        // Panics on this thread are recorded (and kept off the console); others go to the
        // previous hook.
        let me = std::thread::current().id();
        let msg = h.panic_msg.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == me {
                *msg.lock().unwrap() = Some(info.to_string());
            } else {
                previous(info);
            }
        }));
        h
    }

    fn case(&self, tally: &mut Tally, what: String, load: impl FnOnce() -> anyhow::Result<()>) {
        if std::env::var_os("FUZZ_VERBOSE").is_some() {
            eprintln!("{what}");
        }
        *self.what.lock().unwrap() = what.clone();
        let start = Instant::now();
        self.started.store(self.t0.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
        self.started.store(0, Ordering::SeqCst);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        tally.cases += 1;
        tally.max_ms = tally.max_ms.max(ms);
        tally.over_1s += usize::from(ms > 1000.0);
        match result {
            Ok(Ok(())) => tally.loaded += 1,
            Ok(Err(_)) => tally.refused += 1,
            Err(_) => {
                let msg = self.panic_msg.lock().unwrap().take().unwrap_or_default();
                tally.panics.push(format!("{what}: {msg}"));
            }
        }
    }
}

/// Peak resident set size of this process, MB.
fn peak_rss_mb() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Every mutated file is refused with an error or loaded, as the commands load it: never a
/// panic, never a hang (see the module docs).
#[test]
fn hostile_files_are_refused_or_loaded_never_a_panic_or_a_hang() {
    let (fixture_dir, data, run) = fixtures();
    let n = fuzz_cases();
    let h = Harness::new();
    let work = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let mut report = vec![];

    // A GGUF model, loaded as `generate --gguf` loads it.
    let good = std::fs::read(fixture_dir.path().join("model.gguf")).unwrap();
    let layout = mutate::gguf_layout(&good).expect("the exported GGUF walks");
    let path = work.path().join("case.gguf");
    let mut t = Tally::default();
    for i in 0..n {
        let (bytes, what) = mutate::gguf(&mut Rng::new(0x6_0000 + i as u64), &good, &layout);
        std::fs::write(&path, &bytes).unwrap();
        h.case(&mut t, format!("gguf case {i}: {what}"), || lors_lm::formats::gguf::load_gguf(&path, &cpu).map(|_| ()));
    }
    report.push(("GGUF model", t));

    // A checkpoint: its weights (safetensors header and bytes), training state, optimizer and
    // config, loaded as `generate --run` and `train --resume` read them.
    let run_copy = work.path().join("run");
    copy_dir(run, &run_copy);
    let ckpt = run_copy.join("checkpoints/6");
    let mut t = Tally::default();
    for i in 0..n {
        let mut rng = Rng::new(0xC_0000 + i as u64);
        let file = *rng.pick(&[
            "model.safetensors",
            "model.safetensors",
            "optimizer.safetensors",
            "config.toml",
            "state.json",
        ]);
        let original = std::fs::read(ckpt.join(file)).unwrap();
        let (bytes, what) = match file {
            "config.toml" => mutate::toml_text(&mut rng, &String::from_utf8_lossy(&original)),
            "state.json" => mutate::json(&mut rng, &original),
            _ => mutate::safetensors(&mut rng, &original),
        };
        std::fs::write(ckpt.join(file), &bytes).unwrap();
        h.case(&mut t, format!("checkpoint case {i}: {file}: {what}"), || {
            let loaded = lors_lm::train::RunDir::at(&run_copy).load(None, &cpu)?;
            let c = lors_lm::train::Checkpoint { step: loaded.step, dir: ckpt.clone() };
            c.state()?;
            c.optimizer(&cpu)?;
            Ok(())
        });
        std::fs::write(ckpt.join(file), original).unwrap();
    }
    report.push(("checkpoint", t));

    // A prepared data directory, opened as `train` opens it (meta, both splits against the
    // config, windows, the tokenizer).
    let data_copy = work.path().join("data");
    copy_dir(data, &data_copy);
    let mut t = Tally::default();
    for i in 0..n {
        let mut rng = Rng::new(0xD_0000 + i as u64);
        let file = *rng.pick(&["meta.json", "meta.json", "train-00000.bin", "val-00000.bin", "tokenizer.json"]);
        let original = std::fs::read(data_copy.join(file)).unwrap();
        let (bytes, what) = match file {
            "meta.json" | "tokenizer.json" => mutate::json(&mut rng, &original),
            _ => mutate::bytes(&mut rng, &original, original.len()),
        };
        std::fs::write(data_copy.join(file), &bytes).unwrap();
        h.case(&mut t, format!("data case {i}: {file}: {what}"), || {
            let mut cfg = Config::from_toml_str(VALID, &[], "tiny")?;
            let d = lors_lm::train::session::open_data(&data_copy, &mut cfg)?;
            let len = d.train.len();
            d.train.window(len / 2, (len - len / 2).min(64))?;
            d.val.window(0, d.val.len().min(64))?;
            lors_lm::formats::load_tokenizer(&data_copy.join("tokenizer.json"))?;
            Ok(())
        });
        std::fs::write(data_copy.join(file), original).unwrap();
    }
    report.push(("prepared data", t));

    // A tokenizer.json, loaded and used on text as `generate` uses it.
    let good = std::fs::read(data.join("tokenizer.json")).unwrap();
    let path = work.path().join("tokenizer.json");
    let mut t = Tally::default();
    for i in 0..n {
        let (bytes, what) = mutate::json(&mut Rng::new(0x7_0000 + i as u64), &good);
        std::fs::write(&path, &bytes).unwrap();
        h.case(&mut t, format!("tokenizer case {i}: {what}"), || {
            let tok = lors_lm::formats::load_tokenizer(&path)?;
            let enc = tok.encode("Call me Ishmael. ünïcödé ✓ 鯨 🐋", false).map_err(anyhow::Error::msg)?;
            tok.decode(enc.get_ids(), false).map_err(anyhow::Error::msg)?;
            Ok(())
        });
    }
    report.push(("tokenizer.json", t));

    let _ = std::panic::take_hook();
    println!("| file | cases | loaded | refused | panics | slowest case (ms) | cases over 1 s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, t) in &report {
        println!(
            "| {name} | {} | {} | {} | {} | {:.1} | {} |",
            t.cases,
            t.loaded,
            t.refused,
            t.panics.len(),
            t.max_ms,
            t.over_1s
        );
    }
    println!("peak RSS of the fuzzing process: {:.0} MB", peak_rss_mb());
    let mut failures = vec![];
    for (name, t) in &report {
        if !t.panics.is_empty() {
            let some = t.panics[..t.panics.len().min(8)].join("\n");
            failures.push(format!("{name}: {} panics, e.g.\n{some}", t.panics.len()));
        }
        if t.refused == 0 || t.loaded == 0 {
            failures.push(format!("{name}: the mutations never reached both outcomes"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The two tokenizer.json shapes the fuzzer found panicking inside tokenizers 0.23 are refused
/// with an error naming the file: a JSON syntax error inside the `decoder` object, and a
/// `continuing_subword_prefix` longer than a merge's second token.
#[test]
fn tokenizer_files_that_panicked_tokenizers_are_refused() {
    let (_, data, _) = fixtures();
    let good = std::fs::read_to_string(data.join("tokenizer.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let at = good.find("\"decoder\"").expect("a decoder") + "\"decoder\":".len();
    let broken_decoder = format!("{}{{\"type\" \"ByteLevel\"{}", &good[..at], &good[at..]);
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["model"]["continuing_subword_prefix"] = serde_json::Value::from("x".repeat(40));
    for (text, want) in [(broken_decoder, "expected"), (v.to_string(), "continuing_subword_prefix")] {
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", lors_lm::formats::load_tokenizer(&path).unwrap_err());
        assert!(err.contains("tokenizer.json") && err.contains(want), "{err}");
    }
}
