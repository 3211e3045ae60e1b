//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The test Python (`.venv-tb` from scripts/setup_tb_venv.sh: tensorboard, numpy, safetensors),
/// from `LORS_LM_TB_PYTHON` or the repo's `.venv-tb`; `None` (test skipped) outside CI.
pub fn tb_python() -> Option<PathBuf> {
    if let Some(python) = std::env::var_os("LORS_LM_TB_PYTHON") {
        return Some(python.into());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-tb/bin/python");
    if venv.exists() {
        return Some(venv);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "no python with tensorboard: CI must run scripts/setup_tb_venv.sh \
             (or set LORS_LM_TB_PYTHON)"
        );
    }
    println!("skipped: no python with tensorboard (run scripts/setup_tb_venv.sh)");
    None
}
