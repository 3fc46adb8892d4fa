//! The GPU backends train as the CPU does: `cargo test -p hylo-train --test backend_parity` on
//! WGPU (a default feature: a real GPU, or Mesa's lavapipe on the CPU), and on CUDA as well with
//! `--features cuda`. Without a usable device the tests say so and pass, unless `CI` is set: then
//! they fail, so CI cannot silently skip them.
//!
//! One model (convolutions with BatchNorm, a stride that does not divide the height, padding, a
//! Linear head and a convolution that is not preconditioned) is loaded from one record into
//! `Autodiff<Flex>` and the GPU backend and trained side by side on identical batches with every
//! optimizer: SGD; the Neumann optimizer; SNGD, K-FAC and HyLo with their defaults (grafting,
//! adaptive damping, the step-length trust region, which the loop feeds through
//! `CaptureHandle::gradients_with_loss`); and the papers' settings: SNGD (Exact and SpatialMean
//! rows, a KL clip), K-FAC (eigen and inverse methods, inversions less often than factor
//! updates), HyLo-KID and HyLo-KIS. Each step's loss is computed as `hylo-train` computes it, so
//! the forward pass moves the BatchNorm statistics (asserted on the CPU); after every step each
//! tensor's update (parameters and BatchNorm statistics) agrees with the CPU's relative to that
//! update, and the step reports (the damping included) agree; a NaN batch is skipped on both,
//! statistics included; optimizer records cross backends. The preconditioners alone are compared
//! on single layers (KIS's kept rows exactly), ResNet-50 stage-4 shapes included; K-FAC there is
//! applied on each device from one shared decomposition. The data loader's batches are checked on
//! the device.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod parity;

use burn::backend::Autodiff;
use parity::layers::{loader_batches_are_intact, preconditioners_match};
use parity::training::{nan_batch_is_skipped, records_cross_backends, train_side_by_side};

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    type G = Autodiff<burn::backend::Wgpu>;

    /// The WGPU device, or `None` (a skip) when there is none (or this build's autotune refuses
    /// it) and `CI` is not set.
    fn device() -> Option<burn::backend::wgpu::WgpuDevice> {
        match hylo_train::device::wgpu_checked() {
            Ok(adapter) => {
                eprintln!("WGPU adapter: {adapter}");
                Some(Default::default())
            }
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI is set, so the WGPU tests must run, but: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: the WGPU parity tests did not run: {e}");
                None
            }
        }
    }

    #[test]
    fn training_matches_the_cpu() {
        if let Some(d) = device() {
            train_side_by_side::<G>(d);
        }
    }

    #[test]
    fn nan_batches_are_skipped_as_on_the_cpu() {
        if let Some(d) = device() {
            nan_batch_is_skipped::<G>(d);
        }
    }

    #[test]
    fn optimizer_records_cross_backends() {
        if let Some(d) = device() {
            records_cross_backends::<G>(d);
        }
    }

    #[test]
    fn preconditioner_directions_match_the_cpu() {
        if let Some(d) = device() {
            preconditioners_match::<burn::backend::Wgpu>(d);
        }
    }

    #[test]
    fn loader_batches_are_intact_on_the_device() {
        if let Some(d) = device() {
            loader_batches_are_intact::<burn::backend::Wgpu>(d);
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    type G = Autodiff<burn::backend::Cuda>;

    /// CUDA device 0, or `None` (a skip, said on stderr) when this machine has no CUDA device
    /// and `CI` is not set; with `CI` set a missing device fails the tests (CI has no GPU: there
    /// the CUDA build is only compiled, not tested).
    fn device() -> Option<burn::backend::cuda::CudaDevice> {
        match hylo_train::device::cuda_ready(0) {
            Ok(()) => Some(burn::backend::cuda::CudaDevice::new(0)),
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI is set, so the CUDA tests must run, but: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: the CUDA parity tests did not run: {e}");
                None
            }
        }
    }

    #[test]
    fn training_matches_the_cpu() {
        if let Some(d) = device() {
            train_side_by_side::<G>(d);
        }
    }

    #[test]
    fn nan_batches_are_skipped_as_on_the_cpu() {
        if let Some(d) = device() {
            nan_batch_is_skipped::<G>(d);
        }
    }

    #[test]
    fn optimizer_records_cross_backends() {
        if let Some(d) = device() {
            records_cross_backends::<G>(d);
        }
    }

    #[test]
    fn preconditioner_directions_match_the_cpu() {
        if let Some(d) = device() {
            preconditioners_match::<burn::backend::Cuda>(d);
        }
    }

    #[test]
    fn loader_batches_are_intact_on_the_device() {
        if let Some(d) = device() {
            loader_batches_are_intact::<burn::backend::Cuda>(d);
        }
    }
}
