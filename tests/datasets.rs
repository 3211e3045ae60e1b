//! `lors-lm prepare` on real dataset formats, through the real binary: every input format gives
//! the same token stream, documents end with <|endoftext|> and are split whole and stably,
//! `--bytes` round-trips any bytes, a prepare killed with SIGKILL resumes to byte-identical
//! shards (and refuses to resume with other inputs or another tokenizer), and bad input is
//! refused naming the file and the place, with nothing half-written left.
mod common;

use common::{assert_ok, assert_refused, run_with_timeout};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lors_lm::data::split::{doc_key, fraction_threshold};
use lors_lm::data::{Meta, TokenFile};
use sha2::{Digest, Sha256};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lors-lm"));
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs a command, killing it after two minutes (a hang is a failure).
fn run(cmd: Command) -> Output {
    run_with_timeout(cmd, Duration::from_secs(120))
}

fn prepare(args: &[&str]) -> Output {
    let mut cmd = bin();
    cmd.arg("prepare").args(args);
    run(cmd)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Documents with what breaks naive readers: quotes, backslashes, newlines, tabs, CRLF, NUL,
/// non-ASCII, emoji, `<|endoftext|>` look-alikes; all distinct.
fn docs(n: usize, salt: &str) -> Vec<String> {
    let pieces = [
        "Call me Ishmael. Some years ago—never mind how long precisely—",
        "having \"little\" or no money in my purse,\\ and nothing particular",
        "東京タワーと富士山。你好，世界！ 🐳🐋 Café naïve façade",
        "line one\nline two\r\n\ttabbed\t\tline  with   spaces\n\n",
        "nul\u{0}del\u{7f} bom\u{feff} Ġ Ċ e\u{301} <|endoftext| > end",
    ];
    (0..n)
        .map(|i| {
            format!("{salt}{i}: {}{}", pieces[i % pieces.len()], pieces[(i * 7 + 3) % pieces.len()].repeat(1 + i % 3))
        })
        .collect()
}

fn write_txt_dir(dir: &Path, docs: &[String]) {
    fs::create_dir_all(dir).unwrap();
    for (i, d) in docs.iter().enumerate() {
        fs::write(dir.join(format!("{i:04}.txt")), d).unwrap();
    }
}

fn jsonl(docs: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let line = serde_json::json!({"id": i, "text": d, "meta": {"text": 5, "tags": ["a", {"b": null}]}});
        out.extend(serde_json::to_vec(&line).unwrap());
        out.extend(if i % 2 == 0 { b"\n".as_slice() } else { b"\r\n\n".as_slice() });
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// A Parquet file (the parquet crate's writer): an int64 `id` and an optional UTF-8 column
/// `column`, `rows` rows per row group; None is a null.
fn write_parquet(
    path: &Path,
    docs: &[Option<String>],
    column: &str,
    rows: usize,
    compression: parquet::basic::Compression,
) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = format!("message doc {{ required int64 id; optional binary {column} (UTF8); }}");
    let schema = Arc::new(parquet::schema::parser::parse_message_type(&schema).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
    let mut w = SerializedFileWriter::new(fs::File::create(path).unwrap(), schema, props).unwrap();
    for (g, chunk) in docs.chunks(rows).enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ids: Vec<i64> = (0..chunk.len()).map(|i| (g * rows + i) as i64).collect();
        col.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = chunk.iter().flatten().map(|d| ByteArray::from(d.as_bytes().to_vec())).collect();
        let defs: Vec<i16> = chunk.iter().map(|d| i16::from(d.is_some())).collect();
        col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// A Hugging Face cache holding dataset owner/name at a fixed commit with `files`
/// (repo path, bytes), laid out as the Python and Rust clients do.
fn fake_hf_dataset(cache: &Path, files: &[(&str, Vec<u8>)]) -> String {
    let commit = "89abcdef0123456789abcdef0123456789abcdef".to_string();
    let repo = cache.join("datasets--owner--name");
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::create_dir_all(repo.join("blobs")).unwrap();
    for (rel, bytes) in files {
        let blob = repo.join("blobs").join(format!("{:x}", Sha256::digest(bytes)));
        fs::write(&blob, bytes).unwrap();
        let dest = repo.join("snapshots").join(&commit).join(rel);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &dest).unwrap();
        #[cfg(not(unix))]
        fs::write(&dest, bytes).unwrap();
    }
    fs::write(repo.join("refs/main"), &commit).unwrap();
    commit
}

/// Every document of a split (end-of-text included).
fn documents(dir: &Path, split: &str) -> Vec<Vec<u32>> {
    let meta = Meta::load(dir).unwrap();
    let f = TokenFile::open(dir, split, &meta).unwrap();
    (0..f.documents().unwrap()).map(|i| f.document(i).unwrap()).collect()
}

/// The bytes of a `--bytes` document (ids minus one), its end-of-text checked and dropped.
fn doc_bytes(doc: &[u32]) -> Vec<u8> {
    assert_eq!(doc.last(), Some(&0), "a document must end with <|endoftext|>");
    doc[..doc.len() - 1].iter().map(|&id| u8::try_from(id - 1).unwrap()).collect()
}

/// Every file of a directory, by name, with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// The token files of a prepared directory (shards and meta.json), with their bytes.
fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(dir).into_iter().filter(|(n, _)| n.ends_with(".bin") || n == "meta.json").collect()
}

#[test]
fn every_format_gives_the_same_token_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let all = docs(60, "doc ");
    write_txt_dir(&t.join("txt"), &all);
    // A tokenizer trained once, then given to every run.
    let first = t.join("first");
    assert_ok(&prepare(&["-i", p(&t.join("txt")), "-o", p(&first), "--vocab-size", "320"]));
    let tok = first.join("tokenizer.json");

    let lines = jsonl(&all);
    fs::write(t.join("all.jsonl"), &lines).unwrap();
    fs::write(t.join("all.jsonl.gz"), gzip(&lines)).unwrap();
    fs::write(t.join("all.jsonl.zst"), zstd(&lines)).unwrap();
    let some: Vec<Option<String>> = all.iter().cloned().map(Some).collect();
    write_parquet(&t.join("all.parquet"), &some, "text", 7, parquet::basic::Compression::SNAPPY);
    // Half as JSON lines, half as a Parquet file with another column name.
    fs::write(t.join("half.ndjson"), jsonl(&all[..30])).unwrap();
    write_parquet(&t.join("half.parquet"), &some[30..], "content", 8, parquet::basic::Compression::UNCOMPRESSED);
    // A Hugging Face dataset repo: two zstd Parquet shards of the train split, a test split
    // and a README that must not be read.
    let zstd_pq = parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::default());
    write_parquet(&t.join("hf0.parquet"), &some[..25], "text", 10, zstd_pq);
    write_parquet(&t.join("hf1.parquet"), &some[25..], "text", 10, zstd_pq);
    write_parquet(&t.join("hf-test.parquet"), &[Some("not train".to_string())], "text", 10, zstd_pq);
    let cache = t.join("hf-cache");
    let commit = fake_hf_dataset(
        &cache,
        &[
            ("README.md", b"# a dataset".to_vec()),
            ("default/train/0000.parquet", fs::read(t.join("hf0.parquet")).unwrap()),
            ("default/train/0001.parquet", fs::read(t.join("hf1.parquet")).unwrap()),
            ("default/test/0000.parquet", fs::read(t.join("hf-test.parquet")).unwrap()),
        ],
    );

    let common = ["--tokenizer", p(&tok), "--val-fraction", "0.2", "--shard-tokens", "500"];
    let runs: Vec<(&str, Vec<String>)> = vec![
        ("txt", vec![p(&t.join("txt")).into()]),
        ("jsonl", vec![p(&t.join("all.jsonl")).into()]),
        ("gz", vec![p(&t.join("all.jsonl.gz")).into()]),
        ("zst", vec![p(&t.join("all.jsonl.zst")).into()]),
        ("parquet", vec![p(&t.join("all.parquet")).into()]),
        ("hf", vec!["hf:datasets/owner/name:default/train".into()]),
    ];
    let mut reference: Option<Vec<(String, Vec<u8>)>> = None;
    for (name, inputs) in &runs {
        let out = t.join(format!("out-{name}"));
        let mut cmd = bin();
        cmd.arg("prepare").arg("--input").args(inputs).args(["--out", p(&out)]).args(common);
        cmd.env("HF_HUB_CACHE", &cache).env("HF_HOME", t.join("hf-home")).env("HF_HUB_OFFLINE", "1");
        assert_ok(&run(cmd));
        let files = outputs(&out);
        let bins: Vec<_> = files.iter().filter(|(n, _)| n.ends_with(".bin")).cloned().collect();
        assert!(bins.len() >= 3, "{name}: {:?}", bins.iter().map(|b| &b.0).collect::<Vec<_>>());
        match &reference {
            None => reference = Some(bins),
            Some(r) => assert!(r == &bins, "{name}: the shards differ from the text files'"),
        }
        let meta = Meta::load(&out).unwrap();
        assert_eq!(meta.train_documents + meta.val_documents, 60, "{name}");
    }
    let meta = Meta::load(&t.join("out-hf")).unwrap();
    assert_eq!(meta.inputs, [format!("hf:datasets/owner/name@{commit}:default/train")]);
    assert_eq!(meta.files.len(), 2);
    // Mixed inputs, one field name each: the same stream again.
    let out = t.join("out-mixed");
    let (half_json, half_pq) = (t.join("half.ndjson"), t.join("half.parquet"));
    let half = [p(&half_json), p(&half_pq)];
    let refused = prepare(&[&["-i"][..], &half, &["-o", p(&out)], &common].concat());
    assert_refused(&refused, &["half.parquet", "has no column \"text\"", "content", "--text-field"]);
    assert!(!out.exists());
    let content_lines: Vec<u8> =
        String::from_utf8(jsonl(&all[..30])).unwrap().replace("\"text\":", "\"content\":").into_bytes();
    fs::write(t.join("half.ndjson"), content_lines).unwrap();
    assert_ok(&prepare(&[&["-i"][..], &half, &["-o", p(&out), "--text-field", "content"], &common].concat()));
    let bins: Vec<_> = outputs(&out).into_iter().filter(|(n, _)| n.ends_with(".bin")).collect();
    assert!(reference.as_ref() == Some(&bins), "mixed inputs: the shards differ");
}

#[test]
fn documents_end_with_eos_and_the_split_is_whole_stable_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let first = docs(300, "a ");
    fs::write(t.join("first.jsonl"), jsonl(&first)).unwrap();
    let split_of = |out: &Path| -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let train = documents(out, "train").iter().map(|d| doc_bytes(d)).collect();
        let val = documents(out, "val").iter().map(|d| doc_bytes(d)).collect();
        (train, val)
    };
    let one = t.join("one");
    assert_ok(&prepare(&["-i", p(&t.join("first.jsonl")), "-o", p(&one), "--bytes", "--shard-tokens", "3000"]));
    let (train, val) = split_of(&one);
    // Every document once, whole; none inside another's tokens (ids 1..=256 are bytes, 0 only at ends).
    for d in documents(&one, "train").iter().chain(&documents(&one, "val")) {
        assert!(!d[..d.len() - 1].contains(&0));
    }
    let mut seen: Vec<Vec<u8>> = train.iter().chain(&val).cloned().collect();
    seen.sort();
    let mut expected: Vec<Vec<u8>> = first.iter().map(|d| d.as_bytes().to_vec()).collect();
    expected.sort();
    assert_eq!(seen, expected);
    // The validation documents are those whose seeded hash is below the fraction.
    let t10 = fraction_threshold(0.1);
    for d in &val {
        assert!(doc_key(0, d) < t10 && !train.contains(d));
    }
    for d in &train {
        assert!(doc_key(0, d) >= t10);
    }
    assert!((10..=60).contains(&val.len()), "{} validation documents", val.len());

    // Appending documents moves none of the first ones.
    let more = [first.clone(), docs(200, "b ")].concat();
    fs::write(t.join("more.jsonl"), jsonl(&more)).unwrap();
    let two = t.join("two");
    assert_ok(&prepare(&["-i", p(&t.join("more.jsonl")), "-o", p(&two), "--bytes"]));
    let (train2, val2) = split_of(&two);
    let old = |v: &Vec<Vec<u8>>| -> Vec<Vec<u8>> { v.iter().filter(|d| expected.contains(d)).cloned().collect() };
    assert_eq!(old(&val2), val);
    assert_eq!(old(&train2), train);
    assert!(val2.len() > val.len());

    // --val-docs N: the N smallest hashes; another --split-seed, another split.
    let three = t.join("three");
    assert_ok(&prepare(&["-i", p(&t.join("first.jsonl")), "-o", p(&three), "--bytes", "--val-docs", "7"]));
    let (_, val3) = split_of(&three);
    let mut keys: Vec<u64> = first.iter().map(|d| doc_key(0, d.as_bytes())).collect();
    keys.sort();
    let mut got: Vec<u64> = val3.iter().map(|d| doc_key(0, d)).collect();
    got.sort();
    assert_eq!(got, keys[..7]);
    let four = t.join("four");
    assert_ok(&prepare(&["-i", p(&t.join("first.jsonl")), "-o", p(&four), "--bytes", "--split-seed", "9"]));
    assert_ne!(split_of(&four).1, val);
    let meta = Meta::load(&four).unwrap();
    assert_eq!((meta.split_seed, meta.val_fraction, meta.byte_level), (Some(9), Some(0.1), true));
}

#[test]
fn bytes_mode_round_trips_any_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let corpus = t.join("corpus");
    fs::create_dir_all(&corpus).unwrap();
    // Not UTF-8 at all, and a file of 9 MiB (read in pieces, spanning shards) with every byte.
    let small: Vec<u8> = vec![0xff, 0xfe, 0x00, b'a', 0xc3, 0x28, b'\n', 0x80];
    let big: Vec<u8> = (0..9u64 << 20).map(|i| ((i * 2654435761) >> 13) as u8 ^ (i as u8)).collect();
    fs::write(corpus.join("a.txt"), &small).unwrap();
    fs::write(corpus.join("b.txt"), &big).unwrap();
    fs::write(corpus.join("c.txt"), "plain text ✓\n").unwrap();
    let out = t.join("out");
    assert_ok(&prepare(&["-i", p(&corpus), "-o", p(&out), "--bytes", "--val-docs", "1", "--shard-tokens", "1000000"]));
    let meta = Meta::load(&out).unwrap();
    assert_eq!((meta.vocab_size, meta.byte_level, meta.eos_id), (257, true, Some(0)));
    assert!(meta.tokenizer_source.starts_with("bytes"), "{}", meta.tokenizer_source);
    // The 9 MiB file is read in 4 MiB pieces; a shard closes at the first piece end past 1M tokens.
    assert!(meta.shards.train.len() + meta.shards.val.len() >= 4, "{:?}", meta.shards);
    let mut got: Vec<Vec<u8>> =
        ["train", "val"].iter().flat_map(|s| documents(&out, s)).map(|d| doc_bytes(&d)).collect();
    got.sort();
    let mut want = vec![small, big, "plain text ✓\n".as_bytes().to_vec()];
    want.sort();
    assert!(got == want, "the documents do not round-trip");
    // The tokenizer.json written encodes and decodes text as the ids say.
    let tok = lors_lm::formats::load_tokenizer(&out.join("tokenizer.json")).unwrap();
    let ids = tok.encode("plain text ✓\n", false).unwrap().get_ids().to_vec();
    let bytes: Vec<u32> = "plain text ✓\n".bytes().map(|b| b as u32 + 1).collect();
    assert_eq!(ids, bytes);
    assert_eq!(tok.decode(&ids, false).unwrap(), "plain text ✓\n");
    // Without --bytes the same corpus is refused (not UTF-8), naming the file and the place.
    assert_refused(
        &prepare(&["-i", p(&corpus), "-o", p(&t.join("x"))]),
        &["a.txt", "not valid UTF-8", "byte offset 0", "--bytes"],
    );
}

#[test]
fn sigkill_then_resume_gives_identical_shards_and_other_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let corpus = t.join("corpus.jsonl");
    fs::write(&corpus, jsonl(&docs(20000, "doc "))).unwrap();
    let tok_dir = t.join("tok");
    let small = t.join("small.jsonl");
    fs::write(&small, jsonl(&docs(300, "doc "))).unwrap();
    assert_ok(&prepare(&["-i", p(&small), "-o", p(&tok_dir), "--vocab-size", "400"]));
    let tok = tok_dir.join("tokenizer.json");
    let args = |out: &Path, resume: bool| -> Command {
        let mut c = bin();
        c.args(["prepare", "-i", p(&corpus), "-o", p(out), "--tokenizer", p(&tok), "--shard-tokens", "20000"]);
        if resume {
            c.arg("--resume");
        }
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let full = t.join("full");
    assert!(args(&full, false).status().unwrap().success());
    let reference = snapshot(&full);
    assert!(reference.iter().filter(|(n, _)| n.starts_with("train-")).count() >= 10);

    // Kill it at moments spread over the run, resuming each time.
    let killed = t.join("killed");
    let mut rng = lors_lm::rng::Rng::new(7);
    let (mut kills, mut done, mut refusals_checked) = (0, false, false);
    for attempt in 0..30 {
        if kills == 6 {
            break;
        }
        let mut child = args(&killed, attempt > 0).spawn().unwrap();
        // Wait for a shard beyond those already there, then a random moment more.
        let have = if killed.exists() { fs::read_dir(&killed).unwrap().count() } else { 0 };
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none()
            && t0.elapsed() < Duration::from_secs(20)
            && (!killed.exists() || fs::read_dir(&killed).unwrap().count() <= have + 1)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(rng.below(30)));
        if child.try_wait().unwrap().is_some() {
            done = true;
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if killed.join("meta.json").exists() {
            done = true;
            break;
        }
        if kills == 3 {
            // An unfinished run: a resume with other inputs, tokenizer or shard size is refused
            // and changes nothing.
            let before = snapshot(&killed);
            if killed.join("prepare-state.json").exists() {
                let other = t.join("other.jsonl");
                fs::write(&other, jsonl(&docs(5, "other "))).unwrap();
                let cases: Vec<(Vec<&str>, &[&str])> = vec![
                    (vec!["-i", p(&corpus), p(&other)], &["--resume", "--input"]),
                    (vec!["-i", p(&corpus), "--vocab-size", "300"], &["--resume", "tokenizer"]),
                    (vec!["-i", p(&corpus), "--tokenizer", p(&tok), "--shard-tokens", "30000"], &["--shard-tokens"]),
                    (vec!["-i", p(&corpus), "--tokenizer", p(&tok), "--val-fraction", "0.3"], &["split"]),
                ];
                for (extra, needles) in cases {
                    let out = prepare(&[&extra[..], &["-o", p(&killed), "--resume"]].concat());
                    assert_refused(&out, needles);
                    assert!(snapshot(&killed) == before, "a refused resume changed {}", killed.display());
                }
                // Another tokenizer file of the same name.
                let moved = t.join("tok-moved.json");
                fs::copy(&tok, &moved).unwrap();
                let mut json: serde_json::Value = serde_json::from_slice(&fs::read(&tok).unwrap()).unwrap();
                json["model"]["merges"].as_array_mut().unwrap().truncate(10);
                fs::write(&tok, serde_json::to_vec(&json).unwrap()).unwrap();
                let same = ["-o", p(&killed), "--tokenizer", p(&tok), "--shard-tokens", "20000", "--resume"];
                let refused = prepare(&[&["-i", p(&corpus)][..], &same].concat());
                assert_refused(&refused, &["--resume", "tokenizer"]);
                fs::copy(&moved, &tok).unwrap();
                assert!(snapshot(&killed) == before);
                // A changed input.
                let saved = fs::read(&corpus).unwrap();
                fs::write(&corpus, [&saved[..], b"{\"text\": \"one more\"}\n"].concat()).unwrap();
                let refused = prepare(&[&["-i", p(&corpus)][..], &same].concat());
                assert_refused(&refused, &["--resume", "changed", "corpus.jsonl"]);
                fs::write(&corpus, saved).unwrap();
                assert!(snapshot(&killed) == before);
                refusals_checked = true;
            }
        }
    }
    if !done {
        assert!(args(&killed, true).status().unwrap().success());
    }
    assert!(kills >= 3, "only {kills} kills landed mid-run");
    assert!(refusals_checked, "the third kill left no unfinished run to try resumes on");
    assert!(snapshot(&killed) == reference, "the resumed run's files differ from the uninterrupted run's");
}

#[test]
fn bad_input_is_refused_naming_the_place() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let good = r#"{"text": "a good document"}"#;
    let w = |name: &str, bytes: &[u8]| -> String {
        fs::write(t.join(name), bytes).unwrap();
        p(&t.join(name)).to_string()
    };
    let lines = |ls: &[&str]| ls.join("\n").into_bytes();
    let many: Vec<String> = docs(400, "x ");
    let big = jsonl(&many);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (w("a.jsonl", &lines(&[good, good, "{\"text\": \"unterminated}"])), vec!["a.jsonl", "line 3", "invalid JSON"]),
        (
            w("b.jsonl", &lines(&[good, r#"{"body": "x", "id": 2}"#])),
            vec!["b.jsonl", "line 2", "no \"text\" field", "body, id"],
        ),
        (w("c.jsonl", &lines(&[r#"{"text": ["a"]}"#])), vec!["c.jsonl", "line 1", "is an array, not a string"]),
        (w("d.jsonl", &lines(&[r#"{"text": null}"#])), vec!["d.jsonl", "line 1", "null, not a string"]),
        (
            w("e.jsonl", &[br#"{"text": "ok"}"#.as_slice(), b"\n{\"text\": \"bad \xff byte\"}"].concat()),
            vec!["e.jsonl", "line 2", "not valid UTF-8", "--lossy"],
        ),
        (w("f.jsonl", &lines(&[good, "[1, 2]"])), vec!["f.jsonl", "line 2", "not a JSON object"]),
        (w("g.jsonl.gz", &gzip(&big)[..gzip(&big).len() / 2]), vec!["g.jsonl.gz", "gzip"]),
        (w("h.jsonl.zst", &zstd(&big)[..zstd(&big).len() / 2]), vec!["h.jsonl.zst", "zstd"]),
        (w("i.jsonl.gz", b"not gzip at all"), vec!["i.jsonl.gz", "gzip"]),
        (w("empty.jsonl", b"\n\n  \n{\"text\": \"\"}\n"), vec!["no text found", "--input"]),
    ];
    // Parquet: no such column; a null text in the second row group.
    let pq = t.join("nocol.parquet");
    write_parquet(&pq, &[Some("x".into())], "body", 10, parquet::basic::Compression::SNAPPY);
    let nulls = t.join("nulls.parquet");
    write_parquet(
        &nulls,
        &[Some("a".into()), Some("b".into()), Some("c".into()), None],
        "text",
        2,
        parquet::basic::Compression::SNAPPY,
    );
    let notpq = w("junk.parquet", b"PAR1 not really");
    let mut cases = cases;
    cases.push((p(&pq).into(), vec!["nocol.parquet", "has no column \"text\"", "body", "--text-field"]));
    cases.push((p(&nulls).into(), vec!["nulls.parquet", "row group 1, row 1", "null"]));
    cases.push((notpq, vec!["junk.parquet", "not a readable Parquet file"]));
    for (i, (input, needles)) in cases.iter().enumerate() {
        let out = t.join(format!("out{i}"));
        let res = prepare(&["-i", input, "-o", p(&out), "--bytes"]);
        assert_refused(&res, needles);
        assert!(!out.exists(), "{input}: something was written to {}", out.display());
    }

    // Shards: a wrong magic, a token count that does not match the size.
    let data = t.join("data");
    fs::write(t.join("ok.jsonl"), jsonl(&many)).unwrap();
    assert_ok(&prepare(&["-i", p(&t.join("ok.jsonl")), "-o", p(&data), "--bytes"]));
    let meta = Meta::load(&data).unwrap();
    let shard = data.join(&meta.shards.train[0].file);
    let bytes = fs::read(&shard).unwrap();
    let mut wrong = bytes.clone();
    wrong[..8].copy_from_slice(b"NOTTOKEN");
    fs::write(&shard, &wrong).unwrap();
    let err = format!("{:#}", TokenFile::open(&data, "train", &meta).unwrap_err());
    assert!(err.contains("train-00000.bin") && err.contains("wrong magic"), "{err}");
    let mut wrong = bytes.clone();
    wrong[16..24].copy_from_slice(&(meta.train_tokens + 1).to_le_bytes());
    fs::write(&shard, &wrong).unwrap();
    let err = format!("{:#}", TokenFile::open(&data, "train", &meta).unwrap_err());
    assert!(err.contains("train-00000.bin") && err.contains("header says"), "{err}");
    // The trainer refuses it too, naming the shard.
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml");
    let mut cmd = bin();
    cmd.args(["train", "--config", cfg, "--data", p(&data), "--out", p(&t.join("run"))]);
    let out = run(cmd);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("train-00000.bin"));
}

/// Old data directories (train.bin/val.bin, format 1) still train.
#[test]
fn an_old_directory_still_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let tokens: Vec<u32> = (0..6000u64).map(|i| ((i * 2654435761) >> 7) as u32 % 50).collect();
    lors_lm::data::write_tokens(&data.join("train.bin"), &tokens[..5000], "u16").unwrap();
    lors_lm::data::write_tokens(&data.join("val.bin"), &tokens[5000..], "u16").unwrap();
    let meta = r#"{"vocab_size": 50, "dtype": "u16", "train_tokens": 5000, "val_tokens": 1000, "bos_id": null,
        "eos_id": null, "tokenizer_source": "synthetic", "files": [], "format_version": 1}"#;
    fs::write(data.join("meta.json"), meta).unwrap();
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.toml");
    let mut cmd = bin();
    cmd.args(["train", "--quiet", "--config", cfg, "--data", p(&data), "--out", p(&tmp.path().join("run"))]);
    cmd.args(["--set", "train.max_steps=6"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_tokenizer_sample_spreads_over_the_whole_corpus() {
    // The first half of the corpus is written in one made-up language, the second in another:
    // a sample of a third of the corpus taken from its start would see only the first.
    let tmp = tempfile::tempdir().unwrap();
    let words = |lang: &[&str], i: usize| -> String {
        (0..60).map(|j| lang[(i * 7 + j * 3) % lang.len()]).collect::<Vec<_>>().join(" ")
    };
    let first = ["qwertyu", "asdfghj", "poiuytr", "lkjhgfd"];
    let second = ["zxcvbnm", "mnbvcxz", "vbnmzxc", "cxzvbnm"];
    let docs: Vec<String> = (0..200).map(|i| if i < 100 { words(&first, i) } else { words(&second, i) }).collect();
    let input = tmp.path().join("corpus.jsonl");
    fs::write(&input, jsonl(&docs)).unwrap();
    let total: usize = docs.iter().map(String::len).sum();
    let limit = (total / 3).to_string();
    let out = tmp.path().join("data");
    assert_ok(&prepare(&[
        "--input",
        p(&input),
        "--out",
        p(&out),
        "--vocab-size",
        "400",
        "--tokenizer-sample-bytes",
        &limit,
    ]));
    let meta = Meta::load(&out).unwrap();
    let used = meta.tokenizer_sample_bytes.unwrap();
    assert!(
        used <= total as u64 / 3 + 500 && used >= total as u64 / 6,
        "sample of {used} bytes for a limit of {limit}"
    );
    assert!(meta.tokenizer_source.contains("spread over the corpus"), "{}", meta.tokenizer_source);
    let tok: serde_json::Value = serde_json::from_slice(&fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
    let vocab: Vec<&String> = tok["model"]["vocab"].as_object().unwrap().keys().collect();
    for lang in [first, second] {
        assert!(
            lang.iter().any(|w| vocab.iter().any(|t| t.trim_start_matches('Ġ') == *w)),
            "no whole word of {lang:?} in the vocabulary: the sample missed that part of the corpus"
        );
    }
}

/// A minimal Hugging Face Hub over HTTP on 127.0.0.1 for one dataset repo `owner/name` at
/// commit `commit`: the revision, tree and resolve endpoints hf-hub calls. Returns the
/// endpoint URL, the request lines it served, and a switch that stops it.
fn mock_hub(
    commit: &'static str,
    files: Vec<(String, Vec<u8>)>,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (log, stop) = (Arc::new(std::sync::Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
    let (log2, stop2) = (log.clone(), stop.clone());
    let files = Arc::new(files);
    std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let (log, files) = (log2.clone(), files.clone());
            std::thread::spawn(move || {
                stream.set_nonblocking(false).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut parts = line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                log.lock().unwrap().push(format!("{method} {target}"));
                let path = target.split('?').next().unwrap().to_string();
                let tree = files
                    .iter()
                    .map(|(p, b)| {
                        serde_json::json!({"type": "file", "oid": format!("{:x}", Sha256::digest(b))[..40].to_string(),
                                           "size": b.len(), "path": p})
                    })
                    .collect::<Vec<_>>();
                let (status, headers, body): (&str, Vec<(String, String)>, Vec<u8>) = if path
                    == "/api/datasets/owner/name/revision/main"
                {
                    ("200 OK", vec![], serde_json::json!({"id": "owner/name", "sha": commit}).to_string().into_bytes())
                } else if path == "/api/datasets/owner/name/tree/main"
                    || path == format!("/api/datasets/owner/name/tree/{commit}")
                {
                    ("200 OK", vec![], serde_json::Value::Array(tree).to_string().into_bytes())
                } else if let Some((_, b)) = ["main", commit].iter().find_map(|rev| {
                    let rel = path.strip_prefix(&format!("/datasets/owner/name/resolve/{rev}/"))?;
                    files.iter().find(|(p, _)| p == rel)
                }) {
                    let h = vec![
                        ("ETag".into(), format!("\"{:x}\"", Sha256::digest(b))),
                        ("X-Repo-Commit".into(), commit.into()),
                    ];
                    ("200 OK", h, b.clone())
                } else {
                    ("404 Not Found", vec![], b"{\"error\":\"not found\"}".to_vec())
                };
                let mut out = stream;
                let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = out.write_all(head.as_bytes());
                if method != "HEAD" {
                    let _ = out.write_all(&body);
                }
            });
        }
    });
    (endpoint, log, stop)
}

#[test]
fn an_hf_dataset_is_downloaded_into_the_hub_cache_then_read_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let all = docs(40, "hub doc ");
    let some: Vec<Option<String>> = all.iter().cloned().map(Some).collect();
    let zstd_pq = parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::default());
    write_parquet(&t.join("all.parquet"), &some, "text", 10, zstd_pq);
    write_parquet(&t.join("hf0.parquet"), &some[..15], "text", 10, zstd_pq);
    write_parquet(&t.join("hf1.parquet"), &some[15..], "text", 10, zstd_pq);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let (endpoint, log, stop) = mock_hub(
        commit,
        vec![
            ("README.md".into(), b"# a dataset".to_vec()),
            ("default/train/0000.parquet".into(), fs::read(t.join("hf0.parquet")).unwrap()),
            ("default/train/0001.parquet".into(), fs::read(t.join("hf1.parquet")).unwrap()),
            ("default/test/0000.parquet".into(), gzip(b"never read")),
        ],
    );
    let common = ["--bytes", "--val-fraction", "0.2"];
    let reference = t.join("out-local");
    assert_ok(&prepare(&[&["-i", p(&t.join("all.parquet")), "-o", p(&reference)][..], &common].concat()));
    let bins = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        outputs(dir).into_iter().filter(|(n, _)| n.ends_with(".bin")).collect()
    };

    let (cache, spec) = (t.join("hf-cache"), "hf:datasets/owner/name:default/train");
    let hub_prepare = |out: &Path, offline: bool| {
        let mut cmd = bin();
        cmd.arg("prepare").args(["-i", spec, "-o", p(out)]).args(common);
        cmd.env("HF_ENDPOINT", &endpoint).env("HF_HUB_CACHE", &cache).env("HF_HOME", t.join("hf-home"));
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        }
        run(cmd)
    };
    // Online: the selected split's shards are downloaded into the standard cache layout.
    let online = t.join("out-online");
    assert_ok(&hub_prepare(&online, false));
    assert!(
        bins(&online) == bins(&reference),
        "the downloaded dataset gives other shards than the same documents read locally"
    );
    let meta = Meta::load(&online).unwrap();
    assert_eq!(meta.inputs, [format!("hf:datasets/owner/name@{commit}:default/train")]);
    let got: Vec<String> = log.lock().unwrap().iter().filter(|l| l.starts_with("GET /datasets/")).cloned().collect();
    assert_eq!(got.len(), 2, "only the train split's two files are downloaded: {got:?}");
    assert!(got.iter().all(|l| l.contains("/default/train/")), "{got:?}");
    let snapshot = cache.join("datasets--owner--name/snapshots").join(commit).join("default/train/0001.parquet");
    assert_eq!(fs::read(&snapshot).unwrap(), fs::read(t.join("hf1.parquet")).unwrap());
    assert_eq!(fs::read_to_string(cache.join("datasets--owner--name/refs/main")).unwrap().trim(), commit);

    // The Hub gone: offline reads the cache and gives the same shards; online says what failed.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    let offline = t.join("out-offline");
    assert_ok(&hub_prepare(&offline, true));
    assert!(bins(&offline) == bins(&reference));
    let failed = hub_prepare(&t.join("out-down"), false);
    assert_refused(&failed, &["hf:datasets/owner/name", "HF_HUB_OFFLINE=1"]);
    assert!(!t.join("out-down").join("meta.json").exists());
}
