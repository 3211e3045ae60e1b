//! `lors-lm sweep --smoke` with the real plan (configs/sweep-moby.toml): every configuration ×
//! seed trains a few steps, and the report (results.md with one row per configuration, two PNG
//! charts that decode) comes out; a second call keeps finished runs; bad plans are refused.

mod common;

use common::{bin, repo};

use std::path::Path;

/// Token data with the plan's vocabulary (4096), so parameter counts equal the real sweep's.
fn data(dir: &Path) {
    let mut x: u64 = 7;
    let seq: Vec<u32> = (0..6000)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % 4096) as u32
        })
        .collect();
    lors_lm::data::write_prepared_dir(dir, &seq[..5000], &seq[5000..], 4096, None).unwrap();
}

fn sweep(data: &Path, out: &Path, docs: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .args(["sweep", "--smoke", "--plan"])
        .arg(repo("configs/sweep-moby.toml"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--docs")
        .arg(docs)
        .args(extra)
        .output()
        .expect("run lors-lm")
}

fn decode_png(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{} does not decode as an image: {e}", path.display()));
    let rgb = img.to_rgb8();
    // A chart, not a blank canvas: many distinct colours.
    let mut colours: Vec<[u8; 3]> = rgb.pixels().map(|p| p.0).collect();
    colours.sort();
    colours.dedup();
    assert!(colours.len() > 20, "{} has only {} colours: nothing drawn?", path.display(), colours.len());
    (rgb.width(), rgb.height())
}

#[test]
fn smoke_sweep_writes_a_row_per_configuration_and_the_charts() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, out, docs) = (tmp.path().join("data"), tmp.path().join("runs"), tmp.path().join("docs"));
    data(&d);
    let o = sweep(&d, &out, &docs, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sweep failed:\n{err}");

    let md = std::fs::read_to_string(docs.join("results.md")).unwrap();
    let plan: toml::Table = toml::from_str(&std::fs::read_to_string(repo("configs/sweep-moby.toml")).unwrap()).unwrap();
    let names: Vec<String> =
        plan["run"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names.len(), 9);
    let header: Vec<&str> =
        md.lines().find(|l| l.starts_with("| config |")).expect("a table").split('|').map(str::trim).collect();
    let col =
        |name: &str| header.iter().position(|h| h.starts_with(name)).unwrap_or_else(|| panic!("no column {name}"));
    // 18 columns: | config | mode | sharing | block | total | % | tokens | tokens/param | epochs |
    // FLOPs | loss | ppl | val − train | decode bytes | decode tok/s | tok/s | time | seeds |
    assert_eq!(header.len(), 20, "{header:?}");
    for name in &names {
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with(&format!("| {name} |"))).collect();
        assert_eq!(rows.len(), 1, "one row for {name} in:\n{md}");
        let cells: Vec<&str> = rows[0].split('|').map(str::trim).collect();
        assert_eq!(cells.len(), header.len(), "{}", rows[0]);
        let loss: f64 = cells[col("val loss")].split('±').next().unwrap().trim().parse().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{}", rows[0]);
        assert_eq!(cells[col("seeds")], "2/2", "both seeds ran: {}", rows[0]);
        // 4 steps × 2 × 16 tokens, over 5000 train tokens.
        assert_eq!(cells[col("tokens")], "128", "{}", rows[0]);
        assert_eq!(cells[col("epochs")], "0.03", "{}", rows[0]);
        let decode: f64 = cells[col("decode tok/s")].parse().unwrap();
        assert!(decode > 0.0, "{}", rows[0]);
        let mut gaps = vec![];
        for seed in [1, 2] {
            let dir = out.join(name).join(format!("seed{seed}"));
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
            assert_eq!(v["steps"], 4);
            assert_eq!(v["seed"], seed);
            // A 4-step run: its training loss at the end is the mean over all 4 steps' losses.
            let losses: Vec<f64> = std::fs::read_to_string(dir.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|m| m.get("ms").is_some())
                .map(|m| m["loss"].as_f64().unwrap())
                .collect();
            assert_eq!(losses.len(), 4);
            gaps.push(v["val_loss"].as_f64().unwrap() - losses.iter().sum::<f64>() / 4.0);
        }
        let (mean, spread) = ((gaps[0] + gaps[1]) / 2.0, (gaps[0] - gaps[1]).abs() / 2.0);
        assert_eq!(cells[col("val − train")], format!("{mean:+.4} ± {spread:.4}"), "{}", rows[0]);
    }
    // The parameter columns are the closed-form counts: vanilla is 100 %, LORS r16 fewer.
    let row = |n: &str| md.lines().find(|l| l.starts_with(&format!("| {n} |"))).unwrap().to_string();
    assert!(row("vanilla").contains("| 100.0 % |"), "{}", row("vanilla"));
    assert!(row("lors-r16").contains("| 879232 |"), "{}", row("lors-r16"));
    assert!(md.contains("`lors-r16` − `shared`"), "comparisons listed:\n{md}");
    for chart in ["loss_curves", "params_vs_loss", "flops_vs_loss", "decode_vs_loss"] {
        assert_eq!(decode_png(&docs.join(format!("{chart}.png"))), (1100, 700), "{chart}");
    }
    // The three frontier charts place every finished row, each with both seeds.
    let csv = std::fs::read_to_string(docs.join("frontiers.csv")).unwrap();
    for chart in ["params_vs_loss", "flops_vs_loss", "decode_vs_loss"] {
        let listed: Vec<&str> = csv.lines().filter(|l| l.starts_with(&format!("{chart},"))).collect();
        assert_eq!(listed.len(), names.len(), "{chart}:\n{csv}");
        for name in &names {
            let line = listed.iter().find(|l| l.split(',').nth(1) == Some(name.as_str()));
            assert_eq!(line.and_then(|l| l.split(',').nth(2)), Some("2"), "{chart} {name}:\n{csv}");
        }
        assert!(listed.iter().any(|l| l.ends_with(",true")), "{chart} has a Pareto front");
        assert!(md.contains(&format!("]({chart}.png)")), "{chart} linked from results.md");
    }
    // Hand-written text around the generated block survives a rerun; finished runs are kept.
    std::fs::write(docs.join("results.md"), format!("{md}\n## Reading\nhand-written\n")).unwrap();
    let before = std::fs::read_to_string(out.join("vanilla/seed1/result.json")).unwrap();
    let o = sweep(&d, &out, &docs, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already finished: kept"));
    assert_eq!(std::fs::read_to_string(out.join("vanilla/seed1/result.json")).unwrap(), before);
    let md2 = std::fs::read_to_string(docs.join("results.md")).unwrap();
    assert!(md2.contains("## Reading\nhand-written"), "{md2}");
    assert_eq!(md2.matches("BEGIN GENERATED").count(), 1);

    // A changed plan does not overwrite runs of the old one.
    let plan_text = std::fs::read_to_string(repo("configs/sweep-moby.toml"))
        .unwrap()
        .replace("\"train.max_steps=4\"", "\"train.max_steps=5\"");
    let changed = tmp.path().join("changed.toml");
    std::fs::write(&changed, plan_text).unwrap();
    let o = bin()
        .args(["sweep", "--smoke", "--plan"])
        .arg(&changed)
        .arg("--data")
        .arg(&d)
        .arg("--out")
        .arg(&out)
        .arg("--docs")
        .arg(&docs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("holds a run of a different config"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("vanilla/seed1/result.json")).unwrap(), before);
}

#[test]
fn bad_plans_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    data(&d);
    let base = std::fs::read_to_string(repo("configs/sweep-moby.toml")).unwrap();
    let cases = [
        (base.replace("match = \"lors-r16\"", "match = \"lors-r8\""), "within ±5 %"),
        (base.replace("baseline = \"vanilla\"", "baseline = \"nope\""), "baseline \"nope\""),
        (base.replace("name = \"lors-r32\"", "name = \"lors-r16\""), "appears twice"),
        (base.replace("\"lors.rank=64\"", "\"lors.rank=200\""), "rank 200"),
        (base.replace("seeds = [1, 2]\nbaseline", "seed = [1, 2]\nbaseline"), "seed"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        assert_ne!(text, &base, "case {i} did not change the plan");
        let p = tmp.path().join(format!("plan{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let o = bin()
            .args(["sweep", "--dry-run", "--plan"])
            .arg(&p)
            .arg("--data")
            .arg(&d)
            .arg("--out")
            .arg(tmp.path().join("runs"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} accepted");
        assert!(err.contains(want), "case {i}: expected {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // --report-only with nothing finished says what to do.
    let o = bin()
        .args(["sweep", "--smoke", "--report-only", "--plan"])
        .arg(repo("configs/sweep-moby.toml"))
        .arg("--data")
        .arg(&d)
        .arg("--out")
        .arg(tmp.path().join("empty"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no finished runs"));
}
