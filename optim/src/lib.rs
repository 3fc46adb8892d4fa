//! HyLo, SNGD and K-FAC natural-gradient optimizers for [Burn](https://burn.dev).
//!
//! - **HyLo** (hybrid low-rank natural gradient, Mu et al., SC'22): KID (Kronecker interpolative
//!   decomposition) and KIS (Kronecker importance sampling) compressions of the per-sample
//!   kernel, switched by the phase of training ([`HyloConfig`]).
//! - **SNGD**: the exact damped natural gradient through Sherman-Morrison-Woodbury
//!   ([`SngdConfig`]).
//! - **K-FAC**: Kronecker-factored curvature with eigendecompositions or inverses, as in KAISA
//!   ([`KfacConfig`]).
//! - **Neumann** (Krishnan et al., ICLR 2018): the mini-batch Hessian inverted implicitly by a
//!   Neumann series at one gradient per step, for comparisons ([`NeumannConfig`]).
//!
//! Each is a Burn [`Optimizer`](burn::optim::Optimizer) generic over the backend (CPU, WGPU,
//! CUDA) that preconditions the layers built from the capture wrappers [`CapturedLinear`] and
//! [`CapturedConv2d`] (drop-in for Burn's `Linear` and `Conv2d`) and gives every other parameter
//! SGD with momentum. Data-parallel training goes through the [`comm::Communicator`] trait (MPI
//! with the `mpi` feature). Minimum Rust version: 1.92 (Burn 0.21's).
//!
//! Features: `fast-cpu` (default) builds Burn's CPU backend (Flex) with its parallel (rayon)
//! and SIMD kernels, which Burn's `flex` feature alone leaves out; `mpi` adds the MPI
//! communicator (Open MPI and libclang at build time).
//!
//! The model and the optimizer share one [`CaptureHandle`]; the only change to a Burn training
//! loop is that the gradients go through it. With the default recipe (SGD's step size grafted
//! onto the natural-gradient direction, damping adapted by the Levenberg-Marquardt rule) the
//! handle also keeps each curvature period's first batch and evaluates it again when the period
//! ends, so it is given the batch and how to compute a batch's loss:
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::module::Module;
//! use burn::nn::loss::CrossEntropyLossConfig;
//! use burn::nn::LinearConfig;
//! use burn::optim::Optimizer;
//! use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
//! use hylo_optim::{CaptureHandle, CapturedLinear, CurvatureConfig, HyloConfig};
//!
//! type B = Autodiff<Flex>;
//!
//! #[derive(Module, Debug)]
//! struct Net<B: Backend> {
//!     hidden: CapturedLinear<B>,
//!     out: CapturedLinear<B>,
//! }
//!
//! impl<B: Backend> Net<B> {
//!     fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
//!         self.out.forward(burn::tensor::activation::relu(self.hidden.forward(x)))
//!     }
//! }
//!
//! let device = Default::default();
//! let capture = CaptureHandle::new();
//! let mut model = Net::<B> {
//!     hidden: CapturedLinear::from_config(&LinearConfig::new(4, 16), &capture, &device),
//!     out: CapturedLinear::from_config(&LinearConfig::new(16, 3), &capture, &device),
//! };
//! let mut optim = HyloConfig::new()
//!     .with_curvature(CurvatureConfig::new().with_freq(2))
//!     .init::<B>(&capture)
//!     .expect("valid settings");
//!
//! // Class = index of the largest of the first three features.
//! let x: Vec<f32> = (0..64 * 4).map(|i| ((i * 37 % 17) as f32 / 8.5) - 1.0).collect();
//! let y: Vec<i64> = x.chunks(4).map(|r| {
//!     (0..3).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as i64
//! }).collect();
//! let x = Tensor::<B, 2>::from_data(TensorData::new(x, [64, 4]), &device);
//! let y = Tensor::<B, 1, Int>::from_data(TensorData::new(y, [64]), &device);
//! let loss_fn = CrossEntropyLossConfig::new().init(&device);
//!
//! let loss_of = |model: &Net<B>, (x, y): &(Tensor<B, 2>, Tensor<B, 1, Int>)| {
//!     loss_fn.forward(model.forward(x.clone()), y.clone())
//! };
//! let batch = (x, y);
//! let initial = loss_of(&model, &batch).into_scalar();
//! for _ in 0..20 {
//!     let loss = loss_of(&model, &batch);
//!     // Instead of GradientsParams::from_grads(loss.backward(), &model):
//!     let grads = capture.gradients_with_loss(loss, &model, &batch, loss_of);
//!     model = optim.step(0.1, model, grads);
//! }
//! let last = loss_of(&model, &batch).into_scalar();
//! assert!(last < 0.5 * initial, "{last} vs {initial}");
//! // What the last step did: refreshed curvature, HyLo's mode (KID or KIS), fallbacks.
//! let report = optim.last_report();
//! assert!(!report.skipped && report.fallbacks.is_empty());
//! ```
//!
//! With a fixed damping (`DampingConfig::new().with_initial(..)`, the papers' schedules)
//! `capture.gradients(loss.backward(), &model)` is all a loop needs. The README has the whole
//! picture (schedules, burn-train's `Learner`, distributed training); `examples/custom_loop.rs`
//! is a complete program, and the workspace's `hylo-train` crate has the `Learner` example.

#![warn(missing_docs)]

pub mod capture;
pub mod comm;
pub mod diagnostics;
pub mod error;
pub mod factors;
pub mod gemm_conv;
pub mod host;
pub mod linalg;
pub mod neumann;
pub mod optimizer;
pub mod precond;
pub mod rows;
pub mod schedule;

pub use capture::{CaptureHandle, CapturedConv2d, CapturedLinear};
pub use error::TrainingError;
pub use factors::ConvMode;
pub use neumann::NeumannConfig;
pub use optimizer::{
    CurvatureConfig, GaveUp, Graft, HyloConfig, KfacConfig, NaturalGradient, PeriodVerdict,
    ReportObserver, SngdConfig, StepLengthConfig, StepReport,
};
pub use precond::{HyloMode, KfacMethod, SwitchPolicy};
pub use schedule::DampingConfig;
