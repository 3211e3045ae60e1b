//! Parameter accounting: unique parameters of a config (what is stored and trained) against
//! the vanilla model at the same dimensions, the compute of a training token ([`TrainFlops`])
//! and the weight bytes a decoding step reads ([`ParamCounts::decode_bytes`]). Computed from
//! the config alone, in closed form; tests check it against the parameters the model actually
//! creates and the bytes its merged and factored forms read.

use crate::model::config::ModelConfig;
use crate::model::lors::{LorsConfig, Proj};
use crate::model::stack::{WeightBytes, Weights};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt::Write;

/// Training FLOPs of one token, forward + backward (a multiply-add is 2 FLOPs), by part.
///
/// Compute follows the layers *applied*, not the unique parameters: a shared or LORS layer
/// multiplies by its merged `W + s·B A`, as large as a vanilla layer's weight, so at the same
/// depth and width every mode costs what vanilla costs, plus the merge of the LORS terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainFlops {
    /// 6·N (PaLM): N = the projections and norm gains of every applied layer + the final norm.
    pub dense: f64,
    /// 12·L·d·T (PaLM): q kᵀ and p·v over the context T, forward and backward. (The fused CPU
    /// kernel computes the whole masked T×T square and recomputes q kᵀ in the backward pass:
    /// 14·L·d·T in fact; the PaLM convention is kept so that figures compare across codes.)
    pub attention: f64,
    /// 6·V·d: the LM head (the tied embedding), whose logits every token needs.
    pub head: f64,
    /// The LORS merge, once per micro-batch of B·T tokens (`model/lors.rs`): B A forward,
    /// dB = s·g Aᵀ and dA = s·Bᵀ g backward, 6·r·in·out per projection and layer, over B·T.
    pub lors_merge: f64,
}

impl TrainFlops {
    pub fn total(&self) -> f64 {
        self.dense + self.attention + self.head + self.lors_merge
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamCounts {
    /// Token embedding, V·d.
    pub embedding: usize,
    /// Shared bases: one (out×in) per shared projection type per group.
    pub shared: usize,
    /// Per-layer private weights: LORS factors r·(in+out), plus full weights of projection
    /// types that are not shared.
    pub private: usize,
    /// RMSNorm gains: 2·d per layer plus the final d.
    pub norm: usize,
    /// Untied LM head V·d (0 when tied).
    pub head: usize,
    /// The same dims with every projection private (vanilla Llama).
    pub vanilla_total: usize,
}

/// The bytes one training step's tensors hold at the end of its forward pass, by what holds
/// them: an estimate counted from the plain ops (what CUDA runs), and a floor for the peak,
/// which adds the backward pass's gradients in flight, temporaries and the allocator's cache.
/// On the CPU's plain ops (`bench --plain-ops`) the measured peak RSS was 1.5-1.9× this
/// (docs/performance.md); `scripts/gpu_check.sh` puts it beside the GPU's measured peak.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrainMemory {
    /// f32 parameters (the unique ones), their f32 gradients and AdamW's two moments.
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    /// Copies of the weights the step makes and keeps for the backward pass: stacked q·k·v and
    /// gate·up, bf16 casts, LORS's merged `W + B·A` and `B·A`.
    pub step_weights: u64,
    /// Saved activations of every layer, the attention scores aside.
    pub activations: u64,
    /// The (B, H, T, T) attention scores and probabilities of every layer.
    pub attention_scores: u64,
    /// The logits and what the loss keeps of them.
    pub logits: u64,
}

impl TrainMemory {
    pub fn total(&self) -> u64 {
        self.params
            + self.grads
            + self.optimizer
            + self.step_weights
            + self.activations
            + self.attention_scores
            + self.logits
    }
}

impl ParamCounts {
    pub fn new(m: &ModelConfig, l: &LorsConfig) -> Self {
        let (v, d, n) = (m.vocab_size, m.d_model, m.n_layers);
        let mut shared = 0;
        let mut private = 0;
        let mut block_vanilla = 0;
        for p in Proj::ALL {
            let (out, inp) = p.shape(m);
            block_vanilla += out * inp;
            if (0..n).any(|layer| l.is_shared(p, layer)) {
                shared += l.n_groups(n) * out * inp;
            }
            for layer in 0..n {
                // Shared targets and low-rank ones store B_l, A_l; the others a full weight.
                private += match l.is_shared(p, layer) || !l.has_base(p, layer) {
                    true => l.rank_for(p, layer) * (out + inp),
                    false => out * inp,
                };
            }
        }
        let norm = 2 * d * n + d;
        let head = if m.tie_embeddings { 0 } else { v * d };
        Self { embedding: v * d, shared, private, norm, head, vanilla_total: v * d + n * block_vanilla + norm + head }
    }

    pub fn total(&self) -> usize {
        self.embedding + self.shared + self.private + self.norm + self.head
    }

    /// Unique parameters in the blocks' projections (shared + private).
    pub fn block_projections(&self) -> usize {
        self.shared + self.private
    }

    /// 100·(1 - unique/vanilla).
    pub fn reduction_pct(&self) -> f64 {
        100.0 * (1.0 - self.total() as f64 / self.vanilla_total as f64)
    }

    /// Training FLOPs per token by the PaLM formula, 6·N + 12·L·d·T, with N the
    /// non-embedding parameters as the forward pass uses them (every layer's merged weight
    /// counts once per layer, whatever is shared; norm gains included) and T the context: what
    /// the MFU log uses ([`TrainFlops`]'s dense + attention; the LM head and the LORS merge
    /// are left out of MFU).
    pub fn flops_per_token(m: &ModelConfig, seq_len: usize) -> f64 {
        let per_layer: usize = Proj::ALL.iter().map(|p| p.shape(m).0 * p.shape(m).1).sum::<usize>() + 2 * m.d_model;
        let n = (m.n_layers * per_layer + m.d_model) as f64;
        6.0 * n + 12.0 * (m.n_layers * m.d_model * seq_len) as f64
    }

    /// Every FLOP of a training token ([`TrainFlops`]) at context `seq_len`, with micro-batches
    /// of `batch_tokens` tokens (batch_size · seq_len) over which the LORS merge is spread.
    pub fn train_flops(m: &ModelConfig, l: &LorsConfig, seq_len: usize, batch_tokens: usize) -> TrainFlops {
        let (v, d, n) = (m.vocab_size as f64, m.d_model as f64, m.n_layers as f64);
        let palm = Self::flops_per_token(m, seq_len);
        let attention = 12.0 * n * d * seq_len as f64;
        let merged: usize = (0..m.n_layers)
            .flat_map(|layer| Proj::ALL.map(move |p| (p, layer)))
            .filter(|&(p, layer)| l.has_base(p, layer))
            .map(|(p, layer)| l.rank_for(p, layer) * p.shape(m).0 * p.shape(m).1)
            .sum();
        TrainFlops {
            dense: palm - attention,
            attention,
            head: 6.0 * v * d,
            lors_merge: 6.0 * merged as f64 / batch_tokens.max(1) as f64,
        }
    }

    /// Weight bytes (f32) one decoding step reads with the weights kept as `w`, and how many
    /// distinct bytes those are: `Model::weight_bytes` in closed form. Per projection and
    /// layer, merged reads out·in; factored reads its base (none for a `lowrank` target) and
    /// r·(out+in) of factors, a shared base being one distinct copy for all its layers. Add
    /// the LM head (V·d, the tied embedding), the norm gains, and an untied head's V·d.
    pub fn decode_bytes(m: &ModelConfig, l: &LorsConfig, w: Weights) -> WeightBytes {
        // A base is one tensor per (projection, group) when shared, per (projection, layer) else.
        let base_id = |p: Proj, layer: usize| match l.group_of(layer, m.n_layers) {
            Some(g) if l.is_shared(p, layer) => (p, g, true),
            _ => (p, layer, false),
        };
        let mut seen = HashSet::new();
        let (mut read, mut distinct) = (0u64, 0u64);
        for layer in 0..m.n_layers {
            for p in Proj::ALL {
                let (out, inp) = p.shape(m);
                let (full, r) = ((out * inp) as u64, l.rank_for(p, layer));
                let low = (r * (out + inp)) as u64;
                let has_base = l.has_base(p, layer);
                let new_base = has_base && seen.insert(base_id(p, layer));
                match w {
                    Weights::Merged => {
                        // o and down are computed alone: without a residual they keep their
                        // (possibly shared) base; q k v and gate up are stacked per layer.
                        let keeps_base = matches!(p, Proj::O | Proj::Down) && r == 0;
                        read += full;
                        distinct += if !keeps_base || new_base { full } else { 0 };
                    }
                    Weights::Factored => {
                        let base = if has_base { full } else { 0 };
                        read += base + low;
                        distinct += low + if new_base { base } else { 0 };
                    }
                }
            }
        }
        let (v, d, n) = (m.vocab_size as u64, m.d_model as u64, m.n_layers as u64);
        let other = v * d + (2 * n + 1) * d + if m.tie_embeddings { 0 } else { v * d };
        WeightBytes { read: 4 * (read + other), distinct: 4 * (distinct + other) }
    }

    /// Estimated bytes one training step's tensors hold (a floor for its peak) on a device that
    /// runs the plain candle ops (CUDA; on the CPU `bench --plain-ops`): [`TrainMemory`], for
    /// micro-batches of `batch` sequences of `seq_len` tokens, matmuls in bf16 when `bf16`.
    pub fn train_memory(
        &self,
        m: &ModelConfig,
        l: &LorsConfig,
        batch: usize,
        seq_len: usize,
        bf16: bool,
    ) -> TrainMemory {
        let u = self.total() as u64;
        let (n, d, f, v) = ((batch * seq_len) as u64, m.d_model as u64, m.ffn_hidden as u64, m.vocab_size as u64);
        let (h, kv, hd, layers) = (m.n_heads as u64, m.kv_heads() as u64, m.head_dim() as u64, m.n_layers as u64);
        // Bytes of a bf16 copy made for a matmul.
        let cast = if bf16 { 2 } else { 0 };
        // Weights the step builds and keeps for its backward pass, per layer: q, k, v and gate,
        // up stacked (a copy), every weight cast to bf16, and W + B·A with its B·A product where
        // the projection has a private term.
        let mut step_weights = 0u64;
        for layer in 0..m.n_layers {
            for pj in Proj::ALL {
                let (out, inp) = pj.shape(m);
                let e = (out * inp) as u64;
                let stacked = !matches!(pj, Proj::O | Proj::Down);
                let merged = l.has_base(pj, layer) && l.rank_for(pj, layer) > 0;
                step_weights += e * (cast + if stacked { 4 } else { 0 } + if merged { 8 } else { 0 });
            }
        }
        // The (tied) LM head's bf16 copy.
        step_weights += cast * v * d;
        // Saved activations per layer and token (bytes), counted from the plain ops: two RMSNorms
        // (x², x/rms, ·gain: 24d), two residual sums (8d), q·k·v out (bf16 and f32 copies), RoPE on
        // q and k (transposes, rotate-half, products: 22 bytes per rotated value), v transposed,
        // the attention output's transpose, o and down in and out, gate·up out, silu and product.
        let qkv = (h + 2 * kv) * hd;
        let per_token = 4 * (6 * d + 2 * d) // norms, residuals
            + (cast + 4) * qkv + cast * d // qkv: f32 out (+ bf16 out and input copy)
            + 22 * (h + kv) * hd + 4 * kv * hd // RoPE, v contiguous
            + 4 * d + cast * d + (cast + 4) * d // attention output, o in / out
            + cast * d + (cast + 4) * 2 * f + 8 * f // gate·up in / out, silu, product
            + cast * f + (cast + 4) * d; // down in / out
        let activations = layers * n * per_token;
        // Attention scores (B, H, T, T) per layer: q·kᵀ (bf16 out and its f32 copy), scaled,
        // masked, softmax, and the probabilities' bf16 copy for P·v.
        let per_score = if bf16 { 2 + 4 + 4 + 4 + 4 + 2 } else { 4 * 4 };
        let attention_scores = layers * (batch as u64) * h * (seq_len as u64).pow(2) * per_score;
        // Logits (N, V): f32 (and the bf16 matmul output), log-softmax and the loss's gradient.
        let logits = n * v * (cast + 4 + 4 + 4);
        TrainMemory {
            params: 4 * u,
            grads: 4 * u,
            optimizer: 8 * u,
            step_weights,
            activations,
            attention_scores,
            logits,
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let pct = |x: usize| 100.0 * x as f64 / self.total().max(1) as f64;
        let _ = writeln!(s, "{:<28} {:>14} {:>8}", "parameters", "count", "% total");
        for (name, n) in [
            ("embedding", self.embedding),
            ("shared (bases)", self.shared),
            ("private (per layer)", self.private),
            ("norm gains", self.norm),
            ("lm head (untied)", self.head),
        ] {
            let _ = writeln!(s, "{name:<28} {n:>14} {:>7.1}%", pct(n));
        }
        let _ = writeln!(s, "{:<28} {:>14}", "total unique", self.total());
        let _ = writeln!(s, "{:<28} {:>14}", "vanilla at same dims", self.vanilla_total);
        let _ = writeln!(s, "{:<28} {:>13.1}%", "reduction vs vanilla", self.reduction_pct());
        s
    }
}
