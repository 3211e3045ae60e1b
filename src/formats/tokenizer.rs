//! `tokenizer.json`, the file Hugging Face `tokenizers` writes: loaded with a clear error naming
//! the file, and with the checks that keep a hostile file from panicking inside `tokenizers`.
//! Used by run directories, prepared data directories, Hugging Face model directories and
//! `prepare --tokenizer`.
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;

/// Load a tokenizer.json file with a clear error naming the path.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!(
            "tokenizer file {} does not exist (expected a tokenizer.json written by Hugging Face tokenizers)",
            path.display()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let not_a_tokenizer = |e: String| {
        anyhow::anyhow!(
            "{} is not a tokenizer.json file (expected the JSON written by Hugging Face tokenizers): {e}",
            path.display()
        )
    };
    // JSON syntax first: tokenizers 0.23 panics (`expect("Helper")` in its decoder's
    // Deserialize) on a syntax error met inside the `decoder` object of a streamed document.
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| not_a_tokenizer(e.to_string()))?;
    check_bpe_merges(&value["model"]).map_err(not_a_tokenizer)?;
    serde_json::from_value(value).map_err(|e| not_a_tokenizer(e.to_string()))
}

/// tokenizers 0.23 builds a BPE model's merges assuming each merge's second token is at least
/// as long as `continuing_subword_prefix` (it subtracts the lengths unchecked, then slices):
/// refuse what would panic there.
fn check_bpe_merges(model: &serde_json::Value) -> std::result::Result<(), String> {
    let Some(prefix) = model["continuing_subword_prefix"].as_str() else { return Ok(()) };
    let Some(merges) = model["merges"].as_array() else { return Ok(()) };
    for (i, m) in merges.iter().enumerate() {
        // A merge is "a b" (older files) or ["a", "b"].
        let second = match m {
            serde_json::Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            serde_json::Value::Array(pair) => pair.get(1).and_then(|b| b.as_str()),
            _ => None,
        };
        if let Some(b) = second.filter(|b| b.len() < prefix.len()) {
            return Err(format!(
                "merge {i} joins {b:?}, shorter than the continuing_subword_prefix of {} bytes",
                prefix.len()
            ));
        }
    }
    Ok(())
}
