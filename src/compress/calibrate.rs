//! Calibration for activation-aware compression (`compress --calibrate DIR`): the Gram
//! matrix Σ x xᵀ of every projection input of the source model, over windows of prepared
//! data, from which `svd::Whitening` makes each residual's SVD minimise the error on the
//! inputs the layer really sees instead of the error on its weights.
//!
//! A block has four projection inputs: the attention-normed stream (q, k, v), the attention
//! output (o), the FFN-normed stream (gate, up) and the SwiGLU hidden state (down).

use super::svd::Whitening;
use crate::data::{Meta, TokenFile};
use crate::model::{Model, Proj};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Which input of a block a projection reads (the first projection that reads it).
fn site(p: Proj) -> Proj {
    match p {
        Proj::Q | Proj::K | Proj::V => Proj::Q,
        Proj::O => Proj::O,
        Proj::Gate | Proj::Up => Proj::Gate,
        Proj::Down => Proj::Down,
    }
}

/// (layer, site) → (n, row-major n × n Σ x xᵀ).
type Grams = HashMap<(usize, Proj), (usize, Vec<f64>)>;

/// The whitening of every projection input of a model, one per block input (q, k and v share
/// theirs, as gate and up do), each computed once from its Gram matrix.
pub struct Calibration {
    /// (layer, site) → its whitening.
    whitenings: HashMap<(usize, Proj), Whitening>,
    /// Calibration tokens seen.
    pub tokens: usize,
}

impl Calibration {
    /// Runs `model` over `n_tokens` tokens of the train split of the prepared data `dir`, in
    /// windows of `seq_len` spread evenly over the split, `batch` windows per pass.
    pub fn from_data(model: &Model, dir: &Path, n_tokens: usize, seq_len: usize, batch: usize) -> Result<Self> {
        let meta = Meta::load(dir).with_context(|| format!("--calibrate {}", dir.display()))?;
        let train = TokenFile::open(dir, "train", &meta)?;
        if train.len() < seq_len + 1 {
            bail!(
                "--calibrate {}: the train split holds {} tokens, fewer than one window of {seq_len}",
                dir.display(),
                train.len()
            );
        }
        let windows = n_tokens.div_ceil(seq_len).max(1);
        let stride = (train.len() - seq_len) / windows.max(1);
        let starts: Vec<usize> =
            (0..windows).map(|i| i * stride.max(1)).filter(|&s| s + seq_len <= train.len()).collect();
        let (mut grams, mut tokens) = (Grams::new(), 0);
        for chunk in starts.chunks(batch.max(1)) {
            let mut ids = Vec::with_capacity(chunk.len() * seq_len);
            for &s in chunk {
                ids.extend(train.window(s, seq_len)?);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), seq_len), &model.device())?;
            add_inputs(&mut grams, model, &ids)?;
            tokens += ids.elem_count();
        }
        // Each Gram matrix is dropped as soon as its whitening (the same size) is made.
        let whitenings = grams.drain().map(|(key, (n, g))| Ok((key, Whitening::new(&g, n)?))).collect::<Result<_>>()?;
        Ok(Self { whitenings, tokens })
    }

    /// The whitening of the input of `proj` in `layer`.
    pub fn whitening(&self, proj: Proj, layer: usize) -> Result<&Whitening> {
        self.whitenings
            .get(&(layer, site(proj)))
            .with_context(|| format!("calibration saw no input of {proj} in layer {layer}"))
    }
}

/// Adds the projection inputs of one forward pass over ids (B, T) to `grams`.
fn add_inputs(grams: &mut Grams, model: &Model, ids: &Tensor) -> Result<()> {
    model.visit_inputs(ids, &mut |layer, projs, x| {
        let n = x.dim(candle_core::D::Minus1)?;
        let x = x.reshape(((), n))?.to_dtype(DType::F32)?; // (B·T, n)
        let g = x.t()?.matmul(&x)?.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
        let entry = grams.entry((layer, site(projs[0]))).or_insert_with(|| (n, vec![0.0; n * n]));
        entry.1.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        Ok(())
    })
}
