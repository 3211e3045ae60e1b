//! Files of Hugging Face Hub model repos (a tokenizer, a model's config and weights), through
//! hf-hub and its standard cache (behind the `hub` feature). `HF_HUB_OFFLINE=1` (or
//! true/yes/on) uses the cache only; `HF_HUB_CACHE`, `HF_HOME` and `HF_TOKEN` work as in
//! Python. Dataset repos (`prepare --input hf:datasets/…`) are `data::fetch_hub_dataset`.
use std::path::PathBuf;

#[cfg(feature = "hub")]
use anyhow::Context;
use anyhow::{bail, Result};

/// Whether `HF_HUB_OFFLINE` asks for cache-only Hub access (as in Python: 1/true/yes/on).
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// A blocking Hub client for `what` (named in its errors), the cache directory it uses, and
/// whether `HF_HUB_OFFLINE` keeps it to that cache.
#[cfg(feature = "hub")]
pub(crate) fn hub_client(what: &str) -> Result<(hf_hub::HFClientSync, PathBuf, bool)> {
    let setup = || format!("could not set up the Hugging Face Hub client for {what}");
    let client = hf_hub::HFClient::new().with_context(setup)?;
    let cache = client.cache_dir().to_path_buf();
    let client = hf_hub::HFClientSync::from_inner(client).with_context(setup)?;
    Ok((client, cache, hub_offline()))
}

/// Resolves `filename` (e.g. `tokenizer.json`) of a Hub model repo through the standard cache;
/// returns its path and a source string naming the commit.
#[cfg(feature = "hub")]
pub fn fetch_hub_file(owner: &str, name: &str, revision: Option<&str>, filename: &str) -> Result<(PathBuf, String)> {
    let repo_id = format!("{owner}/{name}");
    let (client, cache, offline) = hub_client(&format!("hf:{repo_id}"))?;
    let rev_text = revision.unwrap_or("main");
    eprintln!(
        "hub: resolving hf:{repo_id}@{rev_text} {filename} (cache {}{})",
        cache.display(),
        if offline { ", offline" } else { "" }
    );
    let result = client
        .model(owner, name)
        .download_file()
        .filename(filename)
        .maybe_revision(revision.map(str::to_string))
        .local_files_only(offline)
        .send();
    let path = match result {
        Ok(path) => path,
        Err(hf_hub::HFError::LocalEntryNotFound { .. }) => bail!(
            "hf:{repo_id}@{rev_text}: {filename} is not in the Hugging Face cache at {} and \
             HF_HUB_OFFLINE is set, so it cannot be downloaded; unset HF_HUB_OFFLINE to download it, \
             or point HF_HUB_CACHE/HF_HOME at a cache that holds it",
            cache.display()
        ),
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "could not get {filename} of hf:{repo_id}@{rev_text} (cache {}); check the repo name, \
                     your network and HF_TOKEN, or set HF_HUB_OFFLINE=1 to use the cache only",
                    cache.display()
                )
            })
        }
    };
    // The cache layout is snapshots/<commit>/tokenizer.json: name the commit in the source.
    let commit = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|c| c.len() == 40 && c.chars().all(|ch| ch.is_ascii_hexdigit()));
    let source = match commit {
        Some(c) => format!("hf:{repo_id}@{c}"),
        None => format!("hf:{repo_id}@{rev_text}"),
    };
    Ok((path, source))
}

/// Without the `hub` feature: an error saying how to get the file another way.
#[cfg(not(feature = "hub"))]
pub fn fetch_hub_file(owner: &str, name: &str, _revision: Option<&str>, filename: &str) -> Result<(PathBuf, String)> {
    let _ = hub_offline;
    bail!(
        "hf:{owner}/{name} ({filename}): this lors-lm was built without the `hub` feature; \
         rebuild with default features, or download the files yourself and pass a local path"
    )
}
