//! Property tests over the parts that parse user data: config text with `--set` overrides,
//! prepared-data metadata and token files, safetensors checkpoints, and prompt text through
//! the tokenizer. Each must answer arbitrary input with `Ok` or an error, never a panic.
//! Bounded: `PROPTEST_CASES` (default 256 here) cases per property.

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
        let tok = lors_lm::data::load_tokenizer(&data.join("tokenizer.json")).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let enc = tok.encode(text.as_str(), false).unwrap();
        let back = tok.decode(enc.get_ids(), false).unwrap();
        prop_assert_eq!(back, text);
    }
}
