//! Checkpoints are durable: traced with strace, a real `lors-lm train` fsyncs every file of a
//! checkpoint and the checkpoint's temporary directory itself before renaming it into place,
//! and fsyncs the checkpoints directory after `latest` moves. (An earlier version renamed the
//! temporary directory without syncing it, so a crash could publish a checkpoint whose files'
//! directory entries were not on disk.) The run's config.toml is replaced the same way (temp
//! file, fsync, rename), never rewritten in place. Needs `strace` (CI installs it).

mod common;

use common::{bin, repo};
use std::process::Command;

/// The system calls of `trace` (strace -f output), without the pid prefix.
fn calls(trace: &str) -> Vec<String> {
    trace.lines().map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).trim().to_string()).collect()
}

/// The file descriptor returned by an `openat(...)` of `path` in call `c`, if it is one.
fn opened_fd(c: &str, path: &str) -> Option<String> {
    (c.starts_with("openat(") && c.contains(&format!("\"{path}\""))).then(|| c.rsplit("= ").next().unwrap().to_string())
}

#[test]
fn a_checkpoint_directory_is_synced_before_it_is_renamed_into_place() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "strace is needed for this test: install it (Debian: apt install strace)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens: Vec<u32> = (0..4000u32).map(|i| (i * 7 + i / 13) % 50).collect();
    lors_lm::data::write_prepared_dir(&data, &tokens[..3500], &tokens[3500..], 50, None).unwrap();
    let run = tmp.path().join("run");
    let trace = tmp.path().join("trace");
    let status = Command::new("strace")
        .args(["-f", "-e", "trace=openat,fsync,rename,renameat,renameat2", "-o"])
        .arg(&trace)
        .arg(bin().get_program())
        .args(["train", "--quiet", "--config"])
        .arg(repo("configs/tiny.toml"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .args(["--set", "train.max_steps=2", "--set", "train.warmup_steps=0"])
        .status()
        .unwrap();
    assert!(status.success(), "traced training failed");
    let calls = calls(&std::fs::read_to_string(&trace).unwrap());
    let ckpts = run.join("checkpoints");
    let (tmp_dir, final_dir) = (ckpts.join(".tmp-2"), ckpts.join("2"));
    let rename = calls
        .iter()
        .position(|c| c.starts_with("rename") && c.contains(&format!("\"{}\"", final_dir.display())))
        .unwrap_or_else(|| panic!("no rename to {} in the trace", final_dir.display()));
    // The temporary directory was opened and that descriptor fsynced before the rename.
    let synced_dir = calls[..rename].iter().enumerate().any(|(i, c)| {
        opened_fd(c, &tmp_dir.display().to_string())
            .is_some_and(|fd| calls[i + 1..rename].iter().any(|c| c.starts_with(&format!("fsync({fd})"))))
    });
    assert!(synced_dir, "{} was renamed without an fsync of the directory itself", tmp_dir.display());
    // Every file of the checkpoint was fsynced before the rename.
    for f in ["model.safetensors", "optimizer.safetensors", "state.json", "config.toml"] {
        let path = tmp_dir.join(f).display().to_string();
        let synced = calls[..rename].iter().enumerate().any(|(i, c)| {
            opened_fd(c, &path)
                .is_some_and(|fd| calls[i + 1..rename].iter().any(|c| c.starts_with(&format!("fsync({fd})"))))
        });
        assert!(synced, "{path} was not fsynced before the checkpoint was published");
    }
    // After `latest` moved, the checkpoints directory itself was fsynced.
    let latest = calls
        .iter()
        .rposition(|c| c.starts_with("rename") && c.contains(&format!("\"{}\"", ckpts.join("latest").display())))
        .expect("latest was written");
    let synced_parent = calls[latest..].iter().enumerate().any(|(i, c)| {
        opened_fd(c, &ckpts.display().to_string())
            .is_some_and(|fd| calls[latest + i + 1..].iter().any(|c| c.starts_with(&format!("fsync({fd})"))))
    });
    assert!(synced_parent, "{} was not fsynced after latest moved", ckpts.display());
    // RUN_DIR/config.toml (what a --resume reads) is never written in place: a temp file,
    // fsynced, then renamed over it, so a crash leaves the old file or the new one.
    let (config, config_tmp) = (run.join("config.toml").display().to_string(), run.join(".config.toml.tmp"));
    let written_in_place = calls.iter().any(|c| opened_fd(c, &config).is_some() && c.contains("O_WRONLY"));
    assert!(!written_in_place, "{config} was opened for writing in place");
    let published = calls
        .iter()
        .position(|c| c.starts_with("rename") && c.contains(&format!("\"{config}\"")))
        .unwrap_or_else(|| panic!("no rename to {config} in the trace"));
    let synced_config = calls[..published].iter().enumerate().any(|(i, c)| {
        opened_fd(c, &config_tmp.display().to_string())
            .is_some_and(|fd| calls[i + 1..published].iter().any(|c| c.starts_with(&format!("fsync({fd})"))))
    });
    assert!(synced_config, "{} was not fsynced before it replaced {config}", config_tmp.display());
}
