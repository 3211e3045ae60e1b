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
//!   model holds its unique parameters only.
//!
//! On the CPU in f32, a few rows (decoding) go through `kernels::matvec`, which streams each
//! weight once and adds the low-rank terms on the way; more rows (prompts, evaluation) run
//! candle matmuls.

use crate::kernels::matvec::{linear_rows, F32View, LowRank, Segment};
use crate::model::lors::{LorsConfig, LorsLinear, Proj};
use crate::model::ops::{linear_as, Ops};
use crate::model::store::ParamStore;
use crate::model::ModelConfig;
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
/// (the same for every layer of a group).
#[derive(Debug, Clone, Copy)]
struct Part {
    proj: Proj,
    out: usize,
    inp: usize,
    rank: usize,
    base: TensorId,
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
    /// (rows, in) each, tiling the output columns in order.
    segments: Vec<Tensor>,
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
                Part { proj, out, inp, rank: l.rank(), base: l.parts().0.id() }
            })
            .collect();
        Ok(Self { parts, form: Form::Layers(layers) })
    }

    fn out(&self) -> usize {
        self.parts.iter().map(|p| p.out).sum()
    }

    /// The ids of the bases this stack reads (to find those several layers share).
    pub(crate) fn base_ids(&self) -> impl Iterator<Item = TensorId> + '_ {
        self.parts.iter().map(|p| p.base)
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
                Detached { segments: vec![w], low: None }
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
        let mut start = 0;
        for seg in &d.segments {
            let n = seg.dim(0)?;
            if col >= start && col < start + n {
                let mut w = seg.narrow(0, col - start, rows)?;
                if let Some((a, terms)) = &d.low {
                    if let Some(term) = terms.iter().find(|t| t.col == col) {
                        let rank = term.b.dim(1)?;
                        let ba = term.b.matmul(&a.narrow(0, term.t_col, rank)?)?; // (out, r) x (r, in)
                        w = (w + (ba * term.scale)?)?;
                    }
                }
                return Ok(Some(w));
            }
            start += n;
        }
        bail!("projection {proj} lies outside its stack's weights")
    }

    /// Weight elements a forward pass of one token reads in form `w`, and those of them not
    /// already in `seen` (distinct storage): the cache footprint.
    pub(crate) fn elements(&self, w: Weights, seen: &mut HashSet<TensorId>) -> (u64, u64) {
        let (mut read, mut distinct) = (0u64, 0u64);
        for p in &self.parts {
            let (base, low) = ((p.out * p.inp) as u64, (p.rank * (p.out + p.inp)) as u64);
            // Merged: every layer its own matrix, except a lone projection without a residual,
            // which keeps its (possibly shared) base as it is.
            let keeps_base = w == Weights::Factored || (self.parts.len() == 1 && p.rank == 0);
            let new_base = !keeps_base || seen.insert(p.base);
            match w {
                Weights::Merged => (read, distinct) = (read + base, distinct + if new_base { base } else { 0 }),
                Weights::Factored => {
                    (read, distinct) = (read + base + low, distinct + low + if new_base { base } else { 0 })
                }
            }
        }
        (read, distinct)
    }
}

/// The factored form: bases in segments of consecutive parts that are all shared (stacked
/// once for all layers through `cache`) or all private to this layer; A's stacked; B's kept.
fn factored(
    parts: &[Part],
    layers: &[LorsLinear],
    shared: &HashSet<TensorId>,
    cache: &mut BaseCache,
) -> Result<Detached> {
    let mut segments = vec![];
    let mut i = 0;
    while i < parts.len() {
        let kind = shared.contains(&parts[i].base);
        let n = parts[i..].iter().take_while(|p| shared.contains(&p.base) == kind).count();
        let bases: Vec<Tensor> = layers[i..i + n].iter().map(|l| l.parts().0.detach()).collect();
        let key: Vec<TensorId> = parts[i..i + n].iter().map(|p| p.base).collect();
        let stack = |bases: &[Tensor]| -> Result<Tensor> {
            Ok(if bases.len() == 1 { bases[0].clone() } else { Tensor::cat(bases, 0)? })
            // (Σ out, in)
        };
        segments.push(match (kind, cache.get(&key).cloned()) {
            (true, Some(t)) => t,
            (true, None) => cache.entry(key).or_insert(stack(&bases)?).clone(),
            (false, _) => stack(&bases)?,
        });
        i += n;
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
    let d = Detached { segments: vec![w.clone()], low: None };
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
            self.segments.iter().map(|w| F32View::new(w, "weight")).collect::<candle_core::Result<Vec<_>>>()?;
        let b_views = match &self.low {
            Some((_, terms)) => {
                terms.iter().map(|t| F32View::new(&t.b, "LORS factor B")).collect::<candle_core::Result<_>>()?
            }
            None => vec![],
        };
        let mut segments = Vec::with_capacity(seg_views.len());
        let mut col = 0;
        for v in &seg_views {
            let w = v.slice()?;
            segments.push(Segment { w, col });
            col += w.len() / inp;
        }
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

    /// x (..., in) → (..., out) with candle matmuls in `mm`.
    fn forward_matmul(&self, x: &Tensor, mm: DType, out: usize) -> Result<Tensor> {
        let ys = self.segments.iter().map(|w| linear_as(x, w, mm)).collect::<Result<Vec<_>>>()?;
        let y = if ys.len() == 1 { ys[0].clone() } else { Tensor::cat(&ys, D::Minus1)? }; // (..., out)
        let Some((a, terms)) = &self.low else { return Ok(y) };
        let t = linear_as(x, a, mm)?; // (..., Σ r)
        let lead = &x.dims()[..x.rank() - 1];
        let zeros = |n: usize| -> Result<Tensor> {
            let mut shape = lead.to_vec();
            shape.push(n);
            Ok(Tensor::zeros(shape, y.dtype(), y.device())?)
        };
        let (mut pieces, mut col) = (vec![], 0);
        for term in terms {
            if term.col > col {
                pieces.push(zeros(term.col - col)?);
            }
            let rank = term.b.dim(1)?;
            let c = linear_as(&t.narrow(D::Minus1, term.t_col, rank)?, &term.b, mm)?; // (..., out_p)
            pieces.push(if term.scale == 1.0 { c } else { (c * term.scale)? });
            col = term.col + term.b.dim(0)?;
        }
        if col < out {
            pieces.push(zeros(out - col)?);
        }
        Ok((y + Tensor::cat(&pieces, D::Minus1)?)?) // (..., out)
    }
}
