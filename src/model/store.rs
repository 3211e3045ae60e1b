//! Named trainable parameters. The model asks the store for each tensor by name; the store
//! either creates it (seeded init, always drawn on the CPU so every device starts from the
//! same weights) or takes it from loaded tensors, checking the shape. A name asked for twice
//! (a shared base used by several layers) returns the same variable, so the gradients of all
//! its users add up in one place. Each parameter carries its [`Role`], which the optimizer reads
//! to give it its learning-rate multiplier and weight decay.

use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// What one parameter is, for the optimizer (set when the model creates it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Embedding, LM head, a shared base or a private full weight.
    Matrix,
    /// A norm gain: never decayed.
    Gain,
    /// The private factor A_l (r×in).
    FactorA,
    /// The private factor B_l (out×r).
    FactorB,
}

/// How to initialise a new parameter.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// N(0, std²).
    Normal(f64),
    /// U(-bound, bound).
    Uniform(f64),
    Zeros,
    Ones,
}

enum Source {
    Init(Rng),
    Tensors(HashMap<String, Tensor>),
}

pub struct ParamStore {
    vars: BTreeMap<String, (Var, Role)>,
    source: Source,
    pub device: Device,
    pub dtype: DType,
}

impl ParamStore {
    /// A store that initialises fresh parameters from `seed`.
    pub fn new_init(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::with_source(Source::Init(Rng::new(seed)), dtype, device)
    }

    /// A store that takes every parameter from `tensors` (e.g. a checkpoint).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::with_source(Source::Tensors(tensors), dtype, device)
    }

    fn with_source(source: Source, dtype: DType, device: &Device) -> Self {
        Self { vars: BTreeMap::new(), source, device: device.clone(), dtype }
    }

    /// Get (or create) the parameter `name` of `shape`, in the given role.
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init, role: Role) -> Result<Tensor> {
        if let Some((v, _)) = self.vars.get(name) {
            if v.dims() != shape {
                bail!("parameter {name} requested with shape {shape:?} but exists as {:?}", v.dims());
            }
            return Ok(v.as_tensor().clone());
        }
        let t = match &mut self.source {
            Source::Init(rng) => {
                let n: usize = shape.iter().product();
                let data: Vec<f64> = match init {
                    Init::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
                    Init::Uniform(b) => (0..n).map(|_| (rng.next_f64() * 2.0 - 1.0) * b).collect(),
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                };
                Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_device(&self.device)?
            }
            Source::Tensors(map) => {
                let Some(t) = map.remove(name) else {
                    bail!("checkpoint has no tensor {name} (shape {shape:?}) that this config needs: was it saved with a different config?");
                };
                if t.dims() != shape {
                    bail!(
                        "tensor {name} has shape {:?} in the checkpoint but the config needs {shape:?}: the checkpoint comes from a different config",
                        t.dims()
                    );
                }
                t.to_dtype(self.dtype)?.to_device(&self.device)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), (var, role));
        Ok(out)
    }

    /// After building a model from tensors: refuse leftovers the config did not ask for.
    pub fn finish(&mut self) -> Result<()> {
        if let Source::Tensors(map) = &self.source {
            if let Some(name) = map.keys().min() {
                bail!("checkpoint has tensor {name} that this config does not use: it comes from a different config");
            }
        }
        Ok(())
    }

    /// All variables, sorted by name (a stable order for the optimizer and checkpoints).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
    }

    /// All variables with their roles, sorted by name.
    pub fn vars_with_roles(&self) -> Vec<(String, Var, Role)> {
        self.vars.iter().map(|(k, (v, r))| (k.clone(), v.clone(), *r)).collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars.values().map(|(v, _)| v.elem_count()).sum()
    }

    /// Current values as plain tensors, keyed by name (for saving).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(k, (v, _))| (k.clone(), v.as_tensor().clone())).collect()
    }
}
