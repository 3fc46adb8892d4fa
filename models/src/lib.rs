//! Burn modules built from the curvature-capture wrappers of `hylo-optim`.

pub mod small_cnn;

pub use small_cnn::{SmallCnn, SmallCnnConfig};
