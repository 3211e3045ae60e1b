//! Integration tests of `lors-lm prepare`: the real binary on tiny corpora, read back through
//! the library API the trainer uses.
mod common;

use common::{assert_ok, assert_refused, run_with_timeout};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lors_lm::data::{write_prepared_dir, Meta, TokenFile};
use lors_lm::formats::load_tokenizer;
use sha2::{Digest, Sha256};

/// Documents of the test corpus, as (relative path, contents). Sorted by path they are
/// a.txt, c.txt, empty.txt, sub/b.txt.
const DOCS: &[(&str, &str)] = &[
    (
        "a.txt",
        "Call me Ishmael. Some years ago—never mind how long precisely—having little\n\
         or no money in my purse, and nothing particular to interest me on shore.\n\
         Café, naïve, façade, Ångström, Œuvre, straße.\n",
    ),
    // No trailing newline: prepare inserts one before the next file.
    ("sub/b.txt", "東京タワーと富士山。你好，世界！ 🐳🐋 emoji 👩‍👩‍👧 and a flag 🇫🇷"),
    (
        "c.txt",
        // Raw unusual characters: NUL, DEL, BOM, the byte-level stand-ins for space and
        // newline (Ġ, Ċ), combining marks, CRLF, tabs and runs of spaces.
        "nul\u{0}del\u{7f} bom\u{feff} Ġ Ċ ĠĠ e\u{301} a\u{308}\r\n\ttab\t\t  spaces   end\n\n\n",
    ),
    ("empty.txt", ""),
];

/// The documents prepare must read: the non-empty files, in path order.
fn expected_docs(copies: usize) -> Vec<String> {
    let mut docs: Vec<(PathBuf, String)> = DOCS.iter().map(|(p, t)| (PathBuf::from(p), t.repeat(copies))).collect();
    docs.sort();
    docs.into_iter().map(|(_, d)| d).filter(|d| !d.is_empty()).collect()
}

fn write_corpus(dir: &Path, copies: usize) {
    for (rel, text) in DOCS {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text.repeat(copies)).unwrap();
    }
    // Not *.txt: must be ignored.
    fs::write(dir.join("notes.md"), "ignored").unwrap();
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lors-lm"));
    // Keep the child away from any real Hugging Face setup.
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        cmd.env_remove(var);
    }
    cmd
}

fn prepare(args: &[&str]) -> Output {
    let mut cmd = bin();
    cmd.arg("prepare").args(args);
    run_with_timeout(cmd, Duration::from_secs(120))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn all_tokens(dir: &Path) -> (Meta, Vec<u32>, Vec<u32>) {
    let meta = Meta::load(dir).unwrap();
    let train = TokenFile::open(dir, "train", &meta).unwrap();
    let val = TokenFile::open(dir, "val", &meta).unwrap();
    let t = train.window(0, train.len()).unwrap();
    let v = val.window(0, val.len()).unwrap();
    (meta, t, v)
}

/// Every document of a split, by its index (end-of-text token included).
fn documents(dir: &Path, split: &str) -> Vec<Vec<u32>> {
    let meta = Meta::load(dir).unwrap();
    let f = TokenFile::open(dir, split, &meta).unwrap();
    (0..f.documents().unwrap()).map(|i| f.document(i).unwrap()).collect()
}

/// The names of the files in a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn round_trip_is_exact_and_meta_is_right() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    let out = tmp.path().join("out");
    write_corpus(&corpus, 3);
    let args = ["--input", p(&corpus), "--out", p(&out), "--vocab-size", "320", "--val-docs", "1"];
    assert_ok(&prepare(&[&args[..], &["--shard-tokens", "100"]].concat()));

    let (meta, train, val) = all_tokens(&out);
    let tok = load_tokenizer(&out.join("tokenizer.json")).unwrap();
    // Every document is in exactly one split, followed by <|endoftext|> (id 0), and decodes
    // back byte for byte; its ids are what the tokenizer gives for the document alone.
    let (train_docs, val_docs) = (documents(&out, "train"), documents(&out, "val"));
    assert_eq!((train_docs.len(), val_docs.len()), (2, 1));
    let mut decoded = Vec::new();
    for doc in train_docs.iter().chain(&val_docs) {
        assert_eq!(doc.last(), Some(&0));
        assert!(!doc[..doc.len() - 1].contains(&0));
        let text = tok.decode(&doc[..doc.len() - 1], false).unwrap();
        assert_eq!(tok.encode(text.as_str(), false).unwrap().get_ids(), &doc[..doc.len() - 1]);
        decoded.push(text);
    }
    let mut expected = expected_docs(3);
    expected.sort();
    decoded.sort();
    assert_eq!(decoded, expected);
    assert_eq!(train_docs.concat(), train);
    assert_eq!(val_docs.concat(), val);

    // meta.json
    assert_eq!(meta.dtype, "u16");
    assert_eq!(meta.format_version, 2);
    assert_eq!(meta.vocab_size, tok.get_vocab_size(true));
    assert!(meta.vocab_size > 257 && meta.vocab_size <= 320, "{}", meta.vocab_size);
    assert_eq!((meta.train_tokens as usize, meta.val_tokens as usize), (train.len(), val.len()));
    assert_eq!((meta.train_documents, meta.val_documents), (2, 1));
    assert_eq!(meta.val_docs, Some(1));
    assert_eq!(meta.shard_tokens, Some(100));
    assert!(meta.shards.train.len() >= 2, "{:?}", meta.shards.train);
    for s in meta.shards.train.iter().chain(&meta.shards.val) {
        let bytes = fs::read(out.join(&s.file)).unwrap();
        assert_eq!(&bytes[..8], b"LORSTOKS");
        assert_eq!(bytes.len() as u64, 32 + 2 * s.tokens + 8 * s.documents);
        assert_eq!(s.sha256, format!("{:x}", Sha256::digest(&bytes)));
    }
    assert_eq!(meta.bos_id, Some(0));
    assert_eq!(meta.eos_id, Some(0));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert!(meta.tokenizer_source.starts_with("trained"));
    assert_eq!(meta.text_bytes as usize, expected.iter().map(|d| d.len()).sum::<usize>());
    // The tokenizer was trained on the training documents (all of them: fewer bytes than the cap).
    let val_text = tok.decode(&val_docs[0][..val_docs[0].len() - 1], false).unwrap();
    assert_eq!(meta.tokenizer_sample_bytes, Some(meta.text_bytes - val_text.len() as u64));
    let names: Vec<String> = meta
        .files
        .iter()
        .map(|f| Path::new(&f.path).strip_prefix(&corpus).unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.txt", "c.txt", "empty.txt", "sub/b.txt"]);
    for f in &meta.files {
        let bytes = fs::read(&f.path).unwrap();
        assert_eq!(f.bytes as usize, bytes.len());
        assert_eq!(f.sha256, format!("{:x}", Sha256::digest(&bytes)));
    }
    let max_id = TokenFile::open(&out, "train", &meta).unwrap().max_id();
    assert!((max_id as usize) < meta.vocab_size);
    // No temp files or resume state left behind.
    let left = listing(&out);
    assert!(left.iter().all(|n| n == "meta.json" || n == "tokenizer.json" || n.ends_with(".bin")), "{left:?}");
    assert!(left.contains(&"train-00001.bin".to_string()) && left.contains(&"val-00000.bin".to_string()));
}

/// A single text file is one document: its last --val-fraction of bytes is the validation split.
#[test]
fn a_single_document_is_split_by_its_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "Call me Ishmael. Some years ago, never mind how long precisely.\n".repeat(40);
    let corpus = tmp.path().join("one.txt");
    fs::write(&corpus, &text).unwrap();
    let out = tmp.path().join("out");
    assert_ok(&prepare(&["-i", p(&corpus), "-o", p(&out), "--vocab-size", "300", "--val-fraction", "0.25"]));
    let tok = load_tokenizer(&out.join("tokenizer.json")).unwrap();
    let (train, val) = (documents(&out, "train"), documents(&out, "val"));
    assert_eq!((train.len(), val.len()), (1, 1));
    let head = tok.decode(&train[0][..train[0].len() - 1], false).unwrap();
    let tail = tok.decode(&val[0][..val[0].len() - 1], false).unwrap();
    assert_eq!(format!("{head}{tail}"), text);
    // Cut after the line end at or after 75 % of the bytes.
    assert_eq!(head.len(), 30 * text.len() / 40);
}

#[test]
fn prepare_is_deterministic_and_reuses_a_tokenizer_file() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, 2);
    let (one, two, three) = (tmp.path().join("one"), tmp.path().join("two"), tmp.path().join("three"));
    for out in [&one, &two] {
        assert_ok(&prepare(&["-i", p(&corpus), "-o", p(out), "--vocab-size", "300"]));
    }
    for f in ["tokenizer.json", "train-00000.bin", "val-00000.bin", "meta.json"] {
        assert_eq!(fs::read(one.join(f)).unwrap(), fs::read(two.join(f)).unwrap(), "{f} differs between two runs");
    }
    // An explicit tokenizer.json gives the same tokens, and the files can be listed one by one.
    // Truncation and padding settings in a loaded tokenizer.json must not cut the stream.
    let mut json: serde_json::Value = serde_json::from_slice(&fs::read(one.join("tokenizer.json")).unwrap()).unwrap();
    json["truncation"] = serde_json::json!({
        "direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0
    });
    json["padding"] = serde_json::json!({
        "strategy": {"Fixed": 4096}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"
    });
    let tok = tmp.path().join("truncating-tokenizer.json");
    fs::write(&tok, serde_json::to_vec(&json).unwrap()).unwrap();
    assert!(load_tokenizer(&tok).unwrap().get_truncation().is_some());
    let files: Vec<PathBuf> = ["a.txt", "c.txt", "empty.txt", "sub/b.txt"].iter().map(|f| corpus.join(f)).collect();
    let mut args = vec!["--input"];
    args.extend(files.iter().map(|f| p(f)));
    args.extend(["--out", p(&three), "--tokenizer", p(&tok)]);
    assert_ok(&prepare(&args));
    assert_eq!(all_tokens(&one).1, all_tokens(&three).1);
    assert_eq!(all_tokens(&one).2, all_tokens(&three).2);
    let meta = Meta::load(&three).unwrap();
    assert!(meta.tokenizer_source.starts_with("file:"), "{}", meta.tokenizer_source);
}

#[test]
fn refuses_bad_input_with_clear_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, 2);
    let out = tmp.path().join("out");

    // Missing input path.
    let missing = tmp.path().join("nope");
    assert_refused(&prepare(&["--input", p(&missing), "--out", p(&out)]), &["nope", "does not exist"]);

    // Directory without *.txt files.
    let empty = tmp.path().join("empty-dir");
    fs::create_dir_all(empty.join("sub")).unwrap();
    fs::write(empty.join("sub/readme.md"), "not text").unwrap();
    assert_refused(&prepare(&["--input", p(&empty), "--out", p(&out)]), &["no *.txt", "empty-dir"]);

    // Only empty files.
    let blank = tmp.path().join("blank.txt");
    fs::write(&blank, "").unwrap();
    assert_refused(&prepare(&["--input", p(&blank), "--out", p(&out)]), &["no text found"]);

    // Invalid UTF-8: names the file and the byte offset; --lossy accepts it.
    let bad = tmp.path().join("bad.txt");
    let mut bytes = b"hello\nw\xffrld\n".to_vec();
    bytes.extend(b"more text here, enough for both splits to have tokens\n".repeat(4));
    fs::write(&bad, &bytes).unwrap();
    assert_refused(
        &prepare(&["--input", p(&corpus), p(&bad), "--out", p(&out)]),
        &["bad.txt", "not valid UTF-8", "byte offset 7", "line 2", "--lossy"],
    );
    let lossy_out = tmp.path().join("lossy");
    assert_ok(&prepare(&["--input", p(&bad), "--out", p(&lossy_out), "--vocab-size", "260", "--lossy"]));
    let tok = load_tokenizer(&lossy_out.join("tokenizer.json")).unwrap();
    let parts: Vec<String> = ["train", "val"]
        .iter()
        .flat_map(|split| documents(&lossy_out, split))
        .map(|d| tok.decode(&d[..d.len() - 1], false).unwrap())
        .collect();
    assert_eq!(parts.concat(), String::from_utf8_lossy(&bytes));

    // Vocabulary smaller than the byte alphabet + <|endoftext|>.
    assert_refused(
        &prepare(&["--input", p(&corpus), "--out", p(&out), "--vocab-size", "256"]),
        &["--vocab-size 256", "257"],
    );

    // Bad --val-fraction.
    assert_refused(&prepare(&["--input", p(&corpus), "--out", p(&out), "--val-fraction", "1.5"]), &["--val-fraction"]);

    // Too little text for two non-trivial splits; nothing is left half-written.
    let tiny = tmp.path().join("tiny.txt");
    fs::write(&tiny, "hi").unwrap();
    assert_refused(&prepare(&["--input", p(&tiny), "--out", p(&out), "--vocab-size", "260"]), &["too small"]);
    assert!(!out.exists() || listing(&out).is_empty(), "{:?}", listing(&out));

    // Tokenizer file missing, or not a tokenizer.
    assert_refused(
        &prepare(&["--input", p(&corpus), "--out", p(&out), "--tokenizer", p(&tmp.path().join("missing.json"))]),
        &["missing.json", "does not exist"],
    );
    let junk = tmp.path().join("junk.json");
    fs::write(&junk, r#"{"hello": "world"}"#).unwrap();
    assert_refused(
        &prepare(&["--input", p(&corpus), "--out", p(&out), "--tokenizer", p(&junk)]),
        &["junk.json", "is not a tokenizer.json"],
    );
    assert_refused(
        &prepare(&["--input", p(&corpus), "--out", p(&out), "--tokenizer", "hf:no-slash"]),
        &["hf:OWNER/NAME"],
    );

    // --out already holding prepared data: refused without --force, replaced with it.
    assert_ok(&prepare(&["--input", p(&corpus), "--out", p(&out), "--vocab-size", "300"]));
    let before = fs::read(out.join("meta.json")).unwrap();
    assert_refused(&prepare(&["--input", p(&corpus), "--out", p(&out)]), &["already holds prepared data", "--force"]);
    assert_eq!(fs::read(out.join("meta.json")).unwrap(), before);
    assert_ok(&prepare(&["--input", p(&corpus), "--out", p(&out), "--vocab-size", "280", "--force"]));
    assert!(Meta::load(&out).unwrap().vocab_size <= 280);
}

#[test]
fn library_helpers_for_synthetic_data() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Meta::load(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("run `lors-lm prepare` first"), "{err}");

    // A real tokenizer to copy along.
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, 1);
    let real = tmp.path().join("real");
    assert_ok(&prepare(&["-i", p(&corpus), "-o", p(&real), "--vocab-size", "260"]));

    let dir = tmp.path().join("synthetic");
    let train: Vec<u32> = (0..100).map(|i| i % 259).collect();
    let meta = write_prepared_dir(&dir, &train, &[1, 2, 3], 259, Some(&real.join("tokenizer.json"))).unwrap();
    assert_eq!((meta.train_tokens, meta.val_tokens), (100, 3));
    assert_eq!(meta.eos_id, Some(0));
    let loaded = Meta::load(&dir).unwrap();
    assert_eq!(loaded.vocab_size, 259);
    let tf = TokenFile::open(&dir, "train", &loaded).unwrap();
    assert_eq!(tf.window(95, 5).unwrap(), &train[95..]);
    assert_eq!(tf.max_id(), 99);
    assert!(load_tokenizer(&loaded.tokenizer_path(&dir).unwrap()).is_ok());
    // A truncated shard is caught, naming it.
    fs::write(dir.join("val-00000.bin"), [0u8; 4]).unwrap();
    let err = TokenFile::open(&dir, "val", &loaded).unwrap_err();
    assert!(format!("{err:#}").contains("val-00000.bin"), "{err:#}");
}

/// Builds a Hugging Face cache holding `tokenizer` as models--owner--name at a fixed commit,
/// laid out like the Python and Rust clients do (blob + snapshot link + refs/main).
#[cfg(feature = "hub")]
fn fake_hub_cache(cache: &Path, owner: &str, name: &str, tokenizer: &Path) -> String {
    let commit = "0123456789abcdef0123456789abcdef01234567".to_string();
    let repo = cache.join(format!("models--{owner}--{name}"));
    let bytes = fs::read(tokenizer).unwrap();
    let blob = format!("{:x}", Sha256::digest(&bytes));
    fs::create_dir_all(repo.join("blobs")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    let snap = repo.join("snapshots").join(&commit);
    fs::create_dir_all(&snap).unwrap();
    fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join("tokenizer.json")).unwrap();
    #[cfg(not(unix))]
    fs::write(snap.join("tokenizer.json"), &bytes).unwrap();
    fs::write(repo.join("refs/main"), &commit).unwrap();
    commit
}

#[cfg(feature = "hub")]
#[test]
fn hub_tokenizer_from_offline_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, 2);
    let trained = tmp.path().join("trained");
    assert_ok(&prepare(&["-i", p(&corpus), "-o", p(&trained), "--vocab-size", "300"]));
    let cache = tmp.path().join("hf-cache");
    let commit = fake_hub_cache(&cache, "owner", "name", &trained.join("tokenizer.json"));

    let offline =
        |spec: &str, out: &Path| {
            let mut cmd = bin();
            cmd.env("HF_HUB_CACHE", &cache)
                .env("HF_HOME", tmp.path().join("hf-home"))
                .env("HF_HUB_OFFLINE", "1")
                .args(["prepare", "-i", p(&corpus), "-o", p(out), "--tokenizer", spec]);
            run_with_timeout(cmd, Duration::from_secs(60))
        };

    let out = tmp.path().join("hub");
    assert_ok(&offline("hf:owner/name", &out));
    let meta = Meta::load(&out).unwrap();
    assert_eq!(meta.tokenizer_source, format!("hf:owner/name@{commit}"));
    assert_eq!(all_tokens(&out).1, all_tokens(&trained).1);
    assert_eq!(all_tokens(&out).2, all_tokens(&trained).2);

    // Also by explicit revision.
    let out_rev = tmp.path().join("hub-rev");
    assert_ok(&offline(&format!("hf:owner/name@{commit}"), &out_rev));

    // A repo that is not in the cache: a clear error, quickly, no panic.
    let t0 = Instant::now();
    let missing = tmp.path().join("missing");
    assert_refused(
        &offline("hf:owner/absent", &missing),
        &["hf:owner/absent", "not in the Hugging Face cache", "HF_HUB_OFFLINE"],
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(!missing.join("meta.json").exists());
}

#[cfg(not(feature = "hub"))]
#[test]
fn hub_tokenizer_needs_the_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, 1);
    let out = tmp.path().join("out");
    assert_refused(&prepare(&["-i", p(&corpus), "-o", p(&out), "--tokenizer", "hf:owner/name"]), &["`hub` feature"]);
}

/// Full-size check on Moby Dick (run `scripts/fetch_corpus.sh` first):
/// `cargo test --release --test prepare -- --ignored`. `LORS_CORPUS=data/brown` checks another
/// corpus directory (flat, *.txt).
#[test]
#[ignore = "needs data/moby-dick from scripts/fetch_corpus.sh"]
fn moby_dick_round_trip() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join(std::env::var("LORS_CORPUS").unwrap_or("data/moby-dick".into()));
    assert!(corpus.is_dir(), "run scripts/fetch_corpus.sh first");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let t0 = Instant::now();
    assert_ok(&prepare(&["-i", p(&corpus), "-o", p(&out), "--vocab-size", "4096"]));
    eprintln!("prepared {} in {:.2}s", corpus.display(), t0.elapsed().as_secs_f64());
    let meta = Meta::load(&out).unwrap();
    let tok = load_tokenizer(&out.join("tokenizer.json")).unwrap();
    // Each file is a document: decoded, the documents are the files.
    let mut decoded: Vec<String> = ["train", "val"]
        .iter()
        .flat_map(|split| documents(&out, split))
        .map(|d| tok.decode(&d[..d.len() - 1], false).unwrap())
        .collect();
    let mut files: Vec<String> = fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .map(|p| fs::read_to_string(p).unwrap())
        .filter(|t| !t.is_empty())
        .collect();
    files.sort();
    decoded.sort();
    assert_eq!(decoded, files);
    eprintln!("{} train + {} val tokens, vocab {}", meta.train_tokens, meta.val_tokens, meta.vocab_size);
}
