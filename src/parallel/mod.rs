//! Data parallelism: ranks that each run the same step on their own share of the
//! batch and agree on every weight, as PyTorch's DDP does.
//!
//! A `Collective` is one rank's handle on its group: all-reduce, broadcast and
//! all-gather of tensors. Two implementations: `ThreadGroup` (ranks as threads of one
//! process, any device: how CI tests every data-parallel path without a GPU) and
//! `NcclGroup` (NCCL, one thread per GPU). On top of them: differentiable all-reduce
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
mod nccl;
mod ops;
mod threads;

pub use buckets::{average_gradients, backward_averaged, GradientBuckets, DEFAULT_BUCKET_ELEMS};
pub use nccl::NcclGroup;
pub use ops::{all_gather, all_reduce_sum, broadcast_buffers, broadcast_module, global_batch_mean, global_channel_stats, global_channel_stats_many};
pub use threads::{run_group, run_ranks, ThreadGroup};

use crate::{Result, Tensor};
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

/// Restores the thread's previous group when dropped.
pub struct GroupGuard(Option<Arc<dyn Collective>>);
impl Drop for GroupGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.0.take())
    }
}
