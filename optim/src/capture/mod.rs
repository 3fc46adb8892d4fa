//! Curvature capture: layer wrappers that record inputs and output gradients on curvature steps.

mod conv2d;
mod geometry;
mod handle;
mod linear;
mod statistics;

pub use conv2d::CapturedConv2d;
pub use geometry::LayerGeometry;
pub use handle::{CaptureHandle, CapturedInput, LayerCapture};
pub use linear::CapturedLinear;
