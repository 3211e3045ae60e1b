//! LORS, the whole method in one file (Li et al., "LORS: Low-rank Residual Structure for
//! Parameter-Efficient Network Stacking", CVPR 2024).
//!
//! Every layer `l` of a stack computes each projection with
//!
//! ```text
//! W_l = W_shared(g) + s · B_l A_l        W_shared(g): out×in, one per group g of layers
//!                                         B_l: out×r, A_l: r×in, private to layer l
//! ```
//!
//! This file holds every decision the method makes:
//! * **which projections** are shared ([`Proj`], `[lors] targets`), and the **mode**
//!   ([`Mode`]: vanilla = nothing shared, shared = ALBERT-style bases without a private term,
//!   lors = bases plus private low-rank residuals);
//! * **groups**: which layers share a base ([`LorsConfig::group_of`]: `groups` balanced groups
//!   of consecutive layers, or groups of `group_size`; `private_layers` stay fully private);
//! * **ranks** per projection and layer ([`LorsConfig::rank_for`]);
//! * **init** of the private factors ([`PrivateInit`]): as the paper's code, A Kaiming-uniform
//!   U(±1/√in) and B zero, so every layer starts equal to its shared base; no α/r scaling
//!   unless `alpha` is set;
//! * **parameter names** in checkpoints ([`base_name`], [`factor_names`]);
//! * **optimizer options** of each parameter kind ([`LorsConfig::options`]: learning-rate
//!   multipliers and weight decay of the private factors);
//! * the layer itself, [`LorsLinear`], which the model uses like a plain linear layer, so
//!   vanilla, shared and LORS stacks differ only by configuration.
//!
//! ## Merge per step, or factored?
//! Training uses the merged form `x (W + B A)ᵀ`. With N = batch·seq tokens, the factored
//! form `x Wᵀ + (x Aᵀ) Bᵀ` adds 2·N·r·(in+out) multiply-adds to the forward pass and twice
//! that to the backward pass, while merging costs r·in·out forward and 2·r·in·out backward
//! (dA = Bᵀ dW, dB = dW Aᵀ, where dW = dyᵀ x is needed anyway for the shared base).
//! Merging is cheaper whenever N > in·out / (2·(in+out)), i.e. N > d/4 for square weights:
//! always, for training batches. `benches/lors_merge.rs` measures both
//! (`cargo bench --bench lors_merge`); its numbers are in docs/performance.md.
//! Decoding (N = a few tokens) is the opposite case: `Model::factored` keeps the factors
//! (`model/stack.rs`), so a group's layers read one base, which stays in cache.

use crate::model::config::ModelConfig;
use crate::model::ops::{linear_as, Ops};
use crate::model::store::{Init, ParamStore, Role};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

// ---------------------------------------------------------------------------------------------
// What is shared
// ---------------------------------------------------------------------------------------------

/// The seven projection types of a Llama block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// Every projection type, in block order.
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The name used in configs, parameter names and TensorBoard tags.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }

    /// The projection type called `name`, if any.
    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether it belongs to attention (q, k, v, o) rather than the FFN.
    pub fn is_attn(self) -> bool {
        matches!(self, Proj::Q | Proj::K | Proj::V | Proj::O)
    }

    /// (out, in) of its weight.
    pub fn shape(self, m: &ModelConfig) -> (usize, usize) {
        let d = m.d_model;
        let kv = m.kv_heads() * m.head_dim();
        match self {
            Proj::Q | Proj::O => (d, d),
            Proj::K | Proj::V => (kv, d),
            Proj::Gate | Proj::Up => (m.ffn_hidden, d),
            Proj::Down => (d, m.ffn_hidden),
        }
    }
}

impl fmt::Display for Proj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the stacked layers share their projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every layer owns every projection (a plain Llama).
    Vanilla,
    /// ALBERT-style: one base per group, no private term.
    Shared,
    /// LORS: one base per group plus a private rank-r residual `B_l A_l` per layer.
    Lors,
    /// Nothing shared, every target projection low-rank: `W_l = B_l A_l` (the "truncated SVD
    /// per layer" baseline of compression).
    Lowrank,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Vanilla => "vanilla",
            Mode::Shared => "shared",
            Mode::Lors => "lors",
            Mode::Lowrank => "lowrank",
        }
    }

    /// The mode called `name` (`vanilla`, `shared`, `lors`).
    pub fn from_name(name: &str) -> Option<Mode> {
        [Mode::Vanilla, Mode::Shared, Mode::Lors, Mode::Lowrank].into_iter().find(|m| m.name() == name)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the private LORS factors start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrivateInit {
    /// A Kaiming-uniform (PyTorch Linear default), B zeros: the LORS paper's code.
    #[default]
    Paper,
    /// A and B both N(0, 0.02²).
    Small,
}

/// The `[lors]` section of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LorsConfig {
    /// "vanilla" | "shared" | "lors" | "lowrank".
    pub mode: Mode,
    /// Rank r of the private residual `B_l (out×r) · A_l (r×in)`.
    pub rank: usize,
    /// Rank for attention projections (q, k, v, o); overrides `rank`.
    pub attn_rank: Option<usize>,
    /// Rank for FFN projections (gate, up, down); overrides `rank`.
    pub ffn_rank: Option<usize>,
    /// Per-layer attention ranks (one per layer); overrides `attn_rank` and `rank`.
    /// The LORS DeiT config gives deeper layers more attention rank.
    pub attn_rank_schedule: Option<Vec<usize>>,
    /// Per-layer FFN ranks (one per layer); overrides `ffn_rank` and `rank`.
    /// The LORS DeiT config gives shallower layers more FFN rank.
    pub ffn_rank_schedule: Option<Vec<usize>>,
    /// Number of groups of consecutive layers that each own a shared base (1 = all layers).
    pub groups: usize,
    /// Layers per group instead of a number of groups (the last group may be smaller);
    /// overrides `groups`.
    pub group_size: Option<usize>,
    /// Layers that share nothing: each keeps full private weights (the "sandwich" pattern
    /// keeps the first and last layers unique, e.g. [0, 7]). The groups are formed over the
    /// other layers.
    pub private_layers: Vec<usize>,
    /// Projection types that are shared; the others stay private per layer.
    pub targets: Vec<Proj>,
    /// Per-projection, per-layer ranks (e.g. `q = [8, 12, 16, 8]`, one per layer; layers that
    /// share nothing take any value); override every other rank setting. `lors-lm compress
    /// --energy` writes them.
    pub proj_ranks: BTreeMap<Proj, Vec<usize>>,
    /// Initialisation of the private factors: "paper" (A Kaiming-uniform U(±1/√in), B zeros:
    /// every layer starts equal to its shared base) or "small" (A and B both N(0, 0.02²), the
    /// model's own init scale, so layers differ from step 0 and both factors get gradients).
    pub init: PrivateInit,
    /// Scale the residual by alpha / r, as LoRA does (W_l = W + (alpha/r)·B_l A_l); unset = no
    /// scaling, as in the paper.
    pub alpha: Option<f64>,
    /// Learning-rate multiplier for the private factors A and B (1 = the paper).
    pub private_lr_mult: f64,
    /// Learning-rate multiplier for B alone (LoRA+ gives B a larger one); unset = private_lr_mult.
    pub private_b_lr_mult: Option<f64>,
    /// AdamW weight decay of A and B; unset = train.weight_decay (the paper decays every matrix).
    pub private_weight_decay: Option<f64>,
}

impl Default for LorsConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Lors,
            rank: 16,
            attn_rank: None,
            ffn_rank: None,
            attn_rank_schedule: None,
            ffn_rank_schedule: None,
            groups: 1,
            group_size: None,
            private_layers: vec![],
            targets: Proj::ALL.to_vec(),
            proj_ranks: BTreeMap::new(),
            init: PrivateInit::Paper,
            alpha: None,
            private_lr_mult: 1.0,
            private_b_lr_mult: None,
            private_weight_decay: None,
        }
    }
}

/// Learning-rate multiplier and weight decay of one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamOptions {
    pub lr_mult: f64,
    pub weight_decay: f64,
}

impl LorsConfig {
    /// Whether layer `layer` keeps every projection private (`private_layers`).
    pub fn is_private_layer(&self, layer: usize) -> bool {
        self.private_layers.contains(&layer)
    }

    /// Whether projection `proj` of `layer` uses a shared base (shared or lors mode, a target
    /// type, a layer that is not private).
    pub fn is_shared(&self, proj: Proj, layer: usize) -> bool {
        matches!(self.mode, Mode::Shared | Mode::Lors) && self.is_target(proj, layer)
    }

    /// Whether projection `proj` of `layer` is one the mode changes: a target type in a layer
    /// that is not private.
    pub fn is_target(&self, proj: Proj, layer: usize) -> bool {
        self.mode != Mode::Vanilla && self.targets.contains(&proj) && !self.is_private_layer(layer)
    }

    /// Whether projection `proj` of `layer` has a base weight (all but `lowrank` targets).
    pub fn has_base(&self, proj: Proj, layer: usize) -> bool {
        !(self.mode == Mode::Lowrank && self.is_target(proj, layer))
    }

    /// The group (index of the shared base) of `layer` in a stack of `n_layers`, or None for a
    /// private layer. Groups are runs of consecutive shared layers (private layers excluded):
    /// `group_size` layers each, else `groups` groups as equal as possible, earlier groups one
    /// larger when the count does not divide.
    pub fn group_of(&self, layer: usize, n_layers: usize) -> Option<usize> {
        if self.is_private_layer(layer) {
            return None;
        }
        // Position of `layer` among the shared layers.
        let i = (0..layer).filter(|l| !self.is_private_layer(*l)).count();
        let n = (0..n_layers).filter(|l| !self.is_private_layer(*l)).count();
        if let Some(size) = self.group_size {
            return Some(i / size.max(1));
        }
        let g = self.groups.clamp(1, n.max(1));
        let (base, extra) = (n / g, n % g);
        // The first `extra` groups hold base+1 layers.
        let big = extra * (base + 1);
        Some(if i < big { i / (base + 1) } else { extra + (i - big) / base.max(1) })
    }

    /// Number of shared bases per projection type (groups over the shared layers).
    pub fn n_groups(&self, n_layers: usize) -> usize {
        (0..n_layers).filter_map(|l| self.group_of(l, n_layers)).max().map_or(0, |g| g + 1)
    }

    /// Rank of the private residual of `proj` at `layer` (0 when there is none).
    pub fn rank_for(&self, proj: Proj, layer: usize) -> usize {
        if !matches!(self.mode, Mode::Lors | Mode::Lowrank) || !self.is_target(proj, layer) {
            return 0;
        }
        if let Some(ranks) = self.proj_ranks.get(&proj) {
            return ranks[layer];
        }
        let (schedule, typed) = if proj.is_attn() {
            (&self.attn_rank_schedule, self.attn_rank)
        } else {
            (&self.ffn_rank_schedule, self.ffn_rank)
        };
        match schedule {
            Some(s) => s[layer],
            None => typed.unwrap_or(self.rank),
        }
    }

    /// Multiplier applied to B·A: alpha / r when `alpha` is set, else 1.
    pub fn residual_scale(&self, rank: usize) -> f64 {
        match self.alpha {
            Some(a) if rank > 0 => a / rank as f64,
            _ => 1.0,
        }
    }

    /// Optimizer options of a parameter of `role`: the private factors get the private
    /// multipliers and decay; other matrices the global decay; gains are never decayed.
    pub fn options(&self, role: Role, weight_decay: f64) -> ParamOptions {
        let private_wd = self.private_weight_decay.unwrap_or(weight_decay);
        match role {
            Role::Matrix => ParamOptions { lr_mult: 1.0, weight_decay },
            Role::Gain => ParamOptions { lr_mult: 1.0, weight_decay: 0.0 },
            Role::FactorA => ParamOptions { lr_mult: self.private_lr_mult, weight_decay: private_wd },
            Role::FactorB => ParamOptions {
                lr_mult: self.private_b_lr_mult.unwrap_or(self.private_lr_mult),
                weight_decay: private_wd,
            },
        }
    }

    /// Range checks that the types cannot express, against the model's dimensions.
    pub fn validate(&self, m: &ModelConfig) -> Result<()> {
        let check = |ok: bool, msg: String| if ok { Ok(()) } else { bail!("{msg}") };
        check(self.groups >= 1, "lors.groups must be >= 1".into())?;
        check(self.group_size.is_none_or(|s| s >= 1), "lors.group_size must be >= 1".into())?;
        check(self.private_lr_mult > 0.0, "lors.private_lr_mult must be > 0".into())?;
        check(self.private_b_lr_mult.is_none_or(|m| m > 0.0), "lors.private_b_lr_mult must be > 0".into())?;
        check(self.private_weight_decay.is_none_or(|w| w >= 0.0), "lors.private_weight_decay must be >= 0".into())?;
        check(self.alpha.is_none_or(|a| a > 0.0), "lors.alpha must be > 0 (leave it out for no scaling)".into())?;
        check(
            self.groups <= m.n_layers,
            format!("lors.groups ({}) cannot exceed model.n_layers ({})", self.groups, m.n_layers),
        )?;
        for &l in &self.private_layers {
            check(
                l < m.n_layers,
                format!("lors.private_layers: layer {l} does not exist (model.n_layers = {})", m.n_layers),
            )?;
        }
        let shared_layers = (0..m.n_layers).filter(|l| !self.is_private_layer(*l)).count();
        if self.group_size.is_none() && self.mode != Mode::Vanilla && shared_layers > 0 {
            check(
                self.groups <= shared_layers,
                format!(
                    "lors.groups ({}) exceeds the {shared_layers} layers that are not in lors.private_layers",
                    self.groups
                ),
            )?;
        }
        let per_proj = self.proj_ranks.iter().map(|(p, r)| (format!("lors.proj_ranks.{p}"), Some(r)));
        let schedules = [
            ("lors.attn_rank_schedule".to_string(), self.attn_rank_schedule.as_ref()),
            ("lors.ffn_rank_schedule".to_string(), self.ffn_rank_schedule.as_ref()),
        ];
        for (key, sched) in schedules.into_iter().chain(per_proj) {
            if let Some(s) = sched {
                check(
                    s.len() == m.n_layers,
                    format!("{key} has {} entries; it needs one per layer ({})", s.len(), m.n_layers),
                )?;
            }
        }
        if matches!(self.mode, Mode::Lors | Mode::Lowrank) {
            for layer in 0..m.n_layers {
                for p in Proj::ALL.into_iter().filter(|p| self.is_target(*p, layer)) {
                    let r = self.rank_for(p, layer);
                    let (out, inp) = p.shape(m);
                    check(
                        r >= 1,
                        format!("rank of {p} at layer {layer} is 0: {} mode needs rank >= 1 (use mode = \"shared\" for no private term)", self.mode),
                    )?;
                    check(
                        r <= out.min(inp),
                        format!(
                            "rank {r} of {p} at layer {layer} exceeds min(out, in) = {} of its weight",
                            out.min(inp)
                        ),
                    )?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Names of the parameters
// ---------------------------------------------------------------------------------------------

/// The (possibly shared) base weight of `proj` in `layer`: `shared.{g}.{p}.weight` for group g,
/// or the private `layers.{l}.{p}.weight`.
pub fn base_name(lors: &LorsConfig, proj: Proj, layer: usize, n_layers: usize) -> String {
    match lors.group_of(layer, n_layers) {
        Some(g) if lors.is_shared(proj, layer) => format!("shared.{g}.{proj}.weight"),
        _ => format!("layers.{layer}.{proj}.weight"),
    }
}

/// The private factors of `proj` in `layer`: (`layers.{l}.{p}.lors_a`, `layers.{l}.{p}.lors_b`).
pub fn factor_names(proj: Proj, layer: usize) -> (String, String) {
    (format!("layers.{layer}.{proj}.lors_a"), format!("layers.{layer}.{proj}.lors_b"))
}

// ---------------------------------------------------------------------------------------------
// The layer
// ---------------------------------------------------------------------------------------------

/// `y = x W_lᵀ` with `W_l = W_shared + s·B_l A_l` (or a plain weight without a residual).
///
/// `W_shared` is one variable shared by all layers of a group: every layer holds a clone of
/// the same tensor, so its gradient is the sum over those layers.
#[derive(Debug, Clone)]
pub struct LorsLinear {
    /// (out, in): the shared base, or a private full weight; None in `lowrank` mode.
    base: Option<Tensor>,
    /// Private residual: A (r, in), B (out, r).
    residual: Option<(Tensor, Tensor)>,
    /// Multiplier of B·A (α/r, or 1 without α).
    scale: f64,
}

impl LorsLinear {
    /// Projection `proj` of `layer`, its parameters created (or loaded) through `store` as the
    /// config's sharing, grouping, rank and init say.
    pub fn new(store: &mut ParamStore, lors: &LorsConfig, m: &ModelConfig, proj: Proj, layer: usize) -> Result<Self> {
        let (out, inp) = proj.shape(m);
        let base = match lors.has_base(proj, layer) {
            true => Some(store.get(
                &base_name(lors, proj, layer, m.n_layers),
                &[out, inp],
                Init::Normal(0.02),
                Role::Matrix,
            )?),
            false => None,
        };
        let rank = lors.rank_for(proj, layer);
        if rank == 0 {
            return Ok(Self { base, residual: None, scale: 1.0 });
        }
        let (a_init, b_init) = match (lors.init, &base) {
            // Without a base, B = 0 would start the layer at zero: both factors random.
            (_, None) | (PrivateInit::Small, _) => (Init::Normal(0.02), Init::Normal(0.02)),
            (PrivateInit::Paper, Some(_)) => (Init::Uniform(1.0 / (inp as f64).sqrt()), Init::Zeros),
        };
        let (a_name, b_name) = factor_names(proj, layer);
        let a = store.get(&a_name, &[rank, inp], a_init, Role::FactorA)?;
        let b = store.get(&b_name, &[out, rank], b_init, Role::FactorB)?;
        Ok(Self { base, residual: Some((a, b)), scale: lors.residual_scale(rank) })
    }

    /// A layer from explicit tensors (tests, benchmarks), without α scaling.
    pub fn from_parts(base: Tensor, residual: Option<(Tensor, Tensor)>) -> Self {
        Self { base: Some(base), residual, scale: 1.0 }
    }

    /// The effective weight `W + s·B A` (or `s·B A` without a base), (out, in), merged by
    /// `ops` (one fused op on the CPU).
    pub fn weight(&self, ops: Ops) -> Result<Tensor> {
        match (&self.base, &self.residual) {
            (Some(w), Some((a, b))) => ops.lors_merge(w, b, a, self.scale),
            (Some(w), None) => Ok(w.clone()),
            (None, Some((a, b))) => Ok((b.matmul(a)? * self.scale)?),
            (None, None) => bail!("a projection with neither a base nor factors"),
        }
    }

    /// `x (W + s·B A)ᵀ` for x (..., in) → (..., out): merged first, the matmul in `mm`
    /// (mixed precision: the output comes back in x's dtype).
    pub fn forward_as(&self, x: &Tensor, ops: Ops, mm: DType) -> Result<Tensor> {
        linear_as(x, &self.weight(ops)?, mm)
    }

    /// `forward_as` with plain candle ops in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, Ops::Plain, x.dtype())
    }

    /// `x Wᵀ + s·(x Aᵀ) Bᵀ`: the same map without forming `B A` (benchmarks and tests).
    pub fn forward_factored(&self, x: &Tensor) -> Result<Tensor> {
        let r = match &self.residual {
            Some((a, b)) => {
                let r = linear_as(&linear_as(x, a, x.dtype())?, b, x.dtype())?;
                Some(if self.scale == 1.0 { r } else { (r * self.scale)? })
            }
            None => None,
        };
        match (&self.base, r) {
            (Some(w), Some(r)) => Ok((linear_as(x, w, x.dtype())? + r)?),
            (Some(w), None) => linear_as(x, w, x.dtype()),
            (None, Some(r)) => Ok(r),
            (None, None) => bail!("a projection with neither a base nor factors"),
        }
    }

    /// A plain linear layer holding the merged weight, detached from the graph (inference).
    pub fn merged(&self) -> Result<Self> {
        Ok(Self { base: Some(self.weight(Ops::Plain)?.detach()), residual: None, scale: 1.0 })
    }

    /// Whether it has a base weight (all but `lowrank` targets).
    pub fn has_base(&self) -> bool {
        self.base.is_some()
    }

    /// The layer as stored: base (out, in) (None in `lowrank` mode), residual (A (r, in),
    /// B (out, r)) and scale s.
    pub fn parts(&self) -> (Option<&Tensor>, Option<(&Tensor, &Tensor)>, f64) {
        (self.base.as_ref(), self.residual.as_ref().map(|(a, b)| (a, b)), self.scale)
    }

    pub fn rank(&self) -> usize {
        self.residual.as_ref().map_or(0, |(a, _)| a.dims()[0])
    }

    /// ‖s·B A‖_F / ‖W_shared‖_F: how far this layer has moved from its shared base.
    pub fn residual_ratio(&self) -> Result<f32> {
        let (Some(base), Some((a, b))) = (&self.base, &self.residual) else { return Ok(0.0) };
        let norm =
            |t: &Tensor| -> Result<f32> { Ok(t.detach().sqr()?.sum_all()?.sqrt()?.to_dtype(DType::F32)?.to_scalar()?) };
        let delta = (b.matmul(a)? * self.scale)?;
        Ok(norm(&delta)? / norm(base)?.max(f32::MIN_POSITIVE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_consecutive_and_balanced() {
        let g = |l: &LorsConfig, n: usize| (0..n).map(|i| l.group_of(i, n)).collect::<Vec<_>>();
        let l = LorsConfig { groups: 2, ..Default::default() };
        assert_eq!(g(&l, 5), [0, 0, 0, 1, 1].map(Some));
        let l = LorsConfig { groups: 3, ..Default::default() };
        assert_eq!(g(&l, 6), [0, 0, 1, 1, 2, 2].map(Some));
        let l = LorsConfig { group_size: Some(2), ..Default::default() };
        assert_eq!(g(&l, 5), [0, 0, 1, 1, 2].map(Some));
        assert_eq!(l.n_groups(5), 3);
    }

    #[test]
    fn private_layers_share_nothing_and_groups_skip_them() {
        let l = LorsConfig { private_layers: vec![0, 5], group_size: Some(2), ..Default::default() };
        assert_eq!(
            (0..6).map(|i| l.group_of(i, 6)).collect::<Vec<_>>(),
            [None, Some(0), Some(0), Some(1), Some(1), None]
        );
        assert!(!l.is_shared(Proj::Q, 0) && l.is_shared(Proj::Q, 1));
        assert_eq!(l.rank_for(Proj::Q, 5), 0);
        assert_eq!(base_name(&l, Proj::Up, 5, 6), "layers.5.up.weight");
        assert_eq!(base_name(&l, Proj::Up, 3, 6), "shared.1.up.weight");
        let l = LorsConfig { private_layers: vec![0, 5], groups: 2, ..Default::default() };
        assert_eq!(
            (0..6).map(|i| l.group_of(i, 6)).collect::<Vec<_>>(),
            [None, Some(0), Some(0), Some(1), Some(1), None]
        );
    }

    #[test]
    fn schedules_override_ranks() {
        let l = LorsConfig { rank: 8, ffn_rank: Some(4), attn_rank_schedule: Some(vec![2, 6]), ..Default::default() };
        assert_eq!(l.rank_for(Proj::Q, 0), 2);
        assert_eq!(l.rank_for(Proj::O, 1), 6);
        assert_eq!(l.rank_for(Proj::Up, 1), 4);
        let v = LorsConfig { mode: Mode::Shared, ..Default::default() };
        assert_eq!(v.rank_for(Proj::Q, 0), 0);
    }

    #[test]
    fn private_factors_get_their_own_options() {
        let l = LorsConfig {
            private_lr_mult: 2.0,
            private_b_lr_mult: Some(8.0),
            private_weight_decay: Some(0.0),
            ..Default::default()
        };
        assert_eq!(l.options(Role::Matrix, 0.1), ParamOptions { lr_mult: 1.0, weight_decay: 0.1 });
        assert_eq!(l.options(Role::Gain, 0.1), ParamOptions { lr_mult: 1.0, weight_decay: 0.0 });
        assert_eq!(l.options(Role::FactorA, 0.1), ParamOptions { lr_mult: 2.0, weight_decay: 0.0 });
        assert_eq!(l.options(Role::FactorB, 0.1), ParamOptions { lr_mult: 8.0, weight_decay: 0.0 });
    }

    #[test]
    fn per_projection_ranks_override_and_survive_toml() {
        let mut l = LorsConfig { rank: 8, ..Default::default() };
        l.proj_ranks.insert(Proj::Up, vec![3, 5]);
        assert_eq!((l.rank_for(Proj::Up, 1), l.rank_for(Proj::Q, 1)), (5, 8));
        let text = toml::to_string(&l).unwrap();
        assert_eq!(toml::from_str::<LorsConfig>(&text).unwrap(), l, "{text}");
    }

    #[test]
    fn names_round_trip() {
        for p in Proj::ALL {
            assert_eq!(Proj::from_name(p.name()), Some(p));
        }
        assert_eq!(Mode::from_name("lors"), Some(Mode::Lors));
        assert_eq!(Proj::from_name("qkv"), None);
    }
}
