//! Compression: turn a trained Llama (any stack, as its merged per-layer weights) into a LORS
//! model, the initialisation that Relaxed Recursive Transformers (ICLR 2025) use:
//!
//! ```text
//! for every shared projection type p and group g of layers:
//!     W_shared = mean of W_l over the layers l of g
//!     for every layer l of g:  (B_l, A_l) = rank-r truncated SVD of W_l − W_shared
//!                              B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ      (exact at full rank)
//! ```
//! Private layers (`private_layers`) and projection types that are not targets keep their full
//! weights; embeddings, norms and the head are copied. The rank of each projection is fixed
//! (`rank`, `attn_rank`, `ffn_rank`) or chosen per projection and layer to keep a fraction of
//! the residual's energy (`energy`: Σ_{i<r} σ_i² / Σ σ_i²), or to keep the largest such fraction
//! that fits a budget of block parameters (`budget`). The result is a LORS config and
//! its named tensors; `lors-lm compress` writes them as a run directory.

pub mod calibrate;
pub mod svd;

use crate::model::lors::{factor_names, LorsConfig, Mode, Proj};
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};
use calibrate::Calibration;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use svd::ResidualSvd;

/// What to compress into.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// `Lors` (shared bases + private residuals) or `Lowrank` (no sharing: each layer's
    /// weight itself truncated, W_l ≈ B_l A_l — the per-layer SVD baseline).
    pub mode: Mode,
    /// Rank of every private residual (unless attn_rank / ffn_rank / energy decide).
    pub rank: usize,
    pub attn_rank: Option<usize>,
    pub ffn_rank: Option<usize>,
    /// Number of groups of consecutive layers, or (instead) layers per group.
    pub groups: usize,
    pub group_size: Option<usize>,
    /// Projection types that share a base; the others stay private.
    pub targets: Vec<Proj>,
    /// Layers that keep all their weights.
    pub private_layers: Vec<usize>,
    /// Choose each projection's rank to keep this fraction of its residual's energy.
    pub energy: Option<f64>,
    /// Or: the most block parameters (bases, private weights and factors) the result may
    /// have; the largest energy fraction that fits decides the ranks (as `energy` would).
    pub budget: Option<usize>,
}

/// One projection of one layer after compression.
#[derive(Debug, Clone, Serialize)]
pub struct ProjReport {
    pub proj: Proj,
    pub layer: usize,
    /// The group whose base it shares (None: kept private).
    pub group: Option<usize>,
    /// Rank of its private residual (0 when kept private).
    pub rank: usize,
    /// Fraction of ‖W_l − W_shared‖²_F the residual keeps (1 when kept private); with a
    /// calibration, of ‖(W_l − W_shared) X‖²_F over the calibration inputs X.
    pub energy_kept: f64,
    /// ‖W_l − W_shared‖_F / ‖W_l‖_F: how far the layer is from its group's mean.
    pub residual_norm: f64,
}

pub struct Compressed {
    pub lors: LorsConfig,
    /// Every parameter of the LORS model, named as the model names them.
    pub tensors: HashMap<String, Tensor>,
    pub report: Vec<ProjReport>,
    /// The energy fraction that decided the ranks (`energy`, or the one `budget` chose).
    pub energy: Option<f64>,
}

impl Spec {
    /// The LORS config this spec asks for (ranks per projection are filled in by `compress`
    /// when `energy` decides them).
    pub fn lors_config(&self) -> LorsConfig {
        LorsConfig {
            mode: self.mode,
            rank: self.rank,
            attn_rank: self.attn_rank,
            ffn_rank: self.ffn_rank,
            groups: self.groups,
            group_size: self.group_size,
            private_layers: self.private_layers.clone(),
            targets: self.targets.clone(),
            ..LorsConfig::default()
        }
    }
}

/// Compress the vanilla-named weights `source` (`Model::merged_tensors`) of a model with
/// dimensions `m` as `spec` says.
pub fn compress(m: &ModelConfig, source: &HashMap<String, Tensor>, spec: &Spec) -> Result<Compressed> {
    compress_calibrated(m, source, spec, None)
}

/// `compress`, activation-aware when a calibration of the source is given (every residual's
/// SVD whitened by its input's Gram matrix, `svd::Whitening`). Three steps: bases and private
/// weights, the SVD of every residual, then the ranks (fixed, by energy, or by budget) and the
/// factors.
pub fn compress_calibrated(
    m: &ModelConfig,
    source: &HashMap<String, Tensor>,
    spec: &Spec,
    calib: Option<&Calibration>,
) -> Result<Compressed> {
    if !matches!(spec.mode, Mode::Lors | Mode::Lowrank) {
        bail!("compression writes a lors or lowrank model, not {}", spec.mode);
    }
    if let Some(f) = spec.energy {
        if !(f > 0.0 && f <= 1.0) {
            bail!("--energy {f}: the fraction of residual energy to keep must be in (0, 1]");
        }
    }
    let mut lors = spec.lors_config();
    let mut tensors = HashMap::new();
    let mut report = vec![];
    let get = |name: &str| -> Result<Tensor> {
        let t = source.get(name).with_context(|| format!("the source model has no tensor {name}"))?;
        Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    };
    for name in ["embed.weight", "norm.weight", "lm_head.weight"] {
        if source.contains_key(name) {
            tensors.insert(name.to_string(), get(name)?);
        }
    }
    for l in 0..m.n_layers {
        for n in ["attn_norm", "ffn_norm"] {
            let name = format!("layers.{l}.{n}.weight");
            tensors.insert(name.clone(), get(&name)?);
        }
    }
    let n = m.n_layers;
    // 1. Full weights of what stays private, bases of the groups, the SVD of every residual.
    let mut fixed = 0; // block parameters that do not depend on the ranks
    let mut residuals = vec![];
    for p in Proj::ALL {
        for l in (0..n).filter(|&l| !lors.is_target(p, l)) {
            let name = format!("layers.{l}.{p}.weight");
            let w = get(&name)?;
            fixed += w.elem_count();
            tensors.insert(name, w);
            report.push(ProjReport { proj: p, layer: l, group: None, rank: 0, energy_kept: 1.0, residual_norm: 0.0 });
        }
        // Low rank without sharing: each layer's own weight, truncated.
        for l in (0..n).filter(|&l| lors.is_target(p, l) && !lors.has_base(p, l)) {
            let w = get(&format!("layers.{l}.{p}.weight"))?;
            residuals.push(Residual::new(p, l, None, &w, &w.zeros_like()?, calib)?);
        }
        for g in 0..lors.n_groups(n) {
            let layers: Vec<usize> =
                (0..n).filter(|&l| lors.is_shared(p, l) && lors.group_of(l, n) == Some(g)).collect();
            if layers.is_empty() {
                continue;
            }
            let weights = layers.iter().map(|l| get(&format!("layers.{l}.{p}.weight"))).collect::<Result<Vec<_>>>()?;
            let shared = (Tensor::stack(&weights, 0)?.sum(0)? / layers.len() as f64)?; // (out, in)
            for (&l, w) in layers.iter().zip(&weights) {
                residuals.push(Residual::new(p, l, Some(g), w, &shared, calib)?);
            }
            fixed += shared.elem_count();
            tensors.insert(format!("shared.{g}.{p}.weight"), shared);
        }
    }
    // 2. The ranks.
    let energy = match spec.budget {
        Some(budget) => Some(energy_for_budget(&residuals, fixed, budget)?),
        None => spec.energy,
    };
    let ranks: Vec<usize> = residuals
        .iter()
        .map(|r| match energy {
            Some(f) => r.svd.rank_for_energy(f),
            None => lors.rank_for(r.proj, r.layer),
        })
        .collect();
    // 3. The factors.
    for (r, &rank) in residuals.iter().zip(&ranks) {
        report.push(r.factors(rank, &mut tensors)?);
        if energy.is_some() {
            lors.proj_ranks.entry(r.proj).or_insert_with(|| vec![0; n])[r.layer] = rank;
        }
    }
    report.sort_by_key(|r| (r.layer, r.proj));
    Ok(Compressed { lors, tensors, report, energy })
}

/// The largest fraction of residual energy that every projection can keep (each with the
/// smallest rank that keeps it) while the block parameters stay within `budget`; `fixed`
/// counts the bases and private weights. Bisection: the parameter count only grows with the
/// fraction.
fn energy_for_budget(residuals: &[Residual], fixed: usize, budget: usize) -> Result<f64> {
    let params = |f: f64| -> usize {
        fixed + residuals.iter().map(|r| r.svd.rank_for_energy(f) * (r.svd.rows + r.svd.cols)).sum::<usize>()
    };
    let least = params(0.0);
    if least > budget {
        bail!(
            "--budget: the bases and private weights ({fixed} parameters) plus rank 1 everywhere take {least} block parameters, more than the budget of {budget}: allow a larger budget, or use fewer groups / private layers"
        );
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    if params(hi) <= budget {
        return Ok(hi);
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if params(mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// One residual `W_l − W_shared` (`shared` = 0 for low rank without sharing) and its SVD.
struct Residual {
    proj: Proj,
    layer: usize,
    group: Option<usize>,
    svd: ResidualSvd,
    /// ‖W_l − W_shared‖_F / ‖W_l‖_F: how far the layer is from its group's mean.
    residual_norm: f64,
}

impl Residual {
    fn new(
        proj: Proj,
        layer: usize,
        group: Option<usize>,
        w: &Tensor,
        shared: &Tensor,
        calib: Option<&Calibration>,
    ) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let residual = (w - shared)?;
        let white = calib.map(|c| c.whitening(proj, layer)).transpose()?;
        let svd = ResidualSvd::new_whitened(&residual.flatten_all()?.to_vec1::<f32>()?, out, inp, white)?;
        let norm =
            |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.sqrt()) };
        let residual_norm = norm(&residual)? / norm(w)?.max(f64::MIN_POSITIVE);
        Ok(Self { proj, layer, group, svd, residual_norm })
    }

    /// Writes the rank-`rank` factors into `tensors`; returns the projection's report.
    fn factors(&self, rank: usize, tensors: &mut HashMap<String, Tensor>) -> Result<ProjReport> {
        let (proj, svd) = (self.proj, &self.svd);
        if rank > svd.k() {
            bail!(
                "rank {rank} of {proj} is larger than min(out, in) = {} of its {}×{} weight: choose a rank ≤ {}",
                svd.k(),
                svd.rows,
                svd.cols,
                svd.k()
            );
        }
        let (b, a) = svd.factors(rank)?;
        let (a_name, b_name) = factor_names(proj, self.layer);
        tensors.insert(a_name, Tensor::from_vec(a, (rank, svd.cols), &Device::Cpu)?);
        tensors.insert(b_name, Tensor::from_vec(b, (svd.rows, rank), &Device::Cpu)?);
        let (layer, group, residual_norm, energy_kept) =
            (self.layer, self.group, self.residual_norm, svd.energy_kept(rank));
        Ok(ProjReport { proj, layer, group, rank, energy_kept, residual_norm })
    }
}

/// Layer dropping (the simplest compression, a baseline): the layers `keep` of a vanilla-named
/// model, renumbered 0.., as a model of `keep.len()` layers.
pub fn keep_layers(
    m: &ModelConfig,
    source: &HashMap<String, Tensor>,
    keep: &[usize],
) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep.iter().any(|&l| l >= m.n_layers) {
        bail!("--keep-layers {keep:?}: expected increasing layers in 0..{}", m.n_layers);
    }
    let mut out = HashMap::new();
    for (name, t) in source {
        let renamed = match name.strip_prefix("layers.").and_then(|r| r.split_once('.')) {
            Some((layer, rest)) => {
                let l: usize = layer.parse().with_context(|| format!("tensor {name}: bad layer number"))?;
                match keep.iter().position(|&k| k == l) {
                    Some(new) => format!("layers.{new}.{rest}"),
                    None => continue,
                }
            }
            None => name.clone(),
        };
        out.insert(renamed, t.clone());
    }
    Ok((ModelConfig { n_layers: keep.len(), ..m.clone() }, out))
}

/// Energy kept per projection type, averaged over its shared layers (for summaries).
pub fn mean_energy_by_proj(report: &[ProjReport]) -> BTreeMap<Proj, f64> {
    let mut acc: BTreeMap<Proj, (f64, usize)> = BTreeMap::new();
    for r in report.iter().filter(|r| r.rank > 0) {
        let e = acc.entry(r.proj).or_default();
        e.0 += r.energy_kept;
        e.1 += 1;
    }
    acc.into_iter().map(|(p, (s, n))| (p, s / n as f64)).collect()
}
