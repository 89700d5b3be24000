//! The in-process collective: ranks are threads of one process that meet in shared
//! memory. Each call is a rendezvous: every rank deposits its tensor, the last to
//! arrive computes the result once (sums in rank order, so every rank gets the same
//! bits), and all ranks copy it out. Works for tensors on any device (through the
//! host), so the data-parallel code paths run in CI on the CPU and the kernel emulator.
//!
//!
//! A started call (`start_all_reduce_sum`: a gradient bucket during the backward) is
//! made by a worker thread of the rank, while the rank thread computes on. Like NCCL's
//! calls on their stream, a rank's calls stay one sequence in the order it issued
//! them: while any started call is still to be made, the blocking ones queue behind it
//! on the worker too. So a rank that interleaves its calls differently from the others
//! fails here as it would on GPUs (a mismatch, here an error rather than a hang).

use super::{Collective, Pending};
use crate::{Error, Result, Tensor};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    AllReduceSum,
    Broadcast(usize),
    AllGather,
}

/// A call in progress: what it is, and the ranks' contributions so far.
struct Round {
    op: Op,
    shape: Vec<usize>,
    parts: Vec<Option<Vec<f32>>>,
    arrived: usize,
}

struct State {
    /// Completed calls so far; a waiting rank is released when it moves on.
    generation: u64,
    round: Option<Round>,
    /// The last completed call's result and shape. It stays until every rank has read
    /// it: the next call cannot complete before they all arrive at it.
    result: Arc<(Vec<f32>, Vec<usize>)>,
    /// The first failure, `(rank, message)`.
    failed: Option<(usize, String)>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // a rank that panicked holding the lock left consistent state (no step of ours panics mid-update)
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Calls and f32 elements a rank has contributed so far (what a bandwidth model needs).
#[derive(Default)]
struct Traffic {
    calls: AtomicU64,
    sent: AtomicU64,
}

/// One rank's place in the rendezvous.
struct Endpoint {
    rank: usize,
    shared: Arc<Shared>,
    traffic: Traffic,
}

/// A call for the rank's worker, and where its result goes.
type Job = (Op, Tensor, mpsc::Sender<Result<Tensor>>);

/// One rank of an in-process group (see the module doc).
pub struct ThreadGroup {
    endpoint: Arc<Endpoint>,
    /// The worker that makes the rank's calls while started ones are queued, from the
    /// first started call on.
    worker: Mutex<Option<mpsc::Sender<Job>>>,
    /// Calls handed to the worker and not yet made.
    queued: Arc<AtomicUsize>,
}

impl ThreadGroup {
    /// The `world` ranks of a new group, in rank order; give each to its own thread.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        assert!(world >= 1, "a group needs at least one rank");
        let state = State { generation: 0, round: None, result: Arc::new((vec![], vec![])), failed: None };
        let shared = Arc::new(Shared { world, state: Mutex::new(state), wake: Condvar::new() });
        (0..world)
            .map(|rank| ThreadGroup {
                endpoint: Arc::new(Endpoint { rank, shared: shared.clone(), traffic: Default::default() }),
                worker: Mutex::new(None),
                queued: Default::default(),
            })
            .collect()
    }

    /// `(calls, f32 elements)` this rank has contributed to collectives so far, started
    /// ones included.
    pub fn traffic(&self) -> (u64, u64) {
        let t = &self.endpoint.traffic;
        (t.calls.load(Ordering::Relaxed), t.sent.load(Ordering::Relaxed))
    }

    /// Makes the call `op` on `t` in its place in the rank's sequence: at once, unless
    /// started calls are still queued ahead of it.
    fn call(&self, op: Op, t: &Tensor) -> Result<Tensor> {
        if self.queued.load(Ordering::Acquire) == 0 {
            // only this rank's thread queues calls, so none is ahead of this one
            return self.endpoint.exchange(op, t);
        }
        self.enqueue(op, t)?.recv().map_err(|_| self.worker_stopped())?
    }

    fn worker_stopped(&self) -> Error {
        Error::Msg(format!("rank {}: the collectives thread stopped", self.endpoint.rank))
    }

    /// Hands the call to the rank's worker, starting it on first use.
    fn enqueue(&self, op: Op, t: &Tensor) -> Result<mpsc::Receiver<Result<Tensor>>> {
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if worker.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let (endpoint, queued) = (self.endpoint.clone(), self.queued.clone());
            std::thread::Builder::new()
                .name(format!("rank {} collectives", self.endpoint.rank))
                .spawn(move || {
                    // ends when the group is dropped; a result nobody waits for any more is dropped
                    for (op, t, reply) in rx {
                        let r = endpoint.exchange(op, &t);
                        queued.fetch_sub(1, Ordering::Release);
                        let _ = reply.send(r);
                    }
                })
                .map_err(|e| Error::Msg(format!("rank {}: cannot start the collectives thread: {e}", self.endpoint.rank)))?;
            *worker = Some(tx);
        }
        let (reply, result) = mpsc::channel();
        self.queued.fetch_add(1, Ordering::Release);
        worker.as_ref().expect("started above").send((op, t.clone(), reply)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Release);
            self.worker_stopped()
        })?;
        Ok(result)
    }
}

impl Endpoint {
    fn failure(&self, (rank, why): &(usize, String)) -> Error {
        if *rank == self.rank {
            Error::Msg(why.clone())
        } else {
            Error::Msg(format!("rank {rank} failed, so rank {} stopped: {why}", self.rank))
        }
    }

    /// Deposits `t` for the call `op` and returns the call's result once every rank has
    /// deposited.
    fn exchange(&self, op: Op, t: &Tensor) -> Result<Tensor> {
        let data = t.to_vec_f32()?;
        self.traffic.calls.fetch_add(1, Ordering::Relaxed);
        self.traffic.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(f) = &st.failed {
            return Err(self.failure(f));
        }
        let generation = st.generation;
        let round = st.round.get_or_insert_with(|| Round { op, shape: t.dims().to_vec(), parts: vec![None; sh.world], arrived: 0 });
        if round.op != op || round.shape != t.dims() {
            let why =
                format!(
                "collective mismatch: rank {} called {op:?} on shape {:?} while another rank called {:?} on shape {:?} (the ranks must make the same calls)",
                self.rank, t.dims(), round.op, round.shape
            );
            st.failed = Some((self.rank, why.clone()));
            sh.wake.notify_all();
            return Err(Error::Msg(why));
        }
        round.parts[self.rank] = Some(data);
        round.arrived += 1;
        if round.arrived == sh.world {
            let round = st.round.take().expect("the round in progress");
            st.result = Arc::new(complete(round));
            st.generation += 1;
            sh.wake.notify_all();
        } else {
            while st.generation == generation {
                if let Some(f) = &st.failed {
                    return Err(self.failure(f));
                }
                st = sh.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let result = st.result.clone();
        drop(st);
        Tensor::from_vec(result.0.clone(), &result.1, t.device())
    }
}

/// The result of a round whose every part has arrived.
fn complete(round: Round) -> (Vec<f32>, Vec<usize>) {
    let world = round.parts.len();
    let mut parts = round.parts.into_iter().map(|p| p.expect("every rank deposited"));
    match round.op {
        Op::AllReduceSum => {
            let mut sum = parts.next().expect("at least one rank");
            for p in parts {
                sum.iter_mut().zip(&p).for_each(|(s, x)| *s += x);
            }
            (sum, round.shape)
        }
        Op::Broadcast(root) => (parts.nth(root).expect("root < world"), round.shape),
        Op::AllGather => {
            let mut shape = round.shape;
            let all: Vec<f32> = parts.flatten().collect();
            if shape.is_empty() {
                shape = vec![world];
            } else {
                shape[0] *= world;
            }
            (all, shape)
        }
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.endpoint.rank
    }
    fn world(&self) -> usize {
        self.endpoint.shared.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.call(Op::AllReduceSum, t)
    }
    fn start_all_reduce_sum(&self, t: &Tensor) -> Pending {
        match self.enqueue(Op::AllReduceSum, t) {
            Ok(result) => {
                let stopped = self.worker_stopped();
                Pending::later(move || result.recv().map_err(|_| stopped)?)
            }
            Err(e) => Pending::ready(Err(e)),
        }
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world() {
            return Err(Error::Msg(format!("broadcast from rank {root} in a group of {}", self.world())));
        }
        self.call(Op::Broadcast(root), t)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.call(Op::AllGather, t)
    }
    fn abort(&self, why: &str) {
        let shared = &self.endpoint.shared;
        let mut st = shared.lock();
        st.failed.get_or_insert_with(|| (self.endpoint.rank, why.to_string()));
        shared.wake.notify_all();
    }
}

/// Runs `f` once per rank of an in-process group of `world` threads (`run_group`).
pub fn run_ranks<T: Send>(world: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    run_group(ThreadGroup::new(world).into_iter().map(|g| Arc::new(g) as Arc<dyn Collective>).collect(), f)
}

/// Runs `f` once per rank of `group` (one handle per rank, in rank order), each on its
/// own thread with its handle entered (`parallel::current`), and returns the ranks'
/// results in rank order.
///
/// A rank that returns an error or panics aborts the group, so the other ranks fail at
/// their next collective call instead of waiting for it; the error returned is that
/// rank's own (the first to fail), not the others' consequences.
pub fn run_group<T: Send>(group: Vec<Arc<dyn Collective>>, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    // recorded before the rank aborts the group, so before any consequential failure
    let first_failure: Mutex<Option<usize>> = Mutex::new(None);
    let mut results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                let (f, first_failure) = (&f, &first_failure);
                s.spawn(move || {
                    let rank = g.rank();
                    let _in_group = super::enter(g.clone());
                    let r = match catch_unwind(AssertUnwindSafe(|| f(rank))) {
                        Ok(r) => r,
                        Err(panic) => Err(Error::Msg(format!("rank {rank} panicked: {}", panic_message(&*panic)))),
                    };
                    if let Err(e) = &r {
                        first_failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(rank);
                        g.abort(&e.to_string());
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank threads catch their panics")).collect()
    });
    if let Some(rank) = first_failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(std::mem::replace(&mut results[rank], Err(Error::Msg(String::new()))).err().expect("the first failure is an error"));
    }
    Ok(results.into_iter().map(|r| r.unwrap_or_else(|_| unreachable!("no rank failed"))).collect())
}

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap()
    }

    #[test]
    fn all_reduce_broadcast_and_gather_agree_on_every_rank() {
        let out = run_ranks(3, |rank| {
            let g = crate::parallel::current().unwrap();
            let x = t(&[rank as f32, 10.0 * rank as f32 + 1.0]);
            let sum = g.all_reduce_sum(&x)?.to_vec_f32()?;
            let root = g.broadcast(&x, 2)?.to_vec_f32()?;
            let all = g.all_gather(&x.reshape(&[1, 2])?)?;
            Ok((sum, root, all.dims().to_vec(), all.to_vec_f32()?))
        })
        .unwrap();
        for (sum, root, dims, all) in out {
            assert_eq!(sum, vec![3.0, 33.0]);
            assert_eq!(root, vec![2.0, 21.0]);
            assert_eq!(dims, vec![3, 2]);
            assert_eq!(all, vec![0.0, 1.0, 1.0, 11.0, 2.0, 21.0]);
        }
    }

    #[test]
    fn a_failing_rank_stops_the_others_with_its_message() {
        let err = run_ranks(4, |rank| {
            let g = crate::parallel::current().unwrap();
            if rank == 2 {
                return Err(Error::Msg("rank two ran out of images".into()));
            }
            // the others wait in collectives that rank 2 never joins
            for _ in 0..3 {
                g.all_reduce_sum(&t(&[1.0]))?;
            }
            Ok(())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("rank two ran out of images"), "{err}");
    }

    #[test]
    fn a_panicking_rank_stops_the_others() {
        let err = run_ranks(2, |rank| {
            let g = crate::parallel::current().unwrap();
            if rank == 1 {
                panic!("index out of bounds in rank one");
            }
            g.all_reduce_sum(&t(&[1.0]))?;
            Ok(())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("rank 1 panicked: index out of bounds in rank one"), "{err}");
    }

    #[test]
    fn a_started_call_keeps_its_place_among_the_blocking_ones() {
        // both ranks start a sum and make a blocking one: in the same order they agree...
        let out = run_ranks(2, |rank| {
            let g = crate::parallel::current().unwrap();
            let started = g.start_all_reduce_sum(&t(&[rank as f32, 1.0]));
            let blocking = g.all_reduce_sum(&t(&[10.0; 3]))?.to_vec_f32()?;
            Ok((started.wait()?.to_vec_f32()?, blocking))
        })
        .unwrap();
        assert!(out.iter().all(|o| *o == (vec![1.0, 2.0], vec![20.0; 3])), "{out:?}");
        // ...and a rank that makes them in the other order is an error, not a hang or a
        // sum of different tensors
        let err = run_ranks(2, |rank| {
            let g = crate::parallel::current().unwrap();
            if rank == 0 {
                let started = g.start_all_reduce_sum(&t(&[1.0, 1.0]));
                g.all_reduce_sum(&t(&[1.0; 3]))?;
                started.wait()?;
            } else {
                g.all_reduce_sum(&t(&[1.0; 3]))?;
                g.start_all_reduce_sum(&t(&[1.0, 1.0])).wait()?;
            }
            Ok(())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("collective mismatch"), "{err}");
    }

    #[test]
    fn mismatched_calls_are_an_error_not_a_hang() {
        let err = run_ranks(2, |rank| {
            let g = crate::parallel::current().unwrap();
            let n = if rank == 0 { 2 } else { 3 };
            g.all_reduce_sum(&t(&vec![1.0; n]))?;
            Ok(())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("collective mismatch"), "{err}");
    }
}
