//! Text generation: the sampler (temperature, top-k, top-p) and the decoding loop with a KV
//! cache (each new token is one single-position forward pass; the context window slides
//! beyond model.max_seq_len). Models are detached for inference first, merged
//! (`Model::merged`: a vanilla model's cost) or factored (`Model::factored`: the unique
//! parameters only; `infer/weights.rs` chooses).

use crate::model::Model;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// How the next token is picked from the logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!("--temperature must be >= 0 (0 = greedy), got {temperature}");
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p must be in (0, 1], got {p}");
            }
        }
        if top_k == Some(0) {
            bail!("--top-k must be >= 1");
        }
        Ok(Self { temperature, top_k, top_p, rng: Rng::new(seed) })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = self.top_k {
            idx.truncate(k.min(idx.len()));
        }
        let max = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / self.temperature).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.top_p {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u = self.rng.next_f64();
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if u < cum {
                return idx[i] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate up to `n` tokens after `prompt` with a (merged) model, calling `on_token` for each
/// new token. Stops early at any of the `stop` tokens (end of sequence). When the context would exceed model.max_seq_len, the
/// window slides: the cache is rebuilt from the last half-context of tokens (reported once
/// through `on_slide`).
pub fn generate_tokens(
    model: &Model,
    prompt: &[u32],
    n: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
    mut on_slide: impl FnMut(),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("empty prompt: nothing to condition on");
    }
    let ctx = model.cfg.max_seq_len;
    let device = model.device();
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut out = vec![];
    let mut cache = model.new_cache();
    // Prefill with the last `ctx` prompt tokens.
    let start = seq.len().saturating_sub(ctx);
    if start > 0 {
        on_slide();
    }
    let mut pos = seq.len() - start;
    let ids = Tensor::new(&seq[start..], &device)?.unsqueeze(0)?;
    let mut logits = last_logits(&model.forward_at(&ids, 0, Some(&mut cache))?)?;
    for _ in 0..n {
        let next = sampler.sample(&logits);
        out.push(next);
        seq.push(next);
        on_token(next)?;
        if stop.contains(&next) {
            break;
        }
        if pos == ctx {
            on_slide();
            cache = model.new_cache();
            let keep = (ctx / 2).max(1);
            let window = &seq[seq.len() - keep..];
            let ids = Tensor::new(window, &device)?.unsqueeze(0)?;
            logits = last_logits(&model.forward_at(&ids, 0, Some(&mut cache))?)?;
            pos = keep;
        } else {
            let ids = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            logits = last_logits(&model.forward_at(&ids, pos, Some(&mut cache))?)?;
            pos += 1;
        }
    }
    Ok(out)
}

/// Greedy decoding of a batch of equal-length prompts (B, P) for `n` steps, without sliding
/// (P + n must fit in model.max_seq_len): the benchmark's workload. `on_step(i)` runs after
/// forward pass i (0: the prompt) once its logits are on the host. Returns (B, n) tokens.
pub fn generate_batch(
    model: &Model,
    prompts: &Tensor,
    n: usize,
    mut on_step: impl FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    let (b, p) = prompts.dims2()?;
    if p == 0 || p + n > model.cfg.max_seq_len {
        bail!("generate_batch: {p} prompt + {n} new tokens must be in 1..={}", model.cfg.max_seq_len);
    }
    let mut cache = model.new_cache();
    let mut out = vec![Vec::with_capacity(n); b];
    let mut logits = model.forward_at(prompts, 0, Some(&mut cache))?; // (B, P, V)
    for step in 0..n {
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?; // (B, V)
        let rows: Vec<Vec<f32>> = last.to_vec2()?;
        on_step(step);
        let next: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
        for (o, t) in out.iter_mut().zip(&next) {
            o.push(*t);
        }
        if step + 1 < n {
            let ids = Tensor::from_vec(next, (b, 1), prompts.device())?;
            logits = model.forward_at(&ids, p + step, Some(&mut cache))?; // (B, 1, V)
        }
    }
    Ok(out)
}

/// logits (1, T, V) → the last position's V logits.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(1)?;
    Ok(logits.narrow(1, t - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}
