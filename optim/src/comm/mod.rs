//! Communication between data-parallel workers: a small trait (all-reduce, all-gather,
//! broadcast) so that MPI (feature `mpi`), in-process threads, or another engine can carry the
//! distributed optimizers; plus the assignment of layers to owners and byte accounting.

mod gradients;
#[cfg(feature = "mpi")]
pub mod mpi;
mod owners;
mod threads;

pub use gradients::{all_reduce_mean, average_buffers, flatten_params, BUCKET_VALUES};
pub use owners::assign_owners;
pub use threads::{ThreadComm, ThreadGroup};

/// Collective operations on `f32` buffers among the workers of one job.
///
/// Every worker must call the same collectives in the same order with buffers of the same
/// length; results are identical on every worker.
pub trait Communicator: Send + Sync {
    /// This worker's index in `0..size`.
    fn rank(&self) -> usize;
    /// Number of workers.
    fn size(&self) -> usize;
    /// Element-wise sum over the workers, in place.
    fn all_reduce_sum(&self, data: &mut [f32]);
    /// Every worker's `local` buffer, concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Vec<f32>;
    /// Overwrites `data` on every worker with `root`'s.
    fn broadcast(&self, data: &mut [f32], root: usize);
    /// Ends the whole job after printing `message` (a failing worker must not leave the others
    /// waiting in a collective).
    fn abort(&self, message: &str) -> !;
}

/// One worker alone: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _data: &mut [f32]) {}

    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        local.to_vec()
    }

    fn broadcast(&self, _data: &mut [f32], _root: usize) {}

    fn abort(&self, message: &str) -> ! {
        eprintln!("error: {message}");
        std::process::exit(1)
    }
}

/// Bytes a worker received through each kind of collective (f32 payloads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommBytes {
    /// All-reduce payload.
    pub all_reduce: u64,
    /// All-gather result (what every worker receives).
    pub all_gather: u64,
    /// Broadcast payload.
    pub broadcast: u64,
}

impl CommBytes {
    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.all_reduce + self.all_gather + self.broadcast
    }
}

impl std::ops::AddAssign for CommBytes {
    fn add_assign(&mut self, other: Self) {
        self.all_reduce += other.all_reduce;
        self.all_gather += other.all_gather;
        self.broadcast += other.broadcast;
    }
}

/// A communicator that counts the bytes of the collectives it forwards.
pub struct Counted<'a> {
    inner: &'a dyn Communicator,
    /// Bytes so far.
    pub bytes: std::cell::Cell<CommBytes>,
}

impl<'a> Counted<'a> {
    /// Counts the collectives sent through `inner`.
    pub fn new(inner: &'a dyn Communicator) -> Self {
        Self {
            inner,
            bytes: Default::default(),
        }
    }

    fn add(&self, f: impl FnOnce(&mut CommBytes)) {
        let mut b = self.bytes.get();
        f(&mut b);
        self.bytes.set(b);
    }

    /// This worker's index.
    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    /// Number of workers.
    pub fn size(&self) -> usize {
        self.inner.size()
    }

    /// Counted [`Communicator::all_reduce_sum`].
    pub fn all_reduce_sum(&self, data: &mut [f32]) {
        self.add(|b| b.all_reduce += 4 * data.len() as u64);
        self.inner.all_reduce_sum(data);
    }

    /// Counted [`Communicator::all_gather`].
    pub fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        let out = self.inner.all_gather(local);
        self.add(|b| b.all_gather += 4 * out.len() as u64);
        out
    }

    /// Counted [`Communicator::broadcast`].
    pub fn broadcast(&self, data: &mut [f32], root: usize) {
        self.add(|b| b.broadcast += 4 * data.len() as u64);
        self.inner.broadcast(data, root);
    }
}
