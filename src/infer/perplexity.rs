//! Perplexity, measured the same way everywhere (`lors-lm eval`, sweeps, compression).
//!
//! Definition: the token sequence is cut into consecutive windows of `seq_len + 1` tokens
//! with stride `seq_len` (window k = tokens[k·T .. k·T + T + 1]; the last partial window is
//! dropped); every position of every window is predicted (inputs window[..T], targets
//! window[1..]); the loss is the mean cross-entropy over all predicted tokens and the
//! perplexity is exp(loss). `seq_len` is the run's `train.seq_len` unless `--seq-len` is given.
//! `tests/reference/llama_ref.py eval` implements the same definition independently.
//!
//! Bits per byte (byte-level tokenizers only, [`ByteLevel`]): the same predicted tokens' total
//! loss in bits, divided by the bytes of text they stand for. Every id of a byte-level
//! tokenizer is one byte except its special tokens (`<|endoftext|>`), which stand for no text:
//! their loss is counted (predicting where a document ends is part of coding the text) but
//! they add no byte. Without special tokens among the targets, bpb = loss / ln 2.

use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub tokens: usize,
    pub windows: usize,
}

impl EvalResult {
    pub fn ppl(&self) -> f64 {
        self.loss.exp()
    }
}

/// Mean next-token loss over consecutive windows of `tokens` (see the module docs).
/// `model` should be merged (`Model::merged`) so no graph is built.
pub fn eval_tokens(
    model: &Model,
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    device: &Device,
) -> Result<EvalResult> {
    let t = seq_len;
    if t == 0 || batch_size == 0 {
        bail!("seq_len and batch size must be > 0");
    }
    let windows = tokens.len().saturating_sub(1) / t;
    if windows == 0 {
        bail!(
            "{} tokens are fewer than one window of seq_len + 1 = {} tokens: use more text or a smaller --seq-len",
            tokens.len(),
            t + 1
        );
    }
    let mut total = 0.0;
    for first in (0..windows).step_by(batch_size) {
        let n = batch_size.min(windows - first);
        let (mut x, mut y) = (Vec::with_capacity(n * t), Vec::with_capacity(n * t));
        for k in first..first + n {
            let w = &tokens[k * t..k * t + t + 1];
            x.extend_from_slice(&w[..t]);
            y.extend_from_slice(&w[1..]);
        }
        let x = Tensor::from_vec(x, (n, t), device)?;
        let y = Tensor::from_vec(y, (n, t), device)?;
        let mean = model.forward_loss(&x, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += mean * (n * t) as f64;
    }
    let n_tokens = windows * t;
    Ok(EvalResult { loss: total / n_tokens as f64, tokens: n_tokens, windows })
}

/// The byte count of a byte-level tokenizer's ids (see the module docs): every id is one byte
/// but the special tokens'.
#[derive(Debug, Clone)]
pub struct ByteLevel {
    special: HashSet<u32>,
}

impl ByteLevel {
    /// Some for a byte-level tokenizer (`data::is_byte_level`), None for any other.
    pub fn of(tok: &tokenizers::Tokenizer) -> Option<Self> {
        let special = tok.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        crate::data::is_byte_level(tok).then_some(Self { special })
    }

    /// Bytes of text that `ids` stand for.
    pub fn bytes(&self, ids: &[u32]) -> usize {
        ids.iter().filter(|id| !self.special.contains(id)).count()
    }

    /// Bits per byte of `r`, evaluated on `tokens` (its targets are `tokens[1..=r.tokens]`);
    /// None when they hold no byte.
    pub fn bits_per_byte(&self, r: &EvalResult, tokens: &[u32]) -> Option<f64> {
        let bytes = self.bytes(tokens.get(1..=r.tokens)?);
        (bytes > 0).then(|| r.loss * r.tokens as f64 / std::f64::consts::LN_2 / bytes as f64)
    }
}
