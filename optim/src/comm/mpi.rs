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
    /// Initialises MPI; `None` when it was already initialised.
    pub fn init() -> Option<(Universe, Self)> {
        let (universe, _threading) = mpi::initialize_with_threading(Threading::Serialized)?;
        let world = universe.world();
        Some((universe, Self { world }))
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
