//! Data parallelism: ranks that each run the same step on their own share of the
//! batch and agree on every weight, as PyTorch's DDP does.
//!
//! A `Collective` is one rank's handle on its group: all-reduce, broadcast and
//! all-gather of tensors. Implementations: `ThreadGroup` (ranks as threads of one
//! process, any device: how CI tests every data-parallel path without a GPU),
//! `NcclGroup` (NCCL, one thread per GPU, or one process per GPU bootstrapped by MPI)
//! and, with the `mpi` feature, `MpiGroup` (one process per rank, CPU ranks'
//! collectives over MPI, on as many machines as the launcher gives). On top of them: differentiable all-reduce
//! and all-gather, synchronised BatchNorm and broadcasting a module's weights (`ops`),
//! and gradient averaging in buckets overlapped with the backward pass (`buckets`).
//!
//! How a step stays equal to one process on the concatenated batch: every batch
//! statistic goes through an all-reduce (BatchNorm in training mode, the BN-statistics
//! loss, batch-mean predictions), the contrastive loss gathers the whole batch's
//! projections (`distill.global_negatives`), each per-sample loss is a mean over the
//! rank's share, and the parameter gradients are averaged over the ranks. The
//! backward of an all-reduce is an all-reduce of the gradient: with the final average,
//! each rank's input then receives exactly its share of the global loss's gradient.
//!
//! The group of the running rank is thread-local (`enter`, `current`), like
//! `no_grad`: layers deep in a model (BatchNorm) find it without every forward
//! signature carrying it, and a single-device run, which never enters one, takes no
//! collective at all.

mod buckets;
#[cfg(feature = "mpi")]
pub mod mpi;
mod nccl;
mod ops;
mod threads;

#[cfg(feature = "mpi")]
pub use self::mpi::{MpiGroup, MpiPlace};
pub use buckets::{average_gradients, backward_averaged, GradientBuckets, DEFAULT_BUCKET_ELEMS};
pub use nccl::NcclGroup;
pub use ops::{all_gather, all_reduce_sum, broadcast_buffers, broadcast_module, global_batch_mean, global_channel_stats, global_channel_stats_many};
pub use threads::{run_group, run_ranks, ThreadGroup};

use crate::{Error, Result, Tensor};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// One rank's handle on its group. Every rank must make the same calls in the same
/// order with tensors of the same shape; a mismatch is an error on every rank, and a
/// rank that fails (`abort`) makes the others' pending and later calls fail with its
/// message instead of waiting for it forever.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The elementwise sum of every rank's `t`, on every rank (same shape and device).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Starts `all_reduce_sum` of `t` and returns at once, so the rank computes on
    /// (and may make further calls) while it runs; the sum comes from `Pending::wait`.
    /// A started call keeps its place in the rank's sequence of calls: the rule above
    /// counts it where it was started. The default makes the call at once (correct,
    /// overlapping nothing).
    fn start_all_reduce_sum(&self, t: &Tensor) -> Pending {
        Pending::ready(self.all_reduce_sum(t))
    }
    /// Rank `root`'s `t` on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Every rank's `t` concatenated along dim 0 in rank order, on every rank.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Fails the group: every rank's pending and later calls return an error naming
    /// this rank and `why`.
    fn abort(&self, why: &str);
}

/// A collective started without waiting for it.
#[must_use = "a started collective must be waited for"]
pub struct Pending(Box<dyn FnOnce() -> Result<Tensor> + Send>);

impl Pending {
    /// A call that is already over.
    pub fn ready(result: Result<Tensor>) -> Pending {
        Pending(Box::new(move || result))
    }

    /// A call whose result `wait` gets from `f`.
    pub fn later(f: impl FnOnce() -> Result<Tensor> + Send + 'static) -> Pending {
        Pending(Box::new(f))
    }

    /// The call's result, once every rank has joined it.
    pub fn wait(self) -> Result<Tensor> {
        (self.0)()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<dyn Collective>>> = const { RefCell::new(None) };
    static SYNC_BATCH_NORM: Cell<bool> = const { Cell::new(true) };
}

/// Whether BatchNorm layers in training mode on this thread's rank normalise with the
/// global batch's statistics (the default: a step equals one process's), or with the
/// rank's own share only (`parallel.sync_batch_norm = false`, DDP's default: no
/// collective per BN layer, but the result depends on the number of ranks).
pub fn sync_batch_norm() -> bool {
    SYNC_BATCH_NORM.with(|s| s.get())
}

/// Sets `sync_batch_norm` for this thread (a rank's distiller does, from its config).
pub fn set_sync_batch_norm(on: bool) {
    SYNC_BATCH_NORM.with(|s| s.set(on))
}

/// The group of the rank running on this thread, when it has more than one rank.
pub fn current() -> Option<Arc<dyn Collective>> {
    CURRENT.with(|c| c.borrow().clone()).filter(|g| g.world() > 1)
}

/// Makes `group` this thread's group until the guard drops.
pub fn enter(group: Arc<dyn Collective>) -> GroupGuard {
    GroupGuard(CURRENT.with(|c| c.borrow_mut().replace(group)))
}

/// Makes this thread belong to no group until the guard drops: what one rank computes
/// alone (rank 0 training the teacher of a multi-process job) takes no collective.
pub fn leave() -> GroupGuard {
    GroupGuard(CURRENT.with(|c| c.borrow_mut().take()))
}

/// `f` computed by this rank alone (`leave`).
pub fn alone<T>(f: impl FnOnce() -> T) -> T {
    let _alone = leave();
    f()
}

/// Restores the thread's previous group when dropped.
pub struct GroupGuard(Option<Arc<dyn Collective>>);
impl Drop for GroupGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.0.take())
    }
}

/// Refuses to go on unless every rank of `group` passes the same `bytes` (`what`, a
/// plural: the resolved config and run options): ranks launched with different configs would otherwise
/// compute different steps, or wait in collectives the others never make. One
/// all-gather of a 64-bit hash, carried as four exact 16-bit values, on `device`.
pub fn check_same(group: &dyn Collective, what: &str, bytes: &[u8], device: crate::Device) -> Result<()> {
    // FNV-1a: stable across builds and machines, unlike std's hasher
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let parts: Vec<f32> = (0..4).map(|i| ((hash >> (16 * i)) & 0xffff) as f32).collect();
    // on the rank's device: an NCCL group carries GPU tensors only
    let all = group.all_gather(&Tensor::from_slice(&parts, &[1, 4], crate::Device::Cpu)?.to_device(device)?)?.to_vec_f32()?;
    let of = |rank: usize| all[4 * rank..4 * rank + 4].iter().enumerate().fold(0u64, |h, (i, &v)| h | ((v as u64) << (16 * i)));
    match (1..group.world()).find(|&r| of(r) != of(0)) {
        None => Ok(()),
        Some(r) => Err(Error::Msg(format!(
            "rank {r}'s {what} differ from rank 0's (hash {:016x}, rank 0: {:016x}): every rank must be started with the same config, flags and seed",
            of(r),
            of(0)
        ))),
    }
}

/// Runs `f` as this process's rank of a multi-process group (the group entered, as
/// `run_group` does for threads). A failure, error or panic, goes to `fail` with the
/// message: for MPI, which prints it with the rank and aborts the whole job, so the
/// other processes never wait for this one.
pub fn run_process<T>(group: Arc<dyn Collective>, fail: impl FnOnce(&str), f: impl FnOnce(usize) -> Result<T>) -> Result<T> {
    let rank = group.rank();
    let _in_group = enter(group.clone());
    let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rank))) {
        Ok(r) => r,
        Err(panic) => Err(Error::Msg(format!("rank {rank} panicked: {}", threads::panic_message(&*panic)))),
    };
    if let Err(e) = &r {
        // a GPU group's own abort first (NCCL's pending calls stop), then the job's
        group.abort(&e.to_string());
        fail(&e.to_string());
    }
    r
}
