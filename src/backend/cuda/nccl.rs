//! NCCL communicators for the GPUs of this process, through `nccl_lib.rs` (libnccl
//! loaded at run time, like the rest of CUDA, but found by us: see there). One process drives every GPU,
//! one rank thread each (`ncclCommInitAll`): the ranks are the threads that
//! `parallel::run_ranks` starts, every device is already opened by this process, and
//! no rendezvous (a unique id passed through a file or the environment) is needed.
//! Across processes (and nodes), each process makes one communicator for its GPU with
//! `ncclCommInitRank`, from a unique id that rank 0 makes (`unique_id`) and MPI
//! carries to the others (`parallel::NcclGroup::from_mpi`).
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
use super::launch::Gpu;
use super::loader::driver_error;
use super::nccl_lib::{self, NcclLib, FLOAT32, SUM};
use super::storage::CudaStorage;
use crate::backend::Storage;
use crate::{bail, DType, Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether libnccl loads.
pub fn nccl_present() -> bool {
    nccl_lib::nccl().is_ok()
}

/// The NCCL library this process uses: "2.28.5 from /path/libnccl.so.2", or why none loads.
pub fn nccl_describe() -> std::result::Result<String, String> {
    nccl_lib::nccl().map(|l| format!("{} from {}", l.version_string(), l.path.display()))
}

/// One rank's communicator, on the GPU it was made for.
pub struct NcclComm {
    raw: nccl_lib::Comm,
    dev: &'static CudaDev,
    /// The stream its calls run on (see the module doc).
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    /// `ncclCommAbort` frees the communicator: it must not be finalised or destroyed after.
    aborted: AtomicBool,
}

// SAFETY: NCCL allows a communicator to be used from any thread as long as calls on it
// are not concurrent; each rank's is used by its rank thread only, except
// `ncclCommAbort`, which NCCL documents as callable from another thread to stop a
// hung collective.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn lib() -> Result<&'static NcclLib> {
    nccl_lib::nccl().map_err(|e| Error::Msg(format!("data parallelism on GPUs needs NCCL: {e}")))
}

fn check(what: &str, status: nccl_lib::Status) -> Result<()> {
    lib()?.check(what, status).map_err(Error::Msg)
}

/// The communicators of one `ncclCommInitAll`, in rank order. Dropping them finalises
/// them together (one NCCL group: a finalise may wait for the other ranks, which this
/// one thread drives) and destroys each, unless aborted.
pub struct NcclComms(Vec<NcclComm>);

impl std::ops::Deref for NcclComms {
    type Target = [NcclComm];
    fn deref(&self) -> &[NcclComm] {
        &self.0
    }
}

impl Drop for NcclComms {
    fn drop(&mut self) {
        let Ok(nccl) = lib() else { return };
        let live: Vec<&NcclComm> = self.0.iter().filter(|c| !c.aborted.load(Ordering::SeqCst)).collect();
        if live.is_empty() {
            return;
        }
        // no error path in drop: a failure is reported on stderr, naming the call
        let report = |what: &str, status| {
            if let Err(e) = nccl.check(what, status) {
                eprintln!("warning: {e}");
            }
        };
        // SAFETY: every communicator is live (not aborted, not destroyed) and no rank
        // uses it any more (the last owner is being dropped); group calls are NCCL's way
        // to drive several ranks' finalisations from one thread.
        unsafe {
            report("ncclGroupStart", (nccl.group_start)());
            for c in &live {
                report("ncclCommFinalize", (nccl.comm_finalize)(c.raw));
            }
            report("ncclGroupEnd", (nccl.group_end)());
            for c in &live {
                report("ncclCommDestroy", (nccl.comm_destroy)(c.raw));
            }
        }
    }
}

/// Communicators for `cuda:o` for each ordinal `o`, in rank order.
pub fn init_all(ordinals: &[usize]) -> Result<NcclComms> {
    let nccl = lib()?;
    let devs: Vec<&'static CudaDev> = ordinals.iter().map(|&o| device::get(o)).collect::<Result<_>>()?;
    let streams: Vec<Arc<CudaStream>> = devs.iter().map(|d| d.new_stream()).collect::<Result<_>>()?;
    let list: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
    let mut raw = vec![std::ptr::null_mut(); ordinals.len()];
    // SAFETY: `raw` has room for one communicator per listed device.
    check("ncclCommInitAll", unsafe { (nccl.comm_init_all)(raw.as_mut_ptr(), list.len() as i32, list.as_ptr()) })?;
    let world = ordinals.len();
    let comms = raw.into_iter().zip(devs).zip(streams).enumerate();
    Ok(NcclComms(comms.map(|(rank, ((raw, dev), stream))| NcclComm { raw, dev, stream, rank, world, aborted: AtomicBool::new(false) }).collect()))
}

/// A new `ncclUniqueId` (rank 0 of a multi-process communicator makes it).
pub fn unique_id() -> Result<nccl_lib::UniqueId> {
    let nccl = lib()?;
    let mut id = nccl_lib::UniqueId([0; nccl_lib::UNIQUE_ID_BYTES]);
    // SAFETY: writes one ncclUniqueId.
    check("ncclGetUniqueId", unsafe { (nccl.get_unique_id)(&mut id) })?;
    Ok(id)
}

/// This process's communicator of a group of `world` processes, as rank `rank`, on
/// `cuda:ordinal`: every rank passes the same `id` (rank 0's `unique_id`), and the call
/// returns once all of them have joined.
pub fn init_rank(ordinal: usize, world: usize, rank: usize, id: nccl_lib::UniqueId) -> Result<NcclComms> {
    let nccl = lib()?;
    let dev = device::get(ordinal)?;
    let stream = dev.new_stream()?;
    // ncclCommInitRank makes its communicator on the thread's current device
    dev.bind()?;
    let mut raw = std::ptr::null_mut();
    // SAFETY: writes one communicator; `id` is passed by value as nccl.h declares.
    check("ncclCommInitRank", unsafe { (nccl.comm_init_rank)(&mut raw, world as i32, id, rank as i32) })?;
    Ok(NcclComms(vec![NcclComm { raw, dev, stream, rank, world, aborted: AtomicBool::new(false) }]))
}

impl NcclComm {
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal()
    }

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
    fn enqueue(&self, what: &str, call: impl FnOnce(&NcclLib, nccl_lib::Stream) -> nccl_lib::Status) -> Result<CudaEvent> {
        let nccl = lib()?;
        let fail = |e| self.dev.error(&format!("ordering NCCL's {what}"), driver_error(e));
        let queued = self.dev.stream.record_event(None).map_err(fail)?;
        self.stream.wait(&queued).map_err(fail)?;
        drop(queued);
        self.dev.check_recorded("releasing the event that orders an NCCL call")?;
        check(what, call(nccl, self.stream.cu_stream() as nccl_lib::Stream))?;
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
        let done = self.enqueue("ncclAllReduce", |nccl, s| unsafe { (nccl.all_reduce)(src.ptr as _, out.ptr as _, len, FLOAT32, SUM, self.raw, s) })?;
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
        let done = self.enqueue("ncclBroadcast", |nccl, s| unsafe { (nccl.broadcast)(src.ptr as _, out.ptr as _, len, FLOAT32, root as i32, self.raw, s) })?;
        self.join(&done)?;
        Ok(Storage::Cuda(CudaStorage::from_buf(out)))
    }

    /// Every rank's first `len` elements of `x`, concatenated in rank order.
    pub fn all_gather(&self, x: &Storage, len: usize) -> Result<Storage> {
        let src = self.buf(x, "all-gather")?;
        let out = self.dev.alloc(len * self.world, DType::F32)?;
        // SAFETY: `out` holds `world * len` f32, `src` at least `len`; joined before returning.
        let done = self.enqueue("ncclAllGather", |nccl, s| unsafe { (nccl.all_gather)(src.ptr as _, out.ptr as _, len, FLOAT32, self.raw, s) })?;
        self.join(&done)?;
        Ok(Storage::Cuda(CudaStorage::from_buf(out)))
    }

    /// Stops this communicator's pending and later collectives (called from the
    /// thread of a rank that failed, so that the others do not wait for it forever).
    pub fn abort(&self) {
        let Ok(nccl) = lib() else { return };
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: ncclCommAbort may be called from another thread to stop a hung
        // collective; it frees the communicator, which `aborted` keeps from being
        // finalised or destroyed again (and from a second abort).
        let _ = unsafe { (nccl.comm_abort)(self.raw) };
    }
}
