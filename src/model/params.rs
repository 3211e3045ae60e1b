//! Parameter accounting: unique parameters of a config (what is stored and trained) against
//! the vanilla model at the same dimensions. Computed from the config alone, in closed form;
//! tests check it against the parameters the model actually creates.

use crate::model::config::ModelConfig;
use crate::model::lors::{LorsConfig, Proj};
use std::fmt::Write;

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
    /// counts once per layer, whatever is shared; norm gains included) and T the context.
    pub fn flops_per_token(m: &ModelConfig, seq_len: usize) -> f64 {
        let per_layer: usize = Proj::ALL.iter().map(|p| p.shape(m).0 * p.shape(m).1).sum::<usize>() + 2 * m.d_model;
        let n = (m.n_layers * per_layer + m.d_model) as f64;
        6.0 * n + 12.0 * (m.n_layers * m.d_model * seq_len) as f64
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
