//! Training and validation batches: windows of `seq_len + 1` tokens, cut into inputs (B, T)
//! and targets shifted by one. A split is one token stream over all its shards
//! ([`TokenFile`]): window starts are uniform over the stream (so shards are sampled in
//! proportion to their size; a window may span two shards or several documents, which the
//! end-of-text tokens separate). Data-parallel rank r of N draws its windows, from its own
//! random stream, inside the r-th of N equal contiguous parts of the stream ([`rank_part`]), so
//! no two ranks ever train on the same tokens within an epoch's worth of steps.

use std::ops::Range;

use crate::data::TokenFile;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Where training batches come from.
pub enum Source {
    /// Random windows of a token file (the training split), inside `part` (token positions: the
    /// whole stream for a single process, this rank's part in a data-parallel run).
    Tokens { data: TokenFile, part: Range<usize> },
    /// Uniformly random token ids below `vocab` (benchmarks).
    Random { vocab: usize },
}

impl Source {
    /// Random windows of the whole of `data`.
    pub fn tokens(data: TokenFile) -> Source {
        let part = 0..data.len();
        Source::Tokens { data, part }
    }

    /// Data-parallel: draw only from rank `rank`'s part of `world` ([`rank_part`]); an error
    /// when that part is shorter than one window of `t + 1` tokens. Returns the part (None for
    /// random tokens).
    pub fn restrict_to_rank(&mut self, rank: usize, world: usize, t: usize) -> Result<Option<Range<usize>>> {
        if let Source::Tokens { data, part } = self {
            let p = rank_part(data.len(), rank, world);
            if p.len() < t + 1 {
                bail!(
                    "the training split ({}, {} tokens) cut into {world} parts, one per rank, gives parts of {} tokens: \
                     fewer than one window of train.seq_len + 1 = {}; use fewer ranks, a shorter train.seq_len or more data",
                    data.path().display(),
                    data.len(),
                    p.len(),
                    t + 1
                );
            }
            *part = p.clone();
            return Ok(Some(p));
        }
        Ok(None)
    }

    /// One batch: inputs (B, T) and targets (B, T), drawn with `rng`.
    pub fn sample(&self, rng: &mut Rng, b: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        match self {
            Source::Tokens { data, part } => sample_batch_in(data, part.clone(), rng, b, t, device),
            Source::Random { vocab } => {
                let ids: Vec<u32> = (0..b * (t + 1)).map(|_| rng.below(*vocab as u64) as u32).collect();
                let all = Tensor::from_vec(ids, (b, t + 1), device)?; // (B, T + 1)
                Ok((all.narrow(1, 0, t)?, all.narrow(1, 1, t)?))
            }
        }
    }
}

/// The token positions data-parallel rank `rank` of `world` trains on: the `rank`-th of
/// `world` contiguous parts of a stream of `len` tokens, as equal as integers allow. The parts
/// are disjoint and cover the stream; rank 0 of 1 gets all of it.
pub fn rank_part(len: usize, rank: usize, world: usize) -> Range<usize> {
    let at = |r: usize| (len as u128 * r as u128 / world.max(1) as u128) as usize;
    at(rank)..at(rank + 1)
}

/// Random windows of `seq_len + 1` tokens of `data`: inputs (B, T) and targets shifted by one.
pub fn sample_batch(data: &TokenFile, rng: &mut Rng, b: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    sample_batch_in(data, 0..data.len(), rng, b, t, device)
}

/// Random windows of `t + 1` tokens lying wholly inside `part` of `data`.
pub fn sample_batch_in(
    data: &TokenFile,
    part: Range<usize>,
    rng: &mut Rng,
    b: usize,
    t: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let Some(max_start) = part.end.checked_sub(t + 1).filter(|&m| m >= part.start) else {
        bail!("{}: tokens {part:?} hold no window of {} tokens", data.path().display(), t + 1);
    };
    let span = (max_start - part.start) as u64 + 1;
    let starts: Vec<usize> = (0..b).map(|_| part.start + rng.below(span) as usize).collect();
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
