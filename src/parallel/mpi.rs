//! The multi-process collective: one process per rank, started by an MPI launcher
//! (`mpirun`, `srun`), on as many machines as it gives. MPI gives each process its
//! rank, its local rank (its place among the ranks of its machine: which GPU it takes)
//! and carries the collectives of CPU ranks; GPU ranks use it only to bootstrap NCCL
//! (`NcclGroup::from_mpi`), which then carries theirs, across nodes too.
//!
//! Every MPI call of the process is made by one communication thread, in the order the
//! rank issued them, so a started call (a gradient bucket during the backward) keeps
//! its place in the rank's sequence exactly as on the in-process group, and the rank
//! thread computes on while it runs. That thread also initialises and finalises MPI,
//! so MPI needs no more than its funnelled threading level for the calls;
//! `MPI_THREAD_MULTIPLE` is asked for only so that `abort` may come from the failing
//! thread while the communication thread is blocked in a collective.
//!
//! A failing rank does not return an error to the others: it prints its message and
//! aborts the job (`MPI_Abort`), and the launcher stops every process within seconds
//! (a process killed outright is noticed by the launcher, which does the same), so no
//! rank waits forever on a peer that is gone.

use super::{Collective, Pending};
use crate::{Error, Result, Tensor};
use ::mpi::collective::SystemOperation;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use ::mpi::Threading;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// A call for the communication thread: it runs on the world communicator.
type Job = Box<dyn FnOnce(&SimpleCommunicator) + Send>;

/// Where this process stands in the MPI job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpiPlace {
    pub rank: usize,
    pub world: usize,
    /// Its place among the ranks on its machine (`MPI_COMM_TYPE_SHARED`): its GPU's ordinal.
    pub local_rank: usize,
    pub local_world: usize,
}

/// This process's rank of an MPI job (see the module doc). At most one per process:
/// MPI is initialised once.
pub struct MpiGroup {
    place: MpiPlace,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MpiGroup {
    /// Initialises MPI on a new communication thread and returns this process's rank.
    pub fn init() -> Result<MpiGroup> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel::<Result<MpiPlace>>();
        let thread = std::thread::Builder::new()
            .name("MPI collectives".into())
            .spawn(move || {
                let Some((universe, _level)) = ::mpi::initialize_with_threading(Threading::Multiple) else {
                    let _ = ready.send(Err(Error::Msg("MPI was already initialised in this process: one MpiGroup per process".into())));
                    return;
                };
                let world = universe.world();
                // the ranks sharing this machine's memory, in world order
                let local = world.split_shared(world.rank());
                let place = MpiPlace {
                    rank: world.rank() as usize,
                    world: world.size() as usize,
                    local_rank: local.rank() as usize,
                    local_world: local.size() as usize,
                };
                drop(local);
                let _ = ready.send(Ok(place));
                for job in queue {
                    job(&world);
                }
                // the group was dropped: MPI_Finalize, from the thread that initialised it
                drop(universe);
            })
            .map_err(|e| Error::Msg(format!("cannot start the MPI communication thread: {e}")))?;
        let place = started.recv().map_err(|_| Error::Msg("MPI's initialisation failed (the communication thread stopped)".into()))??;
        Ok(MpiGroup { place, jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) })
    }

    pub fn place(&self) -> MpiPlace {
        self.place
    }

    /// Queues `call` after every call issued so far and returns where its result comes.
    fn start<T: Send + 'static>(&self, call: impl FnOnce(&SimpleCommunicator) -> T + Send + 'static) -> Result<mpsc::Receiver<T>> {
        let (reply, result) = mpsc::channel();
        let job: Job = Box::new(move |world| {
            let _ = reply.send(call(world));
        });
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.as_ref().ok_or_else(|| self.stopped())?.send(job).map_err(|_| self.stopped())?;
        Ok(result)
    }

    fn stopped(&self) -> Error {
        Error::Msg(format!("MPI rank {}: the communication thread stopped", self.place.rank))
    }

    /// Makes `call` in its place in the rank's sequence and waits for it.
    fn call<T: Send + 'static>(&self, call: impl FnOnce(&SimpleCommunicator) -> T + Send + 'static) -> Result<T> {
        self.start(call)?.recv().map_err(|_| self.stopped())
    }

    /// Rank `root`'s bytes on every rank (each rank passes a buffer of the same length).
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        self.check_root(root)?;
        let mut buf = bytes.to_vec();
        self.call(move |w| {
            w.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
            buf
        })
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.place.world {
            return Err(Error::Msg(format!("broadcast from rank {root} in an MPI job of {} ranks", self.place.world)));
        }
        Ok(())
    }
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        // the queue's end stops the thread, which finalises MPI; joined so that the
        // process does not exit before (MPI counts that as a failed rank)
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn sum_into(data: Vec<f32>) -> impl FnOnce(&SimpleCommunicator) -> Vec<f32> + Send + 'static {
    move |w| {
        let mut out = vec![0f32; data.len()];
        w.all_reduce_into(&data[..], &mut out[..], SystemOperation::sum());
        out
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.place.rank
    }
    fn world(&self) -> usize {
        self.place.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let sum = self.call(sum_into(t.to_vec_f32()?))?;
        Tensor::from_vec(sum, t.dims(), t.device())
    }
    fn start_all_reduce_sum(&self, t: &Tensor) -> Pending {
        let (dims, device) = (t.dims().to_vec(), t.device());
        let started = t.to_vec_f32().and_then(|data| self.start(sum_into(data)));
        match started {
            Ok(result) => {
                let stopped = self.stopped();
                Pending::later(move || Tensor::from_vec(result.recv().map_err(|_| stopped)?, &dims, device))
            }
            Err(e) => Pending::ready(Err(e)),
        }
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.check_root(root)?;
        let mut buf = t.to_vec_f32()?;
        let buf = self.call(move |w| {
            w.process_at_rank(root as i32).broadcast_into(&mut buf[..]);
            buf
        })?;
        Tensor::from_vec(buf, t.dims(), t.device())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let data = t.to_vec_f32()?;
        let world = self.place.world;
        let all = self.call(move |w| {
            let mut out = vec![0f32; data.len() * world];
            w.all_gather_into(&data[..], &mut out[..]);
            out
        })?;
        let mut shape = t.dims().to_vec();
        match shape.first_mut() {
            Some(n) => *n *= world,
            None => shape.push(world),
        }
        Tensor::from_vec(all, &shape, t.device())
    }
    /// Ends the whole job: prints `why` with this rank's number, then `MPI_Abort`, upon
    /// which the launcher stops every rank (there is no group left to fail softly).
    fn abort(&self, why: &str) {
        abort_job(self.place.rank, why)
    }
}

/// Prints `why` for `rank` and aborts the MPI job (exit status 1 from the launcher).
pub fn abort_job(rank: usize, why: &str) -> ! {
    // one write: the ranks' lines reach the launcher's output whole, not interleaved
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("dfkd: rank {rank} failed: {why}\n").as_bytes());
    // MPI_Abort from this thread, while the communication thread may be blocked in a
    // collective: what MPI_THREAD_MULTIPLE (asked for at init) allows
    SimpleCommunicator::world().abort(1)
}

/// The bytes (`len` of them) that rank 0 makes with `make`, on every rank: how NCCL's
/// unique id reaches the other processes. Rank 0's failure is its error (the others
/// wait in the broadcast until the job is aborted).
pub fn bootstrap_id(mpi: &MpiGroup, len: usize, make: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    let mine = if mpi.rank() == 0 {
        let id = make()?;
        if id.len() != len {
            return Err(Error::Msg(format!("the bootstrap id has {} bytes, expected {len}", id.len())));
        }
        id
    } else {
        vec![0; len]
    };
    mpi.broadcast_bytes(&mine, 0)
}
