//! The tokenizer inside a GGUF file, both ways, for byte-level BPE tokenizers (GPT-2 style:
//! llama.cpp's `tokenizer.ggml.model = "gpt2"`).
//!
//! * Export: the vocabulary (ordered by id, holes filled with `[PAD{id}]` tokens of type
//!   UNUSED), the token types (CONTROL for special added tokens), the merges, BOS/EOS, and
//!   `tokenizer.ggml.pre`, the name under which llama.cpp knows the pre-tokenizer's split
//!   rules. Two are supported, each checked against llama.cpp's own tokenizer by
//!   `scripts/check_llamacpp.sh`: `gpt-2` (the ByteLevel regex, no prefix space: what
//!   `lors-lm prepare` trains) and `smollm` (digits split one by one, then the same regex:
//!   SmolLM2's tokenizer).
//! * Import: candle's `TokenizerFromGguf` builds the BPE model, its merges and special
//!   tokens; it gives every pre-tokenizer name it does not know a ByteLevel pre-tokenizer
//!   *with* a prefix space (so " Hello" and "Hello" would tokenize alike, unlike llama.cpp),
//!   so the pre-tokenizer is replaced here by the one the name stands for.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The pre-tokenizer names both sides support.
const SUPPORTED_PRE: &str =
    "gpt-2 (the GPT-2 ByteLevel regex without a prefix space) and smollm (single digits, then that regex)";

/// llama.cpp's name for a tokenizer.json pre-tokenizer, if it is one we can name.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let byte_level = |p: &Json| {
        p["type"] == "ByteLevel" && p["add_prefix_space"] == Json::Bool(false) && p["use_regex"] != Json::Bool(false)
    };
    match pre["type"].as_str()? {
        "ByteLevel" if byte_level(pre) => Some("gpt-2"),
        "Sequence" => match pre["pretokenizers"].as_array()?.as_slice() {
            [digits, bl] if digits["type"] == "Digits" && digits["individual_digits"] == true && byte_level(bl) => {
                Some("smollm")
            }
            _ => None,
        },
        _ => None,
    }
}

/// The pre-tokenizer a llama.cpp name stands for.
fn pre_tokenizer(name: &str) -> Option<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match name {
        "gpt-2" => Some(byte_level.into()),
        "smollm" => Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()),
        _ => None,
    }
}

/// The `tokenizer.ggml.*` metadata of `tok` for a model over `vocab_size` ids.
pub(super) fn tokenizer_metadata(
    tok: &Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Vec<(String, Value)>> {
    let json: Json = serde_json::from_str(
        &tok.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?,
    )?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!("the tokenizer is a {} model: GGUF export supports byte-level BPE tokenizers only", model["type"]);
    }
    if !json["normalizer"].is_null() {
        bail!("the tokenizer has a normalizer ({}): llama.cpp's gpt2 tokenizer has none", json["normalizer"]["type"]);
    }
    let pre = pre_name(&json["pre_tokenizer"]).with_context(|| {
        format!(
            "the tokenizer's pre-tokenizer {} has no llama.cpp counterpart that lors-lm can name (supported: {SUPPORTED_PRE})",
            json["pre_tokenizer"]
        )
    })?;
    let (tokens, types) = vocabulary(&json, vocab_size)?;
    let merges = merges(&model["merges"])?;
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
        // lors-lm models are trained on the raw token stream: no BOS/EOS is added to a prompt.
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ];
    for (key, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    Ok(out)
}

/// Tokens by id (`vocab_size` of them) and their llama.cpp types.
fn vocabulary(json: &Json, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>)> {
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let vocab = json["model"]["vocab"].as_object().context("the tokenizer's BPE model has no vocab")?;
    let added = json["added_tokens"].as_array().into_iter().flatten().map(|t| {
        let kind = if t["special"] == true { CONTROL } else { USER_DEFINED };
        (t["content"].as_str(), t["id"].as_u64(), kind)
    });
    for (text, id, kind) in vocab.iter().map(|(t, id)| (Some(t.as_str()), id.as_u64(), NORMAL)).chain(added) {
        let (Some(text), Some(id)) = (text, id) else {
            bail!("the tokenizer's vocabulary has an entry without text or id")
        };
        let slot = tokens.get_mut(id as usize).with_context(|| {
            format!("the tokenizer has token {text:?} with id {id} >= the model's vocabulary size {vocab_size}")
        })?;
        // An added token that is also in the BPE vocabulary keeps the added token's type.
        *slot = Some((text.to_string(), kind.max(slot.as_ref().map_or(NORMAL, |s| s.1))));
    }
    Ok(tokens.into_iter().enumerate().map(|(id, t)| t.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED))).unzip())
}

/// BPE merges as llama.cpp wants them, `"left right"`, from either tokenizer.json spelling
/// (`"a b"` or `["a", "b"]`).
fn merges(merges: &Json) -> Result<Vec<String>> {
    let list = merges.as_array().context("the tokenizer's BPE model has no merges")?;
    list.iter()
        .map(|m| {
            let (a, b) = match m {
                Json::String(s) => s.split_once(' ').context("a merge without a space")?,
                Json::Array(p) if p.len() == 2 => {
                    (p[0].as_str().context("merge part")?, p[1].as_str().context("merge part")?)
                }
                other => bail!("unexpected merge entry {other}"),
            };
            if a.contains(' ') || b.contains(' ') {
                bail!("merge ({a:?}, {b:?}) holds a space, which GGUF's \"left right\" merges cannot express");
            }
            Ok(format!("{a} {b}"))
        })
        .collect()
}

/// The tokenizer of a GGUF file (`origin` names it in errors).
pub(super) fn tokenizer_from_gguf(ct: &Content, origin: &Path) -> Result<Tokenizer> {
    let text = |key: &str| ct.metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str);
    let model = text("tokenizer.ggml.model")
        .with_context(|| format!("{}: no tokenizer.ggml.model: the file holds no tokenizer", origin.display()))?;
    if model != "gpt2" {
        bail!(
            "{}: tokenizer.ggml.model = {model:?} is not supported: lors-lm reads byte-level BPE tokenizers (\"gpt2\") only",
            origin.display()
        );
    }
    let pre = text("tokenizer.ggml.pre").unwrap_or("");
    let pre_tok = pre_tokenizer(pre).with_context(|| {
        format!("{}: tokenizer.ggml.pre = {pre:?} is not supported (supported: {SUPPORTED_PRE})", origin.display())
    })?;
    let mut tok = Tokenizer::from_gguf(ct)
        .map_err(|e| anyhow::anyhow!("{}: cannot build the tokenizer from its metadata: {e}", origin.display()))?;
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

/// An integer metadata value of any integer type (files differ: u32, i32, u64, ...).
pub(super) fn int(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// BOS and EOS ids of a GGUF tokenizer (`tokenizer.ggml.{bos,eos}_token_id`).
pub(super) fn bos_eos(meta: &HashMap<String, Value>) -> (Option<u32>, Vec<u32>) {
    let id = |k: &str| meta.get(k).and_then(int).and_then(|x| u32::try_from(x).ok());
    (id("tokenizer.ggml.bos_token_id"), id("tokenizer.ggml.eos_token_id").into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn splits(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        pre_tokenizer(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s.to_string()).collect()
    }

    /// llama.cpp's regexes: gpt-2 `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`;
    /// smollm splits `\p{N}` first, then the same.
    #[test]
    fn pre_tokenizers_split_as_llama_cpp_names_them() {
        let text = "Call me Ishmael, 1851's  ways";
        assert_eq!(splits("gpt-2", text), ["Call", "Ġme", "ĠIshmael", ",", "Ġ1851", "'s", "Ġ", "Ġways"]);
        assert_eq!(
            splits("smollm", text),
            ["Call", "Ġme", "ĠIshmael", ",", "Ġ", "1", "8", "5", "1", "'s", "Ġ", "Ġways"]
        );
        assert!(pre_tokenizer("llama-bpe").is_none());
        let bl = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(pre_name(&bl), Some("gpt-2"));
        let seq = serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, bl]});
        assert_eq!(pre_name(&seq), Some("smollm"));
        let prefixed = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true});
        assert_eq!(pre_name(&prefixed), None);
    }

    #[test]
    fn merges_of_both_spellings_and_vocabulary_holes() {
        let m = merges(&serde_json::json!(["a b", ["Ġ", "t"]])).unwrap();
        assert_eq!(m, ["a b", "Ġ t"]);
        assert!(merges(&serde_json::json!([["a b", "c"]])).is_err());
        let json = serde_json::json!({
            "model": {"vocab": {"a": 1, "b": 3}},
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true}],
        });
        let (tokens, types) = vocabulary(&json, 5).unwrap();
        assert_eq!(tokens, ["<|endoftext|>", "a", "[PAD2]", "b", "[PAD4]"]);
        assert_eq!(types, [CONTROL, NORMAL, UNUSED, NORMAL, UNUSED]);
        assert!(vocabulary(&json, 3).unwrap_err().to_string().contains("id 3 >= the model's vocabulary size 3"));
    }
}
