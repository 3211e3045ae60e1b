//! Texts → token ids for `prepare`: through a tokenizer (a batch of texts in parallel, a long
//! text cut into pieces where that changes no id, see `tokenizer::chunking_is_exact`), or byte
//! for byte (`--bytes`, [`byte_tokenizer`]).
use anyhow::{bail, Result};
use rayon::prelude::*;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

use super::tokenizer::{chunking_is_exact, split_into_chunks, EOT};

/// Target size of the pieces of one text encoded in parallel.
const CHUNK_BYTES: usize = 128 * 1024;

/// How texts become ids.
pub(super) enum Encoder {
    /// A tokenizer; `exact`: long texts may be cut into pieces (see `chunking_is_exact`).
    Tokenizer { tok: Box<Tokenizer>, exact: bool },
    /// `--bytes`: byte b is id b + 1.
    Bytes,
}

impl Encoder {
    pub(super) fn tokenizer(tok: Tokenizer) -> Encoder {
        let exact = chunking_is_exact(&tok);
        Encoder::Tokenizer { tok: Box::new(tok), exact }
    }

    /// The ids of each text, in parallel. Texts are UTF-8 (checked by the readers) unless
    /// this is [`Encoder::Bytes`].
    pub(super) fn encode(&self, texts: &[&[u8]]) -> Result<Vec<Vec<u32>>> {
        let (tok, exact) = match self {
            Encoder::Bytes => return Ok(texts.iter().map(|t| t.iter().map(|&b| b as u32 + 1).collect()).collect()),
            Encoder::Tokenizer { tok, exact } => (tok, *exact),
        };
        let mut chunks: Vec<&str> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let Ok(s) = std::str::from_utf8(t) else { bail!("internal error: a document is not UTF-8") };
            for c in split_into_chunks(s, CHUNK_BYTES, exact, &[]) {
                chunks.push(c);
                owner.push(i);
            }
        }
        // Each piece's ids are taken as soon as it is encoded: an encoding also holds ~100
        // bytes per token of offsets, token strings and masks, so a whole batch's encodings at
        // once would be most of RSS.
        let ids: Vec<Vec<u32>> = chunks
            .par_iter()
            .map(|c| tok.encode_fast(*c, false).map(|e| e.get_ids().to_vec()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        let mut out = vec![Vec::new(); texts.len()];
        for (piece, i) in ids.into_iter().zip(owner) {
            if out[i].is_empty() {
                out[i] = piece;
            } else {
                out[i].extend_from_slice(&piece);
            }
        }
        Ok(out)
    }
}

/// The GPT-2 byte-level alphabet: the character that stands for each byte.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("a valid char")
}

/// The tokenizer of `prepare --bytes`: `<|endoftext|>` = 0 and one token per byte, id =
/// byte + 1 (a byte-level BPE without merges), so that `generate` and `eval --text` decode
/// and encode the data as `prepare` wrote it.
pub fn byte_tokenizer() -> Result<Tokenizer> {
    let mut vocab = Vocab::default();
    vocab.insert(EOT.to_string(), 0);
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), b as u32 + 1);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| anyhow::anyhow!("could not build the byte tokenizer: {e}"))?;
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(bpe)
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_post_processor(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_decoder(Some(ByteLevelDecoder::default().add_prefix_space(false).into()))
            .build()
            .map_err(|e| anyhow::anyhow!("could not build the byte tokenizer: {e}"))?;
    tok.add_special_tokens([AddedToken::from(EOT, true)]).map_err(|e| anyhow::anyhow!("could not add {EOT}: {e}"))?;
    Ok(Tokenizer::from(tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_agrees_with_byte_encoding() {
        let tok = byte_tokenizer().unwrap();
        assert_eq!(tok.get_vocab_size(true), 257);
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars, ByteLevel::alphabet().into_iter().collect());
        let text = "Héllo, wörld! 東京 🐳\n\t\u{0}<|endoftext|>x";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut bytes = Encoder::Bytes.encode(&[text.as_bytes()]).unwrap().remove(0);
        // The literal <|endoftext|> is the special token in the tokenizer, bytes in --bytes.
        let eot_at = text.find(EOT).unwrap();
        bytes.splice(eot_at..eot_at + EOT.len(), [0]);
        assert_eq!(ids, bytes);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}
