//! The GPU collective: NCCL, one communicator per GPU of this process, one rank thread
//! each (see `backend::cuda::nccl` for why one process). Tensors stay on their GPU;
//! each call is queued on the communicator's own stream, and the device's stream waits
//! for it: at once for a blocking call (the host does not wait), at `Pending::wait` for
//! a started one, whose all-reduce so runs while the kernels queued meanwhile do.

use super::{Collective, Pending};
use crate::backend::cuda::nccl::{init_all, NcclComm, NcclComms};
use crate::backend::Storage;
use crate::{bail, Device, Result, Tensor};
use cudarc::driver::CudaEvent;
use std::sync::Arc;

/// One rank of an NCCL group.
pub struct NcclGroup {
    rank: usize,
    /// Every rank's communicator, so that a failing rank can abort them all.
    comms: Arc<NcclComms>,
}

impl NcclGroup {
    /// The ranks of a group over `cuda:o` for each ordinal, in rank order.
    pub fn new(ordinals: &[usize]) -> Result<Vec<NcclGroup>> {
        let comms = Arc::new(init_all(ordinals)?);
        Ok((0..ordinals.len()).map(|rank| NcclGroup { rank, comms: comms.clone() }).collect())
    }

    fn comm(&self) -> &NcclComm {
        &self.comms[self.rank]
    }

    /// `t` as a contiguous tensor from the start of its own buffer, on this rank's GPU.
    fn packed(&self, t: &Tensor) -> Result<Tensor> {
        if t.device() != Device::Cuda(self.comm().ordinal()) {
            bail!("NCCL rank {} works on cuda:{}, got a tensor on {}", self.rank, self.comm().ordinal(), t.device());
        }
        if t.is_contiguous() && t.layout().offset() == 0 {
            Ok(t.clone())
        } else {
            t.deep_copy()
        }
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.comms.len()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = self.packed(t)?;
        let s = self.comm().all_reduce_sum(&t.storage(), t.elem_count())?;
        Ok(Tensor::from_storage(s, t.dims()))
    }
    fn start_all_reduce_sum(&self, t: &Tensor) -> Pending {
        let start = || -> Result<InFlight> {
            let input = self.packed(t)?;
            let (output, done) = self.comm().start_all_reduce_sum(&input.storage(), input.elem_count())?;
            Ok(InFlight { comms: self.comms.clone(), rank: self.rank, done: Some(done), input, output: Some(output) })
        };
        match start() {
            Ok(call) => Pending::later(move || call.finish()),
            Err(e) => Pending::ready(Err(e)),
        }
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let t = self.packed(t)?;
        let s = self.comm().broadcast(&t.storage(), t.elem_count(), root)?;
        Ok(Tensor::from_storage(s, t.dims()))
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let t = self.packed(t)?;
        let s = self.comm().all_gather(&t.storage(), t.elem_count())?;
        let mut shape = t.dims().to_vec();
        match shape.first_mut() {
            Some(n) => *n *= self.world(),
            None => shape.push(self.world()),
        }
        Ok(Tensor::from_storage(s, &shape))
    }
    fn abort(&self, _why: &str) {
        self.comms.iter().for_each(|c| c.abort());
    }
}

/// A started all-reduce: its buffers stay alive until the device's stream has waited
/// for it, even when it is dropped unwaited (a failing rank), so the caching allocator
/// never hands them out while NCCL still reads or writes them.
struct InFlight {
    comms: Arc<NcclComms>,
    rank: usize,
    done: Option<CudaEvent>,
    input: Tensor,
    output: Option<Storage>,
}

impl InFlight {
    fn finish(mut self) -> Result<Tensor> {
        let done = self.done.take().expect("joined once");
        self.comms[self.rank].join(&done)?;
        Ok(Tensor::from_storage(self.output.take().expect("taken once"), self.input.dims()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            // no error path in drop: a failure here resurfaces at the next sync
            let _ = self.comms[self.rank].join(&done);
        }
    }
}
