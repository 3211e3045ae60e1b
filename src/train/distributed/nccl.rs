//! The gradient all-reduce of GPU ranks (cargo feature `nccl`): NCCL through cudarc, on the
//! device's own stream. Rank 0 creates the NCCL unique id and the run's communicator (MPI, or
//! TCP under `lors-lm launch` / torchrun: no MPI library needed) broadcasts it; each rank then
//! joins the communicator with its GPU (the GPU of its local rank, `rank_device_spec`). Per
//! step the gradients are flattened into one f32 buffer on the GPU, averaged in place by one
//! `ncclAllReduce(ncclAvg)` and cut back into tensors; the loss and its distillation parts
//! (host numbers) are averaged over that communicator. The stream is synchronised inside the watchdog's
//! watch, so a lost GPU peer ends the run instead of hanging it.

use crate::train::distributed::sync::{flatten, gradient_numel, mean_losses, unflatten};
use crate::train::distributed::Dist;
use crate::train::trainer::GradSync;
use anyhow::{anyhow, Result};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, Device, InplaceOp1, Layout, Tensor, Var};

pub struct NcclAllReduce {
    dist: Dist,
    comm: Comm,
    device: Device,
    numel: usize,
    step: usize,
}

impl NcclAllReduce {
    /// Join the NCCL communicator of all ranks on `device` (every rank calls this together).
    pub fn new(dist: Dist, device: &CudaDevice, params: &[(String, Var)], step: usize) -> Result<Self> {
        let id = match dist.is_root() {
            true => Id::new().map(|id| id.internal().map(|c| c as u8)).map_err(|e| {
                anyhow!("NCCL: cannot create a communicator id ({:?}): is libnccl installed and a GPU visible?", e.0)
            }),
            false => Ok([0u8; 128]),
        };
        let mut id = dist.agree(id, "creating the NCCL id")?;
        dist.broadcast(&mut id, 0, "the NCCL id broadcast")?;
        let (rank, size) = (dist.rank(), dist.size());
        let comm = {
            let _armed = dist.arm("joining the NCCL communicator");
            Comm::from_rank(device.cuda_stream(), rank, size, Id::uninit(id.map(|b| b as std::ffi::c_char)))
        };
        let comm =
            comm.map_err(|e| anyhow!("NCCL: rank {rank} cannot join the communicator of {size} ranks ({:?})", e.0));
        let comm = dist.agree(comm, "joining the NCCL communicator")?;
        let numel = gradient_numel(params);
        Ok(Self { dist, comm, device: Device::Cuda(device.clone()), numel, step })
    }
}

/// `ncclAllReduce(ncclAvg)` in place on a contiguous f32 CUDA tensor.
struct AllReduceAvg<'a>(&'a Comm);

impl InplaceOp1 for AllReduceAvg<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-avg"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the NCCL all-reduce needs a CUDA tensor")
    }
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        if layout.start_offset() != 0 || !layout.is_contiguous() || slice.len() != layout.shape().elem_count() {
            candle_core::bail!("the NCCL all-reduce needs a whole, contiguous buffer");
        }
        self.0
            .all_reduce_in_place(slice, &ReduceOp::Avg)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce failed ({:?})", e.0)))?;
        Ok(())
    }
}

impl GradSync for NcclAllReduce {
    fn all_reduce(&mut self, grads: &mut [Tensor], losses: &mut [f64]) -> Result<()> {
        self.step += 1;
        let flat = flatten(grads, self.numel)?;
        flat.inplace_op1(&AllReduceAvg(&self.comm))?;
        {
            let _armed = self.dist.arm(&format!("the NCCL gradient all-reduce of step {}", self.step));
            self.device.synchronize()?;
        }
        unflatten(&flat, grads)?;
        mean_losses(&self.dist, losses, self.step)
    }

    fn bytes_per_step(&self) -> usize {
        4 * self.numel
    }

    fn ranks(&self) -> usize {
        self.dist.size()
    }
}
