//! Training and validation batches: windows of `seq_len + 1` tokens, cut into inputs (B, T)
//! and targets shifted by one. A split is one token stream over all its shards
//! ([`TokenFile`]): window starts are uniform over the stream (so shards are sampled in
//! proportion to their size; a window may span two shards or several documents, which the
//! end-of-text tokens separate), each data-parallel rank drawing from its own random stream.

use crate::data::TokenFile;
use crate::rng::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Where training batches come from.
pub enum Source {
    /// Random windows of a token file (the training split).
    Tokens(TokenFile),
    /// Uniformly random token ids below `vocab` (benchmarks).
    Random { vocab: usize },
}

impl Source {
    /// One batch: inputs (B, T) and targets (B, T), drawn with `rng`.
    pub fn sample(&self, rng: &mut Rng, b: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        match self {
            Source::Tokens(data) => sample_batch(data, rng, b, t, device),
            Source::Random { vocab } => {
                let ids: Vec<u32> = (0..b * (t + 1)).map(|_| rng.below(*vocab as u64) as u32).collect();
                let all = Tensor::from_vec(ids, (b, t + 1), device)?; // (B, T + 1)
                Ok((all.narrow(1, 0, t)?, all.narrow(1, 1, t)?))
            }
        }
    }
}

/// Random windows of `seq_len + 1` tokens of `data`: inputs (B, T) and targets shifted by one.
pub fn sample_batch(data: &TokenFile, rng: &mut Rng, b: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let max_start = data.len() - (t + 1);
    let starts: Vec<usize> = (0..b).map(|_| rng.below(max_start as u64 + 1) as usize).collect();
    batch_from_starts(data, &starts, t, device)
}

/// The windows of `data` starting at `starts`: inputs (B, T) and targets (B, T).
pub fn batch_from_starts(data: &TokenFile, starts: &[usize], t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let (mut x, mut y) = (Vec::with_capacity(starts.len() * t), Vec::with_capacity(starts.len() * t));
    for &s in starts {
        let w = data.window(s, t + 1)?;
        x.extend_from_slice(&w[..t]);
        y.extend_from_slice(&w[1..]);
    }
    let b = starts.len();
    Ok((Tensor::from_vec(x, (b, t), device)?, Tensor::from_vec(y, (b, t), device)?))
}

/// The fixed validation batches of a run: the same for every eval and every resume (drawn
/// from the run's seed).
pub fn validation_batches(
    data: &TokenFile,
    seed: u64,
    n: usize,
    b: usize,
    t: usize,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    let mut rng = Rng::new(seed).fork(2);
    (0..n).map(|_| sample_batch(data, &mut rng, b, t, device)).collect()
}
