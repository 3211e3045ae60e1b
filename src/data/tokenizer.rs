//! Tokenizers for `prepare`: training the default byte-level BPE tokenizer, getting a given
//! one (`--tokenizer`: a tokenizer.json, a GGUF or `hf:OWNER/NAME`), guessing the bos/eos
//! ids, and cutting text into pieces that encode to exactly the ids of the whole
//! ([`split_into_chunks`], [`chunking_is_exact`]).
use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

use crate::formats::{fetch_hub_file, gguf, load_tokenizer};

/// The special token of trained tokenizers (id 0): end of text, also used as beginning of text.
pub const EOT: &str = "<|endoftext|>";
/// Vocabulary size used when neither `--vocab-size` nor `--tokenizer` is given.
pub const DEFAULT_VOCAB_SIZE: usize = 4096;
/// Smallest vocabulary a trained tokenizer can have: the 256 byte symbols plus `<|endoftext|>`.
pub const MIN_VOCAB_SIZE: usize = 256 + 1;

/// Trains a byte-level BPE tokenizer on `chunks` (see the module docs for its layout).
#[cfg(test)]
pub(super) fn train_bpe(chunks: &[&str], vocab_size: usize) -> Result<Tokenizer> {
    train_bpe_on(chunks.iter(), vocab_size)
}

/// [`train_bpe`] on texts that arrive one by one (a stream of documents: only the word
/// counts are kept, not the texts).
pub(super) fn train_bpe_on<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let eot = AddedToken::from(EOT, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![eot.clone()])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_post_processor(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_decoder(Some(ByteLevelDecoder::default().add_prefix_space(false).into()))
            .build()
            .map_err(|e| anyhow::anyhow!("could not build the tokenizer: {e}"))?;
    // Registering the special token before training makes a literal `<|endoftext|>` in the
    // text count as the special token rather than as BPE training text.
    tok.add_special_tokens([eot]).map_err(|e| anyhow::anyhow!("could not add {EOT}: {e}"))?;
    tok.train(&mut trainer, texts).map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
    let tok = Tokenizer::from(tok);
    if tok.token_to_id(EOT) != Some(0) {
        bail!("internal error: {EOT} did not get id 0 in the trained tokenizer");
    }
    Ok(tok)
}

/// Guesses the beginning/end-of-text ids from the usual special-token spellings.
pub fn find_bos_eos(tok: &Tokenizer) -> (Option<u32>, Option<u32>) {
    let first = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
    let bos = first(&["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", EOT]);
    let eos = first(&[EOT, "<|end_of_text|>", "</s>", "<eos>"]);
    (bos, eos)
}

/// Number of ids the model must accept: largest id + 1 (ids may have holes).
pub(super) fn tokenizer_vocab_size(tok: &Tokenizer) -> usize {
    let max_id = tok.get_vocab(true).values().copied().max();
    let by_max = max_id.map_or(0, |m| m as usize + 1);
    by_max.max(tok.get_vocab_size(true))
}

/// Whether encoding the text in pieces cut by [`split_into_chunks`] gives exactly the ids of
/// encoding it whole. True for GPT-2-style byte-level tokenizers: no normalizer, the ByteLevel
/// pre-tokenizer with its regex and no prefix space (alone, or after Digits), added tokens
/// plain special strings.
/// Every token of the GPT-2 regex that is not pure whitespace contains no whitespace but an
/// optional leading space, so the cuts used (after `X\n` before `Y`, or before ` Y`, with X, Y
/// printable ASCII) are pre-token boundaries in both encodings.
pub(super) fn chunking_is_exact(tok: &Tokenizer) -> bool {
    let byte_level =
        |p: &PreTokenizerWrapper| matches!(p, PreTokenizerWrapper::ByteLevel(b) if b.use_regex && !b.add_prefix_space);
    // Digits (SmolLM2, StarCoder: digits split off before the regex) isolates runs of digits,
    // which never contain a cut (cuts are at a newline or a space).
    let pre_ok = match tok.get_pre_tokenizer() {
        Some(PreTokenizerWrapper::Sequence(seq)) => match seq.as_ref() {
            [rest @ .., last] => byte_level(last) && rest.iter().all(|p| matches!(p, PreTokenizerWrapper::Digits(_))),
            [] => false,
        },
        Some(p) => byte_level(p),
        None => false,
    };
    let added_ok = tok
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.lstrip && !t.rstrip && !t.single_word && !t.content.chars().any(char::is_whitespace));
    tok.get_normalizer().is_none() && pre_ok && added_ok
}

/// Cuts `text` into pieces of about `target` bytes for parallel encoding.
///
/// With `exact` (see [`chunking_is_exact`]) a piece ends at the first safe cut at or after
/// `target` bytes: after `X\n` when followed by `Y`, or before ` Y`, with X and Y printable
/// ASCII. Otherwise pieces are whole documents (`doc_ends`), the natural unit of tokenizers
/// that add something at the start of each input (e.g. a Metaspace prefix).
pub(super) fn split_into_chunks<'a>(text: &'a str, target: usize, exact: bool, doc_ends: &[usize]) -> Vec<&'a str> {
    let mut chunks = Vec::new();
    if !exact {
        let mut start = 0;
        for &end in doc_ends {
            chunks.push(&text[start..end]);
            start = end;
        }
        if start < text.len() {
            chunks.push(&text[start..]);
        }
        return chunks;
    }
    let b = text.as_bytes();
    let safe = |i: usize| {
        (i >= 2 && b[i - 1] == b'\n' && b[i - 2].is_ascii_graphic() && b[i].is_ascii_graphic())
            || (i >= 1 && i + 1 < b.len() && b[i] == b' ' && b[i - 1].is_ascii_graphic() && b[i + 1].is_ascii_graphic())
    };
    let mut start = 0;
    while start < b.len() {
        let mut cut = b.len();
        let mut i = start + target.max(1);
        while i < b.len() {
            if safe(i) {
                cut = i;
                break;
            }
            i += 1;
        }
        chunks.push(&text[start..cut]);
        start = cut;
    }
    chunks
}

/// Where `prepare` gets its tokenizer, from its `tokenizer` and `vocab_size` options.
pub(super) enum TokenizerSpec {
    Train { vocab_size: usize },
    File(PathBuf),
    Hub { owner: String, name: String, revision: Option<String> },
}

/// A tokenizer ready to use (with its source for `meta.json`), or one still to be trained.
pub(super) enum TokenizerPlan {
    Ready(Box<Tokenizer>, String),
    Train { vocab_size: usize },
}

impl TokenizerSpec {
    /// Checks `--tokenizer` (a tokenizer.json path, a GGUF model file whose tokenizer is used, or
    /// `hf:OWNER/NAME[@REVISION]`), or without
    /// it `--vocab-size`.
    pub(super) fn parse(tokenizer: Option<&str>, vocab_size: usize) -> Result<TokenizerSpec> {
        let Some(spec) = tokenizer else {
            if vocab_size < MIN_VOCAB_SIZE {
                bail!(
                    "--vocab-size {} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} \
                     (256 byte symbols + {EOT}); try --vocab-size {DEFAULT_VOCAB_SIZE}",
                    vocab_size
                );
            }
            return Ok(TokenizerSpec::Train { vocab_size });
        };
        let Some(repo) = spec.strip_prefix("hf:") else {
            return Ok(TokenizerSpec::File(PathBuf::from(spec)));
        };
        let (repo, revision) = match repo.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (repo, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        match parts.as_slice() {
            [owner, name]
                if !owner.is_empty() && !name.is_empty() && revision.as_deref().is_none_or(|r| !r.is_empty()) =>
            {
                Ok(TokenizerSpec::Hub { owner: owner.to_string(), name: name.to_string(), revision })
            }
            _ => bail!(
                "--tokenizer {spec}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION, e.g. hf:openai-community/gpt2"
            ),
        }
    }

    /// Loads a given tokenizer (a file, or through the Hub cache); one to train stays a plan.
    pub(super) fn load(self) -> Result<TokenizerPlan> {
        Ok(match self {
            TokenizerSpec::Train { vocab_size } => TokenizerPlan::Train { vocab_size },
            TokenizerSpec::File(path) if gguf::names_gguf(&path) => {
                let tok = gguf::load_gguf_tokenizer(&path).context("--tokenizer")?;
                TokenizerPlan::Ready(Box::new(tok), format!("gguf:{}", path.display()))
            }
            TokenizerSpec::File(path) => {
                let tok = load_tokenizer(&path).context("--tokenizer")?;
                TokenizerPlan::Ready(Box::new(tok), format!("file:{}", path.display()))
            }
            TokenizerSpec::Hub { owner, name, revision } => {
                let (path, source) = fetch_hub_file(&owner, &name, revision.as_deref(), "tokenizer.json")?;
                let tok = load_tokenizer(&path).with_context(|| format!("--tokenizer hf:{owner}/{name}"))?;
                TokenizerPlan::Ready(Box::new(tok), source)
            }
        })
    }
}

/// Whether `tok` is byte-level: its non-special tokens are exactly the 256 single bytes (the
/// GPT-2 byte alphabet, as `prepare --vocab-size 257` trains: 256 byte symbols +
/// `<|endoftext|>`), so every id but a special token's stands for one byte of text.
pub fn is_byte_level(tok: &Tokenizer) -> bool {
    let special: HashSet<u32> =
        tok.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
    let bytes: HashSet<String> = ByteLevel::alphabet().into_iter().map(String::from).collect();
    let plain: Vec<String> =
        tok.get_vocab(true).into_iter().filter(|(_, id)| !special.contains(id)).map(|(s, _)| s).collect();
    matches!(tok.get_decoder(), Some(DecoderWrapper::ByteLevel(_)))
        && plain.len() == 256
        && plain.iter().all(|s| bytes.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes pieces separately and concatenates their ids.
    fn encode_chunks(tok: &Tokenizer, chunks: &[&str]) -> Vec<u32> {
        let encodings = tok.encode_batch_fast(chunks.to_vec(), false).unwrap();
        encodings.iter().flat_map(|e| e.get_ids().to_vec()).collect()
    }

    const SAMPLE: &str = "  Call me Ishmael. Some years ago—never mind how long precisely—\n\
        having little or no money in my purse, and nothing particular to interest me on shore,\n\
        I thought I would sail about a little and see the watery part of the world.\n\n\
        Café naïve, 東京タワー, 🐳🐋 and  double  spaces\t\ttabs\r\nCRLF line, Ā ÿ þ ĉ.\n";

    fn sample_text(copies: usize) -> String {
        (0..copies).map(|i| format!("{SAMPLE}{i}: ")).collect::<Vec<_>>().join("")
    }

    #[test]
    fn chunked_encoding_equals_whole_encoding() {
        let text = sample_text(20);
        let chunks = split_into_chunks(&text, 4096, true, &[]);
        let tok = train_bpe(&chunks, 400).unwrap();
        assert!(chunking_is_exact(&tok));
        let whole = tok.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        for target in [1, 7, 64, 1000] {
            let chunks = split_into_chunks(&text, target, true, &[]);
            assert!(chunks.len() > 1);
            assert_eq!(chunks.concat(), text);
            let ids = encode_chunks(&tok, &chunks);
            assert_eq!(ids, whole, "chunk target {target}");
        }
        assert_eq!(tok.decode(&whole, false).unwrap(), text);
    }

    #[test]
    fn trained_tokenizer_layout() {
        let text = sample_text(5);
        let tok = train_bpe(&[text.as_str()], 300).unwrap();
        assert_eq!(tok.token_to_id(EOT), Some(0));
        assert!(tok.get_vocab_size(true) <= 300);
        assert_eq!(find_bos_eos(&tok), (Some(0), Some(0)));
        // Every single byte is a token.
        assert_eq!(ByteLevel::alphabet().len(), 256);
        for ch in ByteLevel::alphabet() {
            assert!(tok.token_to_id(&ch.to_string()).is_some());
        }
        // A literal <|endoftext|> in the text is the special token.
        let ids = tok.encode_fast("a<|endoftext|>b", false).unwrap();
        assert!(ids.get_ids().contains(&0));
    }

    #[test]
    fn split_by_documents_when_not_exact() {
        let text = "ab\ncd\nef";
        let chunks = split_into_chunks(text, 1, false, &[3, 6]);
        assert_eq!(chunks, vec!["ab\n", "cd\n", "ef"]);
    }
}
