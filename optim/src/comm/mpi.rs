//! MPI (Open MPI through the `mpi` crate): one process per device, `mpirun -np P ...`.

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::Threading;

use super::Communicator;

/// The MPI world communicator. Create one per process with [`MpiComm::init`] and keep the
/// returned [`Universe`] alive until the end (dropping it finalises MPI).
pub struct MpiComm {
    world: SimpleCommunicator,
}

// The communicator is only used from the thread that drives training; MPI is initialised with
// `Threading::Serialized`, under which any thread may call MPI as long as calls do not overlap.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI; an error when it was already initialised or when the library cannot
    /// give the threading level this communicator needs.
    ///
    /// Only the thread that drives training calls MPI, but it need not be the thread that
    /// initialised it (tests, embedders): `Serialized` is requested and at least that is
    /// required.
    pub fn init() -> Result<(Universe, Self), String> {
        let (universe, granted) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or("MPI was already initialised in this process")?;
        check_threading(granted)?;
        let world = universe.world();
        Ok((universe, Self { world }))
    }
}

/// `Ok` when MPI granted at least `Serialized`.
fn check_threading(granted: Threading) -> Result<(), String> {
    match granted {
        Threading::Serialized | Threading::Multiple => Ok(()),
        other => Err(format!(
            "MPI granted the threading level {other:?}, but calls from a thread other than \
             the one that initialised MPI need Serialized: use an MPI library built with thread \
             support (Open MPI is)"
        )),
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, data: &mut [f32]) {
        let send = data.to_vec();
        self.world
            .all_reduce_into(&send[..], data, SystemOperation::sum());
    }

    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; local.len() * self.size()];
        self.world.all_gather_into(local, &mut out[..]);
        out
    }

    fn broadcast(&self, data: &mut [f32], root: usize) {
        self.world.process_at_rank(root as i32).broadcast_into(data);
    }

    fn abort(&self, message: &str) -> ! {
        eprintln!("error (rank {} of {}): {message}", self.rank(), self.size());
        self.world.abort(2)
    }
}
