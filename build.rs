//! Records the git commit the binary is built from (LORS_LM_GIT_COMMIT), so results written
//! by `lors-lm sweep` name the code that produced them, not whatever is checked out later.
//!
//! It reruns when HEAD moves (the HEAD file and the ref it names, in a clone or a worktree)
//! or the sources change; not on every change of git's index, which `git status` and `git add`
//! rewrite and which would otherwise recompile the crate after every git command.
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
    let mut watched = vec!["src".to_string(), "Cargo.toml".into(), "configs".into()];
    // HEAD and the branch ref it points to (`git rev-parse --git-path` works in worktrees too).
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        watched.push(head);
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])) {
        watched.push(r);
    }
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        watched.push(packed);
    }
    for p in watched {
        println!("cargo:rerun-if-changed={p}");
    }
}
