//! Projections that read the same input, computed together: [q, k, v], [gate, up], or one
//! alone (o, down). A [`Stack`] runs in one of three forms:
//!
//! * **training** (`Stack::new`): one differentiable [`LorsLinear`] per projection, each
//!   merged `W_shared + s·B_l A_l` per pass, then one matmul against the stacked weights;
//! * **merged** ([`Weights::Merged`]): the stacked effective weight, detached: a vanilla
//!   model's cost, whatever the sharing;
//! * **factored** ([`Weights::Factored`]): `x·Wᵀ + Σ_p s_p·(x·A_pᵀ)·B_pᵀ`. The bases are
//!   stacked once per group (every layer of the group holds the same tensor), the A of every
//!   part is stacked into one (Σr, in) matrix so `x·Aᵀ` is one small product, and each part's
//!   B adds onto its own output columns. Nothing of size out×in is formed per layer, so the
//!   model holds its unique parameters only. A `lowrank` model's target projections have no
//!   base: their columns get the low-rank term alone.
//!
//! On the CPU in f32, a few rows (decoding) go through `kernels::matvec`, which streams each
//! weight once and adds the low-rank terms on the way; more rows (prompts, evaluation) run
//! candle matmuls.

use crate::kernels::matvec::{linear_rows, F32View, LowRank, Segment};
use crate::model::config::ModelConfig;
use crate::model::lors::{LorsConfig, LorsLinear, Proj};
use crate::model::ops::{linear_as, Ops};
use crate::model::store::ParamStore;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, TensorId, D};
use std::collections::{HashMap, HashSet};

/// How a detached (inference) model keeps its projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// `W_shared + s·B_l A_l` folded into one matrix per layer: a vanilla model's cost.
    Merged,
    /// The shared bases and private factors as trained: the unique parameters only.
    Factored,
}

impl Weights {
    pub fn name(self) -> &'static str {
        match self {
            Weights::Merged => "merged",
            Weights::Factored => "factored",
        }
    }
}

/// Weight bytes a decoding step reads, and how many distinct bytes those are: what must
/// stay in cache for the reads to hit it (`Model::weight_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightBytes {
    pub read: u64,
    pub distinct: u64,
}

/// Rows of x up to which the CPU runs `kernels::matvec` rather than a matmul: measured
/// break-even against OpenBLAS/gemm (docs/performance.md, "Inference").
pub const MATVEC_MAX_ROWS: usize = 16;

/// Stacked bases built so far, keyed by the ids of the bases they stack: the layers of a
/// group share one tensor.
pub(crate) type BaseCache = HashMap<Vec<TensorId>, Tensor>;

/// One projection of a stack as the model was built: its shape, rank, and the id of its base
/// (the same for every layer of a group; None for a `lowrank` target, `W = s·B A`).
#[derive(Debug, Clone, Copy)]
struct Part {
    proj: Proj,
    out: usize,
    inp: usize,
    rank: usize,
    base: Option<TensorId>,
}

#[derive(Debug, Clone)]
enum Form {
    /// Training: one differentiable layer per projection.
    Layers(Vec<LorsLinear>),
    /// Detached for inference.
    Detached(Detached),
}

/// Detached weights: row-stacked base segments and, factored, the low-rank terms.
#[derive(Debug, Clone)]
struct Detached {
    /// (first output column, (rows, in)) each, in column order; columns none covers (parts
    /// without a base) are covered by a low-rank term.
    segments: Vec<(usize, Tensor)>,
    /// A of every part with a residual, stacked (Σr, in), and each such part's term.
    low: Option<(Tensor, Vec<LowTerm>)>,
}

/// `scale · t[:, t_col..t_col + rank] · Bᵀ` onto output columns `col..col + B rows`.
#[derive(Debug, Clone)]
struct LowTerm {
    col: usize,
    t_col: usize,
    /// (out_p, rank).
    b: Tensor,
    scale: f64,
}

#[derive(Debug, Clone)]
pub(crate) struct Stack {
    parts: Vec<Part>,
    form: Form,
}

impl Stack {
    pub(crate) fn new(
        store: &mut ParamStore,
        lors: &LorsConfig,
        m: &ModelConfig,
        layer: usize,
        projs: &[Proj],
    ) -> Result<Self> {
        let layers = projs.iter().map(|&p| LorsLinear::new(store, lors, m, p, layer)).collect::<Result<Vec<_>>>()?;
        let parts = projs
            .iter()
            .zip(&layers)
            .map(|(&proj, l)| {
                let (out, inp) = proj.shape(m);
                Part { proj, out, inp, rank: l.rank(), base: l.parts().0.map(Tensor::id) }
            })
            .collect();
        Ok(Self { parts, form: Form::Layers(layers) })
    }

    fn out(&self) -> usize {
        self.parts.iter().map(|p| p.out).sum()
    }

    /// The ids of the bases this stack reads (to find those several layers share).
    pub(crate) fn base_ids(&self) -> impl Iterator<Item = TensorId> + '_ {
        self.parts.iter().filter_map(|p| p.base)
    }

    /// x (..., in) → (..., Σ out).
    pub(crate) fn forward(&self, x: &Tensor, ops: Ops, mm: DType) -> Result<Tensor> {
        match &self.form {
            Form::Layers(layers) => {
                let ws = layers.iter().map(|l| l.weight(ops)).collect::<Result<Vec<_>>>()?;
                let w = if ws.len() == 1 { ws[0].clone() } else { Tensor::cat(&ws, 0)? }; // (Σ out, in)
                linear_as(x, &w, mm)
            }
            Form::Detached(d) if use_matvec(x, ops, mm) => d.forward_matvec(x, self.out()),
            Form::Detached(d) => d.forward_matmul(x, mm, self.out()),
        }
    }

    /// The detached inference form. `shared`: bases used by more than one layer (stacked
    /// once through `cache`, never copied per layer).
    pub(crate) fn detached(&self, w: Weights, shared: &HashSet<TensorId>, cache: &mut BaseCache) -> Result<Self> {
        let form = match (&self.form, w) {
            (Form::Detached(_), _) => bail!("the model is already detached for inference"),
            (Form::Layers(layers), Weights::Merged) => {
                let ws = layers.iter().map(|l| Ok(l.weight(Ops::Plain)?.detach())).collect::<Result<Vec<_>>>()?;
                let w = if ws.len() == 1 { ws[0].clone() } else { Tensor::cat(&ws, 0)? }; // (Σ out, in)
                Detached { segments: vec![(0, w)], low: None }
            }
            (Form::Layers(layers), Weights::Factored) => factored(&self.parts, layers, shared, cache)?,
        };
        Ok(Self { parts: self.parts.clone(), form: Form::Detached(form) })
    }

    /// The training layer of `proj` (None once detached or when absent).
    pub(crate) fn part(&self, proj: Proj) -> Option<&LorsLinear> {
        let i = self.parts.iter().position(|p| p.proj == proj)?;
        match &self.form {
            Form::Layers(layers) => Some(&layers[i]),
            Form::Detached(_) => None,
        }
    }

    /// The effective weight `W + s·B A` of `proj` (out, in), in any form.
    pub(crate) fn weight_of(&self, proj: Proj) -> Result<Option<Tensor>> {
        let Some(i) = self.parts.iter().position(|p| p.proj == proj) else { return Ok(None) };
        let d = match &self.form {
            Form::Layers(layers) => return Ok(Some(layers[i].weight(Ops::Plain)?)),
            Form::Detached(d) => d,
        };
        let (col, rows) = (self.parts[..i].iter().map(|p| p.out).sum::<usize>(), self.parts[i].out);
        let mut base = None;
        for (start, seg) in &d.segments {
            if col >= *start && col < start + seg.dim(0)? {
                base = Some(seg.narrow(0, col - start, rows)?);
            }
        }
        let term = d.low.as_ref().and_then(|(a, terms)| Some((a, terms.iter().find(|t| t.col == col)?)));
        let low = match term {
            Some((a, term)) => {
                let ba = term.b.matmul(&a.narrow(0, term.t_col, term.b.dim(1)?)?)?; // (out, r) x (r, in)
                Some((ba * term.scale)?)
            }
            None => None,
        };
        Ok(Some(match (base, low) {
            (Some(w), Some(ba)) => (w + ba)?,
            (Some(w), None) => w,
            (None, Some(ba)) => ba,
            (None, None) => bail!("projection {proj} lies outside its stack's weights"),
        }))
    }

    /// Weight elements a forward pass of one token reads in form `w`, and those of them not
    /// already in `seen` (distinct storage): the cache footprint.
    pub(crate) fn elements(&self, w: Weights, seen: &mut HashSet<TensorId>) -> (u64, u64) {
        let (mut read, mut distinct) = (0u64, 0u64);
        for p in &self.parts {
            let (full, low) = ((p.out * p.inp) as u64, (p.rank * (p.out + p.inp)) as u64);
            // A base not yet counted: a shared one counts in its first layer only.
            let mut new_base = |id: Option<TensorId>| id.is_some_and(|id| seen.insert(id));
            match w {
                // Every layer its own matrix, except a lone projection without a residual,
                // which keeps its (possibly shared) base as it is.
                Weights::Merged => {
                    let keeps_base = self.parts.len() == 1 && p.rank == 0;
                    let counted = !keeps_base || new_base(p.base);
                    (read, distinct) = (read + full, distinct + if counted { full } else { 0 })
                }
                // The base (none for a lowrank target) and the factors.
                Weights::Factored => {
                    let base = if p.base.is_some() { full } else { 0 };
                    let counted = new_base(p.base);
                    (read, distinct) = (read + base + low, distinct + low + if counted { base } else { 0 })
                }
            }
        }
        (read, distinct)
    }
}

/// What a part's base is, for grouping consecutive parts into one stacked segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BaseKind {
    /// Used by several layers: stacked once for all of them.
    Shared,
    /// This layer's own.
    Private,
    /// No base (`lowrank` target): no segment, the low-rank term alone.
    None,
}

/// The factored form: bases in segments of consecutive parts that are all shared (stacked
/// once for all layers through `cache`) or all private to this layer, none for parts without
/// a base; A's stacked; B's kept.
fn factored(
    parts: &[Part],
    layers: &[LorsLinear],
    shared: &HashSet<TensorId>,
    cache: &mut BaseCache,
) -> Result<Detached> {
    let kind = |p: &Part| match p.base {
        Some(id) if shared.contains(&id) => BaseKind::Shared,
        Some(_) => BaseKind::Private,
        None => BaseKind::None,
    };
    let mut segments = vec![];
    let (mut i, mut col) = (0, 0);
    while i < parts.len() {
        let k = kind(&parts[i]);
        let n = parts[i..].iter().take_while(|p| kind(p) == k).count();
        let rows: usize = parts[i..i + n].iter().map(|p| p.out).sum();
        let bases: Vec<Tensor> = layers[i..i + n].iter().filter_map(|l| l.parts().0.map(Tensor::detach)).collect();
        let key: Vec<TensorId> = parts[i..i + n].iter().filter_map(|p| p.base).collect();
        let stack = |bases: &[Tensor]| -> Result<Tensor> {
            Ok(if bases.len() == 1 { bases[0].clone() } else { Tensor::cat(bases, 0)? })
            // (Σ out, in)
        };
        match k {
            BaseKind::Shared => {
                let t = match cache.get(&key) {
                    Some(t) => t.clone(),
                    None => cache.entry(key).or_insert(stack(&bases)?).clone(),
                };
                segments.push((col, t));
            }
            BaseKind::Private => segments.push((col, stack(&bases)?)),
            BaseKind::None => {}
        }
        (i, col) = (i + n, col + rows);
    }
    let (mut a_rows, mut terms, mut col) = (vec![], vec![], 0);
    for (p, l) in parts.iter().zip(layers) {
        if let (_, Some((a, b)), scale) = l.parts() {
            let t_col = a_rows.iter().map(|a: &Tensor| a.dims()[0]).sum();
            a_rows.push(a.detach());
            terms.push(LowTerm { col, t_col, b: b.detach().contiguous()?, scale });
        }
        col += p.out;
    }
    let low = match a_rows.len() {
        0 => None,
        1 => Some((a_rows[0].contiguous()?, terms)),
        _ => Some((Tensor::cat(&a_rows, 0)?, terms)), // (Σ r, in)
    };
    Ok(Detached { segments, low })
}

/// Whether `x` goes through `kernels::matvec`: few rows, f32 on the CPU, fused ops.
fn use_matvec(x: &Tensor, ops: Ops, mm: DType) -> bool {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    ops == Ops::Fused && mm == DType::F32 && x.dtype() == DType::F32 && x.device().is_cpu() && rows <= MATVEC_MAX_ROWS
}

/// `x wᵀ` of a detached weight w (out, in): `kernels::matvec` for a few rows on the CPU,
/// else a matmul in `mm`. For the LM head of an inference model.
pub(crate) fn linear_detached(x: &Tensor, w: &Tensor, ops: Ops, mm: DType) -> Result<Tensor> {
    let d = Detached { segments: vec![(0, w.clone())], low: None };
    if use_matvec(x, ops, mm) {
        d.forward_matvec(x, w.dim(0)?)
    } else {
        d.forward_matmul(x, mm, w.dim(0)?)
    }
}

impl Detached {
    /// x (..., in) → (..., out) through `kernels::matvec`.
    fn forward_matvec(&self, x: &Tensor, out: usize) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let m = x.elem_count() / inp;
        let x2 = x.reshape((m, inp))?.contiguous()?; // (..., in) -> (M, in)
        let xv = F32View::new(&x2, "linear input")?;
        let xs = xv.slice()?;
        let t = match &self.low {
            Some((a, _)) => {
                let av = F32View::new(a, "LORS factor A")?;
                let r = a.dim(0)?;
                Some((linear_rows(xs, (m, inp), &[Segment { w: av.slice()?, col: 0 }], None, &[], r)?, r))
            }
            None => None,
        };
        let seg_views =
            self.segments.iter().map(|(_, w)| F32View::new(w, "weight")).collect::<candle_core::Result<Vec<_>>>()?;
        let b_views = match &self.low {
            Some((_, terms)) => {
                terms.iter().map(|t| F32View::new(&t.b, "LORS factor B")).collect::<candle_core::Result<_>>()?
            }
            None => vec![],
        };
        let segments = seg_views
            .iter()
            .zip(&self.segments)
            .map(|(v, (col, _))| Ok(Segment { w: v.slice()?, col: *col }))
            .collect::<Result<Vec<_>>>()?;
        let terms = self.low.as_ref().map_or(&[][..], |(_, t)| t.as_slice());
        let low = terms
            .iter()
            .zip(&b_views)
            .map(|(t, v)| {
                let b = v.slice()?;
                Ok(LowRank { b, col: t.col, rank: t.b.dim(1)?, t_col: t.t_col, scale: t.scale as f32 })
            })
            .collect::<Result<Vec<_>>>()?;
        let y = linear_rows(xs, (m, inp), &segments, t.as_ref().map(|(t, r)| (t.as_slice(), *r)), &low, out)?;
        let mut shape = dims;
        *shape.last_mut().expect("x has a last dim") = out;
        Ok(Tensor::from_vec(y, shape, x.device())?) // (M, out) -> (..., out)
    }

    /// x (..., in) → (..., out) with candle matmuls in `mm`: the segments' products and the
    /// low-rank terms, each laid on its output columns, summed.
    fn forward_matmul(&self, x: &Tensor, mm: DType, out: usize) -> Result<Tensor> {
        let base = self.segments.iter().map(|(col, w)| Ok((*col, linear_as(x, w, mm)?))).collect::<Result<Vec<_>>>()?;
        let base = spread(x, base, out)?;
        let Some((a, terms)) = &self.low else {
            return base.ok_or_else(|| anyhow::anyhow!("a detached stack with neither weights nor factors"));
        };
        let t = linear_as(x, a, mm)?; // (..., Σ r)
        let mut low = Vec::with_capacity(terms.len());
        for term in terms {
            let c = linear_as(&t.narrow(D::Minus1, term.t_col, term.b.dim(1)?)?, &term.b, mm)?; // (..., out_p)
            low.push((term.col, if term.scale == 1.0 { c } else { (c * term.scale)? }));
        }
        let low = spread(x, low, out)?.ok_or_else(|| anyhow::anyhow!("factors without low-rank terms"))?;
        Ok(match base {
            Some(y) => (y + low)?,
            None => low,
        }) // (..., out)
    }
}

/// Outputs (..., n_i) at columns col_i laid side by side into (..., out), zeros between them;
/// None without any.
fn spread(x: &Tensor, pieces: Vec<(usize, Tensor)>, out: usize) -> Result<Option<Tensor>> {
    if pieces.len() == 1 && pieces[0].0 == 0 && pieces[0].1.dim(D::Minus1)? == out {
        return Ok(pieces.into_iter().next().map(|(_, y)| y));
    }
    let Some((_, first)) = pieces.first() else { return Ok(None) };
    let (dtype, device) = (first.dtype(), first.device().clone());
    let zeros = |n: usize| -> Result<Tensor> {
        let mut shape = x.dims()[..x.rank() - 1].to_vec();
        shape.push(n);
        Ok(Tensor::zeros(shape, dtype, &device)?)
    };
    let (mut all, mut col) = (vec![], 0);
    for (c, y) in pieces {
        if c > col {
            all.push(zeros(c - col)?);
        }
        col = c + y.dim(D::Minus1)?;
        all.push(y);
    }
    if col < out {
        all.push(zeros(out - col)?);
    }
    Ok(Some(Tensor::cat(&all, D::Minus1)?))
}
