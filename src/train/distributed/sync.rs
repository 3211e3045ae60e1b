//! The gradient all-reduce of a data-parallel step through the host (MPI): the gradients of
//! the unique parameters are flattened into one f32 buffer (in `Trainer::params` order, the
//! same on every rank), summed over the ranks in one collective, divided by N and cut back
//! into tensors; the loss (with its distillation parts) is averaged the same way. On GPUs `nccl.rs` does this on the device;
//! this path also serves a GPU build without NCCL (through host memory, slower).

use crate::train::distributed::Dist;
use crate::train::trainer::GradSync;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

/// Averages gradients and loss over the ranks through the host.
pub struct HostAllReduce {
    dist: Dist,
    /// Values in the gradient buffer (the unique trainable parameters).
    numel: usize,
    /// The step the next call belongs to (for the watchdog's message).
    step: usize,
}

impl HostAllReduce {
    /// For a trainer with `params` whose last step was `step`.
    pub fn new(dist: Dist, params: &[(String, Var)], step: usize) -> Self {
        Self { dist, numel: gradient_numel(params), step }
    }
}

/// Values all-reduced per step: one per trained parameter value (shared bases and private
/// factors for LORS; never merged weights).
pub fn gradient_numel(params: &[(String, Var)]) -> usize {
    params.iter().map(|(_, v)| v.elem_count()).sum()
}

/// All gradients as one flat f32 vector (P,), on their device; P must be the `numel` the
/// all-reduce was built for.
pub fn flatten(grads: &[Tensor], numel: usize) -> Result<Tensor> {
    let flat = grads.iter().map(|g| g.flatten_all()?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&flat, 0)?;
    if flat.elem_count() != numel {
        bail!("gradient buffer of {} values for {numel} parameter values", flat.elem_count());
    }
    Ok(flat)
}

/// Replace each of `losses` (the loss and its parts) by its mean over the ranks (one
/// collective for all of them; every rank gets the same values).
pub fn mean_losses(dist: &Dist, losses: &mut [f64], step: usize) -> Result<()> {
    let mut total = vec![0.0; losses.len()];
    dist.sum_f64(losses, &mut total, &format!("the loss all-reduce of step {step}"))?;
    let n = dist.size() as f64;
    losses.iter_mut().zip(total).for_each(|(l, t)| *l = t / n);
    Ok(())
}

/// Cut `flat` (P,) back into tensors shaped (and typed) like `grads`, replacing them.
pub fn unflatten(flat: &Tensor, grads: &mut [Tensor]) -> Result<()> {
    let mut offset = 0;
    for g in grads.iter_mut() {
        let n = g.elem_count();
        *g = flat.narrow(0, offset, n)?.reshape(g.shape())?.to_dtype(g.dtype())?;
        offset += n;
    }
    Ok(())
}

impl GradSync for HostAllReduce {
    fn all_reduce(&mut self, grads: &mut [Tensor], losses: &mut [f64]) -> Result<()> {
        self.step += 1;
        let n = self.dist.size();
        let send = flatten(grads, self.numel)?.to_vec1::<f32>()?;
        let mut recv = vec![0f32; send.len()];
        self.dist.sum_f32(&send, &mut recv, &format!("the gradient all-reduce of step {}", self.step))?;
        drop(send);
        let inv = 1.0 / n as f32;
        recv.iter_mut().for_each(|v| *v *= inv);
        let device = grads.first().map(|g| g.device().clone()).unwrap_or(candle_core::Device::Cpu);
        unflatten(&Tensor::from_vec(recv, self.numel, &device)?, grads)?;
        mean_losses(&self.dist, losses, self.step)
    }

    fn bytes_per_step(&self) -> usize {
        4 * self.numel
    }

    fn ranks(&self) -> usize {
        self.dist.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::distributed::testing::Replicated;
    use crate::train::distributed::watchdog::Watchdog;
    use candle_core::Device;
    use std::rc::Rc;
    use std::time::Duration;

    #[test]
    fn replicated_ranks_average_to_their_own_gradients_and_loss() -> Result<()> {
        let dev = Device::Cpu;
        let params = vec![
            ("a".to_string(), Var::zeros((2, 3), DType::F32, &dev)?),
            ("b".to_string(), Var::zeros(4, DType::F32, &dev)?),
        ];
        let g0 = vec![Tensor::arange(0f32, 6.0, &dev)?.reshape((2, 3))?, Tensor::new(&[0.5f32, -1.0, 2.0, 3.0], &dev)?];
        let dist = Dist::new(Rc::new(Replicated { n: 4 }), Watchdog::new(Duration::from_secs(60), Box::new(|_| {})));
        let mut sync = HostAllReduce::new(dist, &params, 0);
        assert_eq!(sync.bytes_per_step(), 4 * 10);
        // The loss and its distillation parts (CE, KL), averaged in one collective.
        let (mut grads, mut losses) = (g0.clone(), [2.5, 3.0, 0.25]);
        sync.all_reduce(&mut grads, &mut losses)?;
        assert_eq!(losses, [2.5, 3.0, 0.25]);
        for (g, want) in grads.iter().zip(&g0) {
            assert_eq!(g.dims(), want.dims());
            assert_eq!(g.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
        }
        let mut short = vec![g0[0].clone()];
        assert!(sync.all_reduce(&mut short, &mut losses).is_err());
        Ok(())
    }
}
