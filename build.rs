//! Records the git commit the binary is built from (LORS_LM_GIT_COMMIT), so results written
//! by `lors-lm sweep` name the code that produced them, not whatever is checked out later.
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) => {
            format!("{c} (with uncommitted changes)")
        }
        Some(c) => c,
        None => "unknown (not built from a git checkout)".into(),
    };
    println!("cargo:rustc-env=LORS_LM_GIT_COMMIT={commit}");
    for p in [".git/HEAD", ".git/index", "src", "Cargo.toml", "configs"] {
        println!("cargo:rerun-if-changed={p}");
    }
}
