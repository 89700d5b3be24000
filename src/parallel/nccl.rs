//! The GPU collective: NCCL, one communicator per GPU of this process, one rank thread
//! each (see `backend::cuda::nccl`), or, in a multi-process job, one process per GPU
//! whose communicator MPI bootstrapped (`from_mpi`). Tensors stay on their GPU;
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
    /// Which of `comms` is this rank's.
    index: usize,
    /// Every communicator of this process (in one process, every rank's, so that a
    /// failing rank can abort them all; across processes, its own only).
    comms: Arc<NcclComms>,
}

impl NcclGroup {
    /// The ranks of a group over `cuda:o` for each ordinal, in rank order.
    pub fn new(ordinals: &[usize]) -> Result<Vec<NcclGroup>> {
        let comms = Arc::new(init_all(ordinals)?);
        Ok((0..ordinals.len()).map(|index| NcclGroup { index, comms: comms.clone() }).collect())
    }

    /// This process's rank of a multi-process NCCL group on `cuda:ordinal` (its local
    /// rank), bootstrapped by MPI: rank 0 makes NCCL's unique id, MPI broadcasts it, and
    /// every rank joins with `ncclCommInitRank` (across nodes too). On failure at rank
    /// 0 (no NCCL, no GPU) the job is aborted: the others are waiting in the broadcast.
    #[cfg(feature = "mpi")]
    pub fn from_mpi(mpi: &super::MpiGroup, ordinal: usize) -> Result<NcclGroup> {
        use crate::backend::cuda::{nccl, nccl_lib};
        let id = super::mpi::bootstrap_id(mpi, nccl_lib::UNIQUE_ID_BYTES, || Ok(nccl::unique_id()?.0.to_vec()))?;
        let id = nccl_lib::UniqueId(id.try_into().map_err(|_| crate::Error::Msg("NCCL's unique id arrived with another length".into()))?);
        let comms = nccl::init_rank(ordinal, mpi.world(), mpi.rank(), id)?;
        Ok(NcclGroup { index: 0, comms: Arc::new(comms) })
    }

    fn comm(&self) -> &NcclComm {
        &self.comms[self.index]
    }

    /// `t` as a contiguous tensor from the start of its own buffer, on this rank's GPU.
    fn packed(&self, t: &Tensor) -> Result<Tensor> {
        if t.device() != Device::Cuda(self.comm().ordinal()) {
            bail!("NCCL rank {} works on cuda:{}, got a tensor on {}", self.rank(), self.comm().ordinal(), t.device());
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
        self.comm().rank()
    }
    fn world(&self) -> usize {
        self.comm().world()
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
            Ok(InFlight { comms: self.comms.clone(), index: self.index, done: Some(done), input, output: Some(output) })
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
    index: usize,
    done: Option<CudaEvent>,
    input: Tensor,
    output: Option<Storage>,
}

impl InFlight {
    fn finish(mut self) -> Result<Tensor> {
        let done = self.done.take().expect("joined once");
        self.comms[self.index].join(&done)?;
        Ok(Tensor::from_storage(self.output.take().expect("taken once"), self.input.dims()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            // no error path in drop: a failure here resurfaces at the next sync
            let _ = self.comms[self.index].join(&done);
        }
    }
}
