//! Decay branches: a run that continues another run's checkpoint with its own (shorter)
//! schedule. With `train.schedule = "wsd"` a run of S steps follows a longer run's learning
//! rate exactly until its own decay starts (`train::schedule`), so continuing the longer run's
//! checkpoint at that step (weights, AdamW moments, step count and the batch-sampling RNG)
//! for the decay alone gives the run of S steps, without training its first S − decay steps
//! again. One long run then yields every shorter token budget.
//!
//! [`make`] writes the branch's run directory from the source's: the checkpoint of the
//! starting step (its config replaced by the branch's), the branch's config, the tokenizer and
//! data meta, and the source's metrics up to that step (so the branch's curve, tokens and
//! step time are those of the whole run it stands for). Everything goes into a temporary
//! directory first, renamed into place last: a crash leaves no half branch.

use crate::config::Config;
use crate::train::RunDir;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;

/// Make `dst` the branch of `src` at checkpoint `step`, to be trained with `cfg` (see the
/// module docs). `dst` must not exist.
pub fn make(src: &RunDir, step: usize, dst: &RunDir, cfg: &Config) -> Result<()> {
    if dst.path().exists() {
        bail!("{} already exists: a branch is made into a new directory", dst.path().display());
    }
    let ckpt = src.checkpoint(Some(step))?;
    let parent = dst.path().parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dst.path().file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.branch-tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    let t = RunDir::at(&tmp);
    let write = || -> Result<()> {
        let ck = t.checkpoints_dir().join(step.to_string());
        fs::create_dir_all(&ck)?;
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            fs::copy(ckpt.dir.join(f), ck.join(f))
                .with_context(|| format!("cannot copy {}", ckpt.dir.join(f).display()))?;
        }
        fs::write(ck.join("config.toml"), cfg.to_toml()?)?;
        fs::write(t.checkpoints_dir().join("latest"), step.to_string())?;
        t.write_config(cfg)?;
        for (from, to) in [(src.tokenizer_path(), t.tokenizer_path()), (src.data_meta_path(), t.data_meta_path())] {
            if from.is_file() {
                fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
            }
        }
        // The source's metrics up to the branch point.
        let metrics = fs::read_to_string(src.metrics_path()).unwrap_or_default();
        let kept: String = metrics
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(t.metrics_path(), kept)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot make the branch {} of {}", dst.path().display(), src.path().display())));
    }
    fs::rename(&tmp, dst.path()).with_context(|| format!("cannot move {} into place", tmp.display()))
}
