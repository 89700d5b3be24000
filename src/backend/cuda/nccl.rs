//! NCCL communicators for the GPUs of this process, through cudarc's `nccl` module
//! (libnccl loaded at run time like the rest of CUDA). One process drives every GPU,
//! one rank thread each (`ncclCommInitAll`): the ranks are the threads that
//! `parallel::run_ranks` starts, every device is already opened by this process, and
//! no rendezvous (a unique id passed through a file or the environment) is needed.
//! Several nodes would need one process per node and `ncclCommInitRank`: not built.
//!
//! Each communicator queues its calls on a stream of its own, as PyTorch's NCCL
//! process group does, so that a gradient bucket's all-reduce runs while the backward
//! pass's kernels go on on the device's stream. Events order the two: a call waits
//! for everything queued on the device's stream before it (the kernels that wrote its
//! input, and the last uses of any block the caching allocator hands out again for its
//! output), and the device's stream waits for the call (`join`) before anything reads
//! its output or reuses its buffers. A rank's calls stay one sequence on the one NCCL
//! stream, in the order the rank thread issued them, so every rank runs them in the
//! same order (two communicators on two streams could run in different orders on
//! different GPUs and deadlock).

use super::device::{self, CudaBuf, CudaDev};
use super::loader::driver_error;
use super::storage::CudaStorage;
use super::launch::Gpu;
use crate::backend::Storage;
use crate::{bail, DType, Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::{result as nccl, sys};
use std::sync::Arc;

/// Whether libnccl loads.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen libnccl and reports whether it loaded.
    unsafe { sys::is_culib_present() }
}

/// One rank's communicator, on the GPU it was made for.
pub struct NcclComm {
    raw: sys::ncclComm_t,
    dev: &'static CudaDev,
    /// The stream its calls run on (see the module doc).
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it
// are not concurrent; each rank's is used by its rank thread only, except
// `ncclCommAbort`, which NCCL documents as callable from another thread to stop a
// hung collective.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn nccl_error(what: &str, e: nccl::NcclError) -> Error { Error::Msg(format!("NCCL {what}: {e:?}")) }

/// Communicators for `cuda:o` for each ordinal `o`, in rank order.
pub fn init_all(ordinals: &[usize]) -> Result<Vec<NcclComm>> {
    if !nccl_present() {
        bail!("data parallelism on GPUs needs NCCL, and libnccl.so.2 was not found: install it (e.g. `pip install nvidia-nccl-cu13`) and put its lib folder on LD_LIBRARY_PATH");
    }
    let devs: Vec<&'static CudaDev> = ordinals.iter().map(|&o| device::get(o)).collect::<Result<_>>()?;
    let list: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
    let mut raw = vec![std::ptr::null_mut(); ordinals.len()];
    // SAFETY: `raw` has room for one communicator per listed device.
    unsafe { nccl::comm_init_all(raw.as_mut_ptr(), list.len() as i32, list.as_ptr()) }.map_err(|e| nccl_error("ncclCommInitAll", e))?;
    let world = ordinals.len();
    raw.into_iter()
        .zip(devs)
        .enumerate()
        .map(|(rank, (raw, dev))| Ok(NcclComm { raw, dev, stream: dev.new_stream()?, rank, world }))
        .collect()
}

impl NcclComm {
    pub fn rank(&self) -> usize { self.rank }
    pub fn world(&self) -> usize { self.world }
    pub fn ordinal(&self) -> usize { self.dev.ordinal() }

    /// The f32 buffer of a storage on this communicator's GPU.
    fn buf<'a>(&self, s: &'a Storage, what: &str) -> Result<&'a CudaBuf> {
        match s {
            Storage::Cuda(c) if c.buf_ref().device().ordinal() == self.ordinal() && c.buf_ref().dtype == DType::F32 => Ok(c.buf_ref()),
            _ => bail!("NCCL {what}: rank {} needs an f32 tensor on cuda:{}", self.rank, self.ordinal()),
        }
    }

    /// Queues `call` on the communicator's stream after all work queued so far on the
    /// device's stream, and returns an event for its completion: the device's stream
    /// must `join` it before the call's buffers are read, reused or freed.
    fn enqueue(&self, what: &str, call: impl FnOnce(sys::cudaStream_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>) -> Result<CudaEvent> {
        let fail = |e| self.dev.error(&format!("ordering NCCL's {what}"), driver_error(e));
        let queued = self.dev.stream.record_event(None).map_err(fail)?;
        self.stream.wait(&queued).map_err(fail)?;
        call(self.stream.cu_stream() as sys::cudaStream_t).map_err(|e| nccl_error(what, e))?;
        self.stream.record_event(None).map_err(fail)
    }

    /// Makes the device's stream wait for a call queued by this communicator.
    pub fn join(&self, done: &CudaEvent) -> Result<()> {
        self.dev.stream.wait(done).map_err(|e| self.dev.error("waiting for an NCCL call", driver_error(e)))
    }

    /// Starts the sum over the ranks of `x`'s first `len` elements, into a new buffer,
    /// and returns it with the event to `join` before using it (or dropping `x`).
    pub fn start_all_reduce_sum(&self, x: &Storage, len: usize) -> Result<(Storage, CudaEvent)> {
        let src = self.buf(x, "all-reduce")?;
        let out = self.dev.alloc(len, DType::F32)?;
        // SAFETY: both buffers hold at least `len` f32 on this communicator's device;
        // `enqueue` orders the call after the writes of `src` and the last uses of
        // `out`'s block, and the caller joins the event before using or freeing either.
        let done = self.enqueue("ncclAllReduce", |s| unsafe {
            nccl::all_reduce(src.ptr as _, out.ptr as _, len, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, self.raw, s)
        })?;
        Ok((Storage::Cuda(CudaStorage::from_buf(out)), done))
    }

    /// The sum over the ranks of `x`'s first `len` elements, in a new buffer.
    pub fn all_reduce_sum(&self, x: &Storage, len: usize) -> Result<Storage> {
        let (out, done) = self.start_all_reduce_sum(x, len)?;
        self.join(&done)?;
        Ok(out)
    }

    /// Rank `root`'s first `len` elements of `x`, on every rank.
    pub fn broadcast(&self, x: &Storage, len: usize, root: usize) -> Result<Storage> {
        let src = self.buf(x, "broadcast")?;
        let out = self.dev.alloc(len, DType::F32)?;
        // SAFETY: as in `start_all_reduce_sum`, joined before returning.
        let done = self.enqueue("ncclBroadcast", |s| unsafe {
            nccl::broadcast(src.ptr as _, out.ptr as _, len, sys::ncclDataType_t::ncclFloat32, root as i32, self.raw, s)
        })?;
        self.join(&done)?;
        Ok(Storage::Cuda(CudaStorage::from_buf(out)))
    }

    /// Every rank's first `len` elements of `x`, concatenated in rank order.
    pub fn all_gather(&self, x: &Storage, len: usize) -> Result<Storage> {
        let src = self.buf(x, "all-gather")?;
        let out = self.dev.alloc(len * self.world, DType::F32)?;
        // SAFETY: `out` holds `world * len` f32, `src` at least `len`; joined before returning.
        let done = self.enqueue("ncclAllGather", |s| unsafe {
            nccl::all_gather(src.ptr as _, out.ptr as _, len, sys::ncclDataType_t::ncclFloat32, self.raw, s)
        })?;
        self.join(&done)?;
        Ok(Storage::Cuda(CudaStorage::from_buf(out)))
    }

    /// Stops this communicator's pending and later collectives (called from the
    /// thread of a rank that failed, so that the others do not wait for it forever).
    pub fn abort(&self) {
        // SAFETY: ncclCommAbort may be called from another thread; the communicator is
        // not used for anything but failing after it (its memory stays allocated: no
        // ncclCommDestroy, so a racing call does not touch freed memory).
        let _ = unsafe { nccl::comm_abort(self.raw) };
    }
}
