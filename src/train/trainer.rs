//! The library training API: a [`Trainer`] owns the model, its parameters, the optimizer and
//! the training state, and takes one optimizer step at a time.
//!
//! ```text
//! step():  lr = lr_at(step)
//!          grad_accum × { micro-batch → forward → loss / grad_accum → backward → add grads }
//!          GradSync::all_reduce (data-parallel training averages across ranks here)
//!          global grad norm → skip if non-finite → clip to train.grad_clip → AdamW
//! ```
//! `train`, `sweep`, `bench` and `check-device` all step through it; the loop around it
//! (logging, evaluation, checkpoints) is `fit.rs`.

use crate::config::Config;
use crate::model::{Model, Ops, ParamStore};
use crate::rng::Rng;
use crate::train::batches::Source;
use crate::train::checkpoint::{Checkpoint, Contents, TrainState};
use crate::train::distill::Distill;
use crate::train::optim::AdamW;
use crate::train::run_dir::RunDir;
use crate::train::schedule::lr_at;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Where the gradients of one step are combined across data-parallel ranks: called once per
/// step with the gradients summed over the micro-batches (in `Trainer::params` order) and the
/// step's mean losses, before the gradient norm, clipping and the update. `losses` holds the
/// loss, then with distillation its parts CE and KL: averaged over the ranks as the gradients
/// are, so that the logged parts still make up the logged loss.
pub trait GradSync {
    fn all_reduce(&mut self, grads: &mut [Tensor], losses: &mut [f64]) -> Result<()>;
    /// Gradient bytes each rank contributes per step (0: nothing leaves the process).
    fn bytes_per_step(&self) -> usize {
        0
    }
    /// Processes whose batches each step combines (1: this one alone).
    fn ranks(&self) -> usize {
        1
    }
}

/// A single process: nothing to combine.
pub struct Local;

impl GradSync for Local {
    fn all_reduce(&mut self, _grads: &mut [Tensor], _losses: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// The step just taken (1-based).
    pub step: usize,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of this step (batch × seq_len × micro-batches × data-parallel ranks).
    pub tokens: usize,
    /// Wall time of the step, and of its phases: forward + loss, backward, the rest
    /// (gradient accumulation, sync, clipping, AdamW).
    pub ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Of `optimizer_ms`: combining the gradients across ranks (`GradSync::all_reduce`).
    pub sync_ms: f64,
    /// The loss or gradient norm was not finite: the update was skipped.
    pub skipped: bool,
    /// Skipped steps in a row, this one included.
    pub bad_steps: usize,
    /// With distillation: the mean cross-entropy and KL(teacher ‖ student) of the step.
    pub ce: Option<f64>,
    pub kl: Option<f64>,
}

pub struct Trainer {
    cfg: Config,
    model: Model,
    store: ParamStore,
    /// The optimizer's parameters (sorted by name), whose gradients each step gathers.
    params: Vec<(String, Var)>,
    opt: AdamW,
    state: TrainState,
    source: Source,
    data_rng: Rng,
    device: Device,
    sync: Box<dyn GradSync>,
    bad_steps: usize,
    distill: Option<Distill>,
}

impl Trainer {
    /// A new model initialised from `train.seed`, fresh optimizer, step 0.
    pub fn new(cfg: Config, source: Source, device: &Device) -> Result<Self> {
        let store = ParamStore::new_init(cfg.train.seed, DType::F32, device);
        Self::build(cfg, store, source, device, None)
    }

    /// Start from given weights (named as the model names them), fresh optimizer, step 0.
    pub fn with_weights(
        cfg: Config,
        tensors: HashMap<String, Tensor>,
        source: Source,
        device: &Device,
    ) -> Result<Self> {
        let store = ParamStore::from_tensors(tensors, DType::F32, device);
        Self::build(cfg, store, source, device, None)
    }

    /// Continue from a checkpoint: weights, optimizer moments, step, data RNG.
    pub fn resume(cfg: Config, ckpt: &Checkpoint, source: Source, device: &Device) -> Result<Self> {
        let store = ParamStore::from_tensors(ckpt.params(device)?, DType::F32, device);
        Self::build(cfg, store, source, device, Some(ckpt))
            .with_context(|| format!("cannot resume from {}", ckpt.dir.display()))
    }

    fn build(
        cfg: Config,
        mut store: ParamStore,
        source: Source,
        device: &Device,
        ckpt: Option<&Checkpoint>,
    ) -> Result<Self> {
        let model = Model::new(&cfg.model, &cfg.lors, &mut store)?;
        // Mixed precision: variables and optimizer state stay f32; matmuls run in train.dtype.
        let model = model.with_matmul_dtype(cfg.train.matmul_dtype());
        crate::device::set_tf32(cfg.train.tf32);
        let mut opt = AdamW::from_config(store.vars_with_roles(), &cfg)?;
        let mut state = TrainState {
            step: 0,
            data_rng: Rng::new(cfg.train.seed).fork(1).state,
            opt_t: 0,
            tokens_seen: 0,
            val_loss: None,
            rank_data_rngs: Vec::new(),
        };
        if let Some(ckpt) = ckpt {
            state = ckpt.state()?;
            opt.load_state(ckpt.optimizer(device)?, state.opt_t)?;
        }
        let params = opt.params().to_vec();
        let data_rng = Rng { state: state.data_rng };
        Ok(Self {
            cfg,
            model,
            store,
            params,
            opt,
            state,
            source,
            data_rng,
            device: device.clone(),
            sync: Box::new(Local),
            bad_steps: 0,
            distill: None,
        })
    }

    /// Combine gradients across ranks with `sync` (data-parallel training).
    pub fn set_grad_sync(&mut self, sync: Box<dyn GradSync>) {
        self.sync = sync;
    }

    /// Gradient bytes the `GradSync` moves per step (0 in a single process).
    pub fn sync_bytes_per_step(&self) -> usize {
        self.sync.bytes_per_step()
    }

    /// The batch-sampling RNG (its state after the steps taken so far).
    pub fn data_rng(&self) -> Rng {
        self.data_rng
    }

    /// Draw the next batches from `rng` (a data-parallel rank's own stream).
    pub fn set_data_rng(&mut self, rng: Rng) {
        self.data_rng = rng;
    }

    /// Data-parallel: train on rank `rank`'s part of the `world` parts of the training split
    /// (`batches::rank_part`), so the ranks' windows never overlap.
    /// Returns the part's token positions (None for a random-token source).
    pub fn restrict_source_to_rank(&mut self, rank: usize, world: usize) -> Result<Option<std::ops::Range<usize>>> {
        let t = self.cfg.train.seq_len;
        self.source.restrict_to_rank(rank, world, t)
    }

    /// Distil from `teacher` (same vocabulary) with `train.distill_alpha` and
    /// `train.distill_temperature`: every step's loss becomes (1−α)·CE + α·T²·KL.
    pub fn set_teacher(&mut self, teacher: &Model) -> Result<()> {
        let t = &self.cfg.train;
        self.distill = Some(Distill::new(teacher, &self.model, t.distill_alpha, t.distill_temperature)?);
        Ok(())
    }

    /// Run the model on the given implementation of its operations (benchmarks, tests).
    pub fn set_ops(&mut self, ops: Ops) -> Result<()> {
        self.model.set_ops(ops)
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn store(&self) -> &ParamStore {
        &self.store
    }
    pub fn state(&self) -> &TrainState {
        &self.state
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// (name, variable) of every trained parameter, in the order of the gradients.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }
    /// Tokens of one optimizer step: batch_size × seq_len × grad_accum × data-parallel ranks.
    pub fn tokens_per_step(&self) -> usize {
        let t = &self.cfg.train;
        t.batch_size * t.seq_len * t.grad_accum * self.sync.ranks()
    }

    /// One optimizer step on `train.grad_accum` micro-batches drawn from the source.
    pub fn step(&mut self) -> Result<StepStats> {
        let t = &self.cfg.train;
        let micro = (0..t.grad_accum)
            .map(|_| self.source.sample(&mut self.data_rng, t.batch_size, t.seq_len, &self.device))
            .collect::<Result<Vec<_>>>()?;
        self.step_on(&micro)
    }

    /// One optimizer step on the given micro-batches (inputs, targets), each (B, T): the mean
    /// of their mean losses is minimised, which equals one batch of all of them when the
    /// micro-batches have the same size (as `step` draws them).
    pub fn step_on(&mut self, micro: &[(Tensor, Tensor)]) -> Result<StepStats> {
        if micro.is_empty() {
            bail!("a training step needs at least one micro-batch");
        }
        let t0 = Instant::now();
        let step = self.state.step + 1;
        let lr = lr_at(step, &self.cfg.train);
        let (mut grads, mut losses, fwd, bwd) = self.gradients(micro)?;
        let ts = Instant::now();
        self.sync.all_reduce(&mut grads, &mut losses)?;
        let sync_ms = ts.elapsed().as_secs_f64() * 1e3;
        let (loss, ce, kl) = (losses[0], losses.get(1).copied(), losses.get(2).copied());
        let grad_norm = global_norm(&grads)?;
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        let tc = &self.cfg.train;
        if skipped {
            self.bad_steps += 1;
            if self.bad_steps > tc.max_bad_steps {
                bail!(
                    "{} consecutive steps with a non-finite loss or gradient (last at step {step}): lower train.lr or raise train.warmup_steps",
                    self.bad_steps
                );
            }
        } else {
            self.bad_steps = 0;
            if tc.grad_clip > 0.0 && grad_norm > tc.grad_clip {
                let scale = tc.grad_clip / (grad_norm + 1e-6);
                grads = grads.iter().map(|g| g * scale).collect::<candle_core::Result<Vec<_>>>()?;
            }
            self.opt.step(&grads, lr)?;
        }
        let tokens: usize = micro.iter().map(|(x, _)| x.elem_count()).sum::<usize>() * self.sync.ranks();
        self.state.step = step;
        self.state.tokens_seen += tokens as u64;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(StepStats {
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            ms,
            forward_ms: fwd,
            backward_ms: bwd,
            optimizer_ms: ms - fwd - bwd,
            sync_ms,
            skipped,
            bad_steps: self.bad_steps,
            ce,
            kl,
        })
    }

    /// Gradients summed over the micro-batches of loss / k (so: of the mean loss), the mean
    /// loss followed with distillation by the mean CE and KL, and the time spent in forward
    /// and backward passes (ms).
    fn gradients(&self, micro: &[(Tensor, Tensor)]) -> Result<(Vec<Tensor>, Vec<f64>, f64, f64)> {
        let k = micro.len();
        let mut acc: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let (mut loss_sum, mut fwd, mut bwd) = (0.0, 0.0, 0.0);
        let mut parts = self.distill.as_ref().map(|_| (0.0, 0.0));
        for (x, y) in micro {
            let t0 = Instant::now();
            let loss = match (&self.distill, parts.as_mut()) {
                (Some(d), Some((ce, kl))) => {
                    let l = d.loss(&self.model, x, y)?;
                    (*ce, *kl) = (*ce + l.ce / k as f64, *kl + l.kl / k as f64);
                    l.loss
                }
                _ => self.model.forward_loss(x, y)?,
            };
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let t1 = Instant::now();
            let loss = if k > 1 { (loss / k as f64)? } else { loss };
            let grads = loss.backward()?;
            bwd += t1.elapsed().as_secs_f64() * 1e3;
            fwd += (t1 - t0).as_secs_f64() * 1e3;
            for (slot, (name, var)) in acc.iter_mut().zip(&self.params) {
                let g = grads.get(var.as_tensor()).with_context(|| format!("parameter {name} received no gradient"))?;
                *slot = Some(match slot.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        let grads = acc.into_iter().flatten().collect();
        let losses = std::iter::once(loss_sum / k as f64).chain(parts.into_iter().flat_map(|(ce, kl)| [ce, kl]));
        Ok((grads, losses.collect(), fwd, bwd))
    }

    /// Mean loss over fixed batches, without building a graph (the weights are merged and
    /// detached first); recorded as the run's last validation loss.
    pub fn evaluate(&mut self, batches: &[(Tensor, Tensor)]) -> Result<f64> {
        let loss = evaluate(&self.model, batches)?;
        self.set_val_loss(loss);
        Ok(loss)
    }

    /// Record the run's last validation loss (computed elsewhere, e.g. sharded over ranks).
    pub fn set_val_loss(&mut self, loss: f64) {
        self.state.val_loss = Some(loss);
    }

    /// Write a checkpoint of the current step into `run` (atomically), keeping the newest
    /// `train.keep_checkpoints`.
    pub fn save(&mut self, run: &RunDir) -> Result<PathBuf> {
        self.save_ranks(run, Vec::new())
    }

    /// `save` for rank 0 of a data-parallel run, with the sample-stream states of ranks 1..
    /// (so that a resume continues every rank's stream).
    pub fn save_ranks(&mut self, run: &RunDir, other_ranks_data_rngs: Vec<u64>) -> Result<PathBuf> {
        self.state.rank_data_rngs = other_ranks_data_rngs;
        self.state.data_rng = self.data_rng.state;
        self.state.opt_t = self.opt.t;
        let (params, optimizer) = (self.store.tensors(), self.opt.state_tensors());
        let contents = Contents { cfg: &self.cfg, params: &params, optimizer: &optimizer, state: &self.state };
        run.save_checkpoint(&contents, self.cfg.train.keep_checkpoints)
    }
}

/// Mean loss of `model` over fixed batches, without building a graph.
pub fn evaluate(model: &Model, batches: &[(Tensor, Tensor)]) -> Result<f64> {
    if batches.is_empty() {
        bail!("evaluation needs at least one batch");
    }
    Ok(evaluate_sum(model, batches)? / batches.len() as f64)
}

/// The sum of the mean losses of `model` over fixed batches, without building a graph.
pub fn evaluate_sum(model: &Model, batches: &[(Tensor, Tensor)]) -> Result<f64> {
    let frozen = model.merged()?;
    let mut total = 0.0;
    for (x, y) in batches {
        total += frozen.forward_loss(x, y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total)
}

/// Global L2 norm of all gradients, with one host sync.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum: Option<Tensor> = None;
    for g in grads {
        let s = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
        sum = Some(match sum {
            Some(acc) => (acc + s)?,
            None => s,
        });
    }
    Ok(sum.map_or(Ok(0.0), |s| s.to_scalar::<f64>())?.sqrt())
}
