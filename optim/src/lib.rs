//! HyLo, SNGD and K-FAC natural-gradient optimizers for Burn.
//!
//! Build a model from [`capture::CapturedLinear`] and [`capture::CapturedConv2d`], share one
//! [`capture::CaptureHandle`] between the model and the optimizer, and collect the probes'
//! gradients after backward with [`capture::CaptureHandle::gradients`]. See the README for a
//! complete training loop.

pub mod capture;
pub mod comm;
pub mod diagnostics;
pub mod error;
pub mod factors;
pub mod host;
pub mod linalg;
pub mod optimizer;
pub mod precond;
pub mod rows;
pub mod schedule;

pub use capture::{CaptureHandle, CapturedConv2d, CapturedLinear};
pub use factors::ConvMode;
pub use optimizer::{
    CurvatureConfig, HyloConfig, KfacConfig, NaturalGradient, SngdConfig, StepReport,
};
pub use precond::{HyloMode, KfacMethod, SwitchPolicy};
pub use schedule::DampingConfig;
