//! Under `mpirun -np P` (P >= 1): one step of SGD, SNGD and K-FAC with every rank on its own
//! shard gives the update of one process stepping on the union of the shards (checked on rank
//! 0 to 1e-5 relative to the update, NaN failing), and every rank ends with the same weights. Run by `.ci/mpi-test.sh`:
//! `cargo build -p hylo-optim --features mpi --example mpi_equivalence` then
//! `mpirun -np 2 target/debug/examples/mpi_equivalence`.
#![allow(clippy::disallowed_methods)] // The check reads the device freely.

use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use hylo_optim::comm::mpi::MpiComm;
use hylo_optim::comm::{all_reduce_mean, flatten_params, Communicator, Single};
use hylo_optim::{
    CaptureHandle, CapturedConv2d, CapturedLinear, CurvatureConfig, DampingConfig, KfacConfig,
    SngdConfig,
};

type B = Autodiff<Flex>;
const SHARD: usize = 8;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    conv: CapturedConv2d<B>,
    fc: CapturedLinear<B>,
}

impl<B: Backend> Net<B> {
    fn new(capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let conv = Conv2dConfig::new([1, 4], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1));
        Self {
            conv: CapturedConv2d::from_config(&conv, capture, &device).expect("groups = 1"),
            fc: CapturedLinear::from_config(&LinearConfig::new(4 * 4 * 4, 3), capture, &device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.conv.forward(x));
        let [n, c, hh, ww] = h.dims();
        self.fc.forward(h.reshape([n, c * hh * ww]))
    }
}

/// Samples `range` of a fixed problem (the same on every rank).
fn problem(range: std::ops::Range<usize>) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let n = range.len();
    let mut z: u64 = 12345;
    let mut next = || {
        z = z
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let all: Vec<f32> = (0..range.end * 64).map(|_| next()).collect();
    let x = all[range.start * 64..range.end * 64].to_vec();
    let y: Vec<i64> = range.clone().map(|i| (i % 3) as i64).collect();
    let device = Default::default();
    (
        Tensor::from_data(TensorData::new(x, [n, 1, 8, 8]), &device),
        Tensor::from_data(TensorData::new(y, [n]), &device),
    )
}

fn step(
    kind: &str,
    start: &Net<B>,
    range: std::ops::Range<usize>,
    comm: Arc<dyn Communicator>,
) -> Vec<f32> {
    let capture = CaptureHandle::new();
    let model = Net::<B>::new(&capture).load_record(start.clone().into_record());
    let curvature = CurvatureConfig::new()
        .with_freq(1)
        .with_damping(DampingConfig::new().with_initial(0.5));
    // The optimizers exist before the forward pass: they arm the capture for their first step.
    let mut natural = match kind {
        "sngd" => Some(
            SngdConfig::new()
                .with_curvature(curvature)
                .init::<B>(&capture)
                .unwrap(),
        ),
        "kfac" => Some(
            KfacConfig::new()
                .with_curvature(curvature)
                .with_inverse_every(1)
                .init::<B>(&capture)
                .unwrap(),
        ),
        _ => None,
    }
    .map(|o| o.with_communicator(comm.clone()));
    let (x, y) = problem(range);
    let loss = CrossEntropyLossConfig::new()
        .init(&x.device())
        .forward(model.forward(x), y);
    let grads: GradientsParams = capture.gradients(loss.backward(), &model);
    let (grads, _) = all_reduce_mean::<B, _>(grads, &model, comm.as_ref());
    let model = match &mut natural {
        Some(o) => {
            let m = o.step(0.1, model, grads);
            assert!(
                o.last_report().refreshed,
                "{kind}: no curvature was captured"
            );
            m
        }
        None => SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
            .init::<B, Net<B>>()
            .step(0.1, model, grads),
    };
    flatten_params::<B, _>(&model)
}

fn main() {
    let (_universe, comm) = MpiComm::init().expect("MPI initialises once");
    let comm: Arc<dyn Communicator> = Arc::new(comm);
    let (rank, size) = (comm.rank(), comm.size());
    B::seed(&Default::default(), 7);
    let start = Net::<B>::new(&CaptureHandle::new());
    let start = start.clone().load_record(start.into_record());
    let initial = flatten_params::<B, _>(&start);
    let update = |weights: &[f32]| -> Vec<f64> {
        weights
            .iter()
            .zip(&initial)
            .map(|(w, w0)| f64::from(w - w0))
            .collect()
    };
    for kind in ["sgd", "sngd", "kfac"] {
        let mine = step(kind, &start, rank * SHARD..(rank + 1) * SHARD, comm.clone());
        let all = comm.all_gather(&mine);
        if all.chunks(mine.len()).any(|w| w != &mine[..]) {
            comm.abort(&format!("{kind}: ranks hold different weights"));
        }
        if rank == 0 {
            let single = step(kind, &start, 0..size * SHARD, Arc::new(Single));
            // Relative to the update, not to the weights (which barely move in one step).
            let (ours, theirs) = (update(&mine), update(&single));
            let num: f64 = ours.iter().zip(&theirs).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = theirs.iter().map(|b| b * b).sum();
            let err = (num / den).sqrt();
            // A NaN fails too.
            if err.is_nan() || err >= 1e-5 || den == 0.0 {
                comm.abort(&format!(
                    "{kind}: {size} shards differ from one process by {err:e}"
                ));
            }
            println!("{kind}: {size} ranks = one process on the union (relative error {err:.1e})");
        }
    }
}
