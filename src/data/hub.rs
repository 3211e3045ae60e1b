//! Dataset repos of the Hugging Face Hub (`prepare --input hf:datasets/…`): their data files,
//! through hf-hub and its standard cache (behind the `hub` feature), `HF_HUB_OFFLINE` honoured
//! as for model repos (`formats::fetch_hub_file`).
// Without the `hub` feature only the spec's parsing is used (to refuse a bad one first).
#![cfg_attr(not(feature = "hub"), allow(dead_code))]
use std::path::PathBuf;

#[cfg(feature = "hub")]
use anyhow::Context;
use anyhow::{bail, Result};

#[cfg(feature = "hub")]
use super::progress;
#[cfg(feature = "hub")]
use crate::formats::hub::hub_client;

/// An `hf:datasets/OWNER/NAME[@REVISION][:CONFIG/SPLIT]` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DatasetSpec {
    pub owner: String,
    pub name: String,
    pub revision: Option<String>,
    /// (config, split)
    pub subset: Option<(String, String)>,
}

const DATASET_FORM: &str =
    "hf:datasets/OWNER/NAME[@REVISION][:CONFIG/SPLIT], e.g. hf:datasets/roneneldan/TinyStories:default/train";

impl DatasetSpec {
    pub(super) fn parse(spec: &str) -> Result<DatasetSpec> {
        let bad = || anyhow::anyhow!("--input {spec}: expected {DATASET_FORM}");
        let rest = spec.strip_prefix("hf:datasets/").ok_or_else(bad)?;
        let (repo, subset) = match rest.split_once(':') {
            Some((repo, subset)) => {
                let (config, split) = subset.split_once('/').ok_or_else(bad)?;
                if config.is_empty() || split.is_empty() || split.contains('/') {
                    return Err(bad());
                }
                (repo, Some((config.to_string(), split.to_string())))
            }
            None => (rest, None),
        };
        let (repo, revision) = match repo.split_once('@') {
            Some((_, "")) => return Err(bad()),
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (repo, None),
        };
        match repo.split('/').collect::<Vec<_>>().as_slice() {
            [owner, name] if !owner.is_empty() && !name.is_empty() => {
                Ok(DatasetSpec { owner: owner.to_string(), name: name.to_string(), revision, subset })
            }
            _ => Err(bad()),
        }
    }

    /// The spec with the revision replaced by `commit`.
    fn pinned(&self, commit: &str) -> String {
        let subset = self.subset.as_ref().map(|(c, s)| format!(":{c}/{s}")).unwrap_or_default();
        format!("hf:datasets/{}/{}@{commit}{subset}", self.owner, self.name)
    }
}

/// Whether a repo file is a data file `prepare` reads.
fn is_data_file(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    [".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst"]
        .iter()
        .any(|e| p.ends_with(e))
}

/// The data files of a dataset repo that `spec` selects, sorted. Without `:CONFIG/SPLIT`: all
/// of them. With it: those under the directory CONFIG (for `default`, the whole repo when it
/// has no such directory), whose path has a directory named SPLIT or a file name starting with
/// `SPLIT-`, `SPLIT_` or `SPLIT.` — the layouts of the Hub's Parquet conversion
/// (`CONFIG/SPLIT/0000.parquet`) and of most dataset repos (`data/SPLIT-00000-of-00004.parquet`).
pub(super) fn select_files(spec: &DatasetSpec, all: &[String]) -> Result<Vec<String>> {
    let mut files: Vec<String> = all.iter().filter(|p| is_data_file(p)).cloned().collect();
    files.sort();
    let repo = format!("hf:datasets/{}/{}", spec.owner, spec.name);
    if files.is_empty() {
        bail!("{repo} has no data files (*.parquet, *.jsonl[.gz|.zst]) here; its files: {}", list(all));
    }
    let Some((config, split)) = &spec.subset else { return Ok(files) };
    let in_config: Vec<String> = files.iter().filter(|p| p.starts_with(&format!("{config}/"))).cloned().collect();
    let in_config = match (in_config.is_empty(), config.as_str()) {
        (false, _) => in_config,
        (true, "default") => files.clone(),
        (true, _) => {
            bail!("{repo} has no data files under {config}/ (config {config:?}); its data files: {}", list(&files))
        }
    };
    let selected: Vec<String> = in_config
        .iter()
        .filter(|p| {
            let parts: Vec<&str> = p.split('/').collect();
            let (dirs, name) = parts.split_at(parts.len() - 1);
            dirs.contains(&split.as_str())
                || ["-", "_", "."].iter().any(|sep| name[0].starts_with(&format!("{split}{sep}")))
        })
        .cloned()
        .collect();
    if selected.is_empty() {
        bail!(
            "{repo}: no data file of config {config:?} belongs to split {split:?}; its data files: {}",
            list(&in_config)
        );
    }
    Ok(selected)
}

fn list(files: &[String]) -> String {
    let mut s = files.iter().take(12).cloned().collect::<Vec<_>>().join(", ");
    if files.len() > 12 {
        s.push_str(&format!(", … ({} in all)", files.len()));
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

/// Resolves an `hf:datasets/…` input through hf-hub's standard cache (downloading the selected
/// files unless `HF_HUB_OFFLINE` is set): the local paths of its data files, sorted, and the
/// spec pinned to the commit read.
#[cfg(feature = "hub")]
pub fn fetch_hub_dataset(spec_text: &str) -> Result<(Vec<PathBuf>, String)> {
    let spec = DatasetSpec::parse(spec_text)?;
    let repo_id = format!("{}/{}", spec.owner, spec.name);
    let (client, cache, offline) = hub_client(&format!("hf:datasets/{repo_id}"))?;
    let rev_text = spec.revision.clone().unwrap_or_else(|| "main".into());
    progress(&format!(
        "resolving hf:datasets/{repo_id}@{rev_text} (cache {}{})",
        cache.display(),
        if offline { ", offline" } else { "" }
    ));
    let repo = client.dataset(spec.owner.clone(), spec.name.clone());
    let snapshot = if offline {
        let dir = repo.snapshot_download().maybe_revision(spec.revision.clone()).local_files_only(true).send();
        match dir {
            Ok(dir) => dir,
            Err(_) => bail!(
                "hf:datasets/{repo_id}@{rev_text} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set, \
                 so it cannot be downloaded; unset HF_HUB_OFFLINE to download it, or point HF_HUB_CACHE/HF_HOME at a \
                 cache that holds it",
                cache.display()
            ),
        }
    } else {
        let listed =
            repo.list_tree().maybe_revision(spec.revision.clone()).recursive(true).send().with_context(|| {
                format!(
                    "could not list hf:datasets/{repo_id}@{rev_text}; check the name, your network and HF_TOKEN, \
                     or set HF_HUB_OFFLINE=1 to use the cache only"
                )
            })?;
        let all: Vec<String> = listed
            .into_iter()
            .filter_map(|e| match e {
                hf_hub::repository::RepoTreeEntry::File { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        let wanted = select_files(&spec, &all)?;
        progress(&format!("downloading {} file(s) of hf:datasets/{repo_id} (cached ones are reused)", wanted.len()));
        repo.snapshot_download()
            .maybe_revision(spec.revision.clone())
            .allow_patterns(wanted)
            .send()
            .with_context(|| format!("could not download hf:datasets/{repo_id}@{rev_text}"))?
    };
    let mut all = Vec::new();
    walk_relative(&snapshot, &snapshot, &mut all)?;
    let files = select_files(&spec, &all)?;
    let commit = snapshot.file_name().map(|c| c.to_string_lossy().into_owned()).unwrap_or(rev_text);
    Ok((files.iter().map(|f| snapshot.join(f)).collect(), spec.pinned(&commit)))
}

/// Without the `hub` feature: an error saying how to read the files another way.
#[cfg(not(feature = "hub"))]
pub fn fetch_hub_dataset(spec_text: &str) -> Result<(Vec<PathBuf>, String)> {
    DatasetSpec::parse(spec_text)?;
    bail!(
        "--input {spec_text}: this lors-lm was built without the `hub` feature; rebuild with default features, \
         or download the dataset's files yourself and pass them (or their directory) as --input"
    )
}

/// Files under `dir`, as paths relative to `root` with `/` separators (symlinks followed).
#[cfg(feature = "hub")]
fn walk_relative(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("could not list {}", dir.display()))?.path();
        if path.is_dir() {
            walk_relative(root, &path, out)?;
        } else if path.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                let parts: Vec<String> =
                    rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_specs() {
        let s = DatasetSpec::parse("hf:datasets/owner/name@refs/convert/parquet:default/train").unwrap();
        assert_eq!((s.owner.as_str(), s.name.as_str()), ("owner", "name"));
        assert_eq!(s.revision.as_deref(), Some("refs/convert/parquet"));
        assert_eq!(s.subset, Some(("default".into(), "train".into())));
        assert_eq!(s.pinned("abc"), "hf:datasets/owner/name@abc:default/train");
        let s = DatasetSpec::parse("hf:datasets/owner/name").unwrap();
        assert_eq!((s.revision, s.subset), (None, None));
        for bad in
            ["hf:owner/name", "hf:datasets/owner", "hf:datasets/o/n@", "hf:datasets/o/n:train", "hf:datasets/o/n/x"]
        {
            assert!(DatasetSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_selection() {
        let files: Vec<String> = [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/validation-00000-of-00001.parquet",
            "sample/10BT/000_00000.parquet",
            "en/train/0000.parquet",
            "en/test/0000.parquet",
        ]
        .map(String::from)
        .to_vec();
        let pick = |spec: &str| select_files(&DatasetSpec::parse(spec).unwrap(), &files);
        assert_eq!(pick("hf:datasets/o/n").unwrap().len(), 6);
        assert_eq!(
            pick("hf:datasets/o/n:default/train").unwrap(),
            ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "en/train/0000.parquet"]
        );
        assert_eq!(pick("hf:datasets/o/n:en/test").unwrap(), ["en/test/0000.parquet"]);
        assert_eq!(pick("hf:datasets/o/n:sample/10BT").unwrap(), ["sample/10BT/000_00000.parquet"]);
        assert!(pick("hf:datasets/o/n:en/validation").unwrap_err().to_string().contains("en/test/0000.parquet"));
        assert!(pick("hf:datasets/o/n:fr/train").is_err());
    }
}
