//! Preconditioners: each turns a layer's curvature data and damping into a direction.

pub mod kfac;
pub mod kid;
pub mod kis;
pub mod lowrank;
pub mod sngd;
pub mod stacked;
pub mod switch;

pub use kfac::{KfacMethod, KfacState};
pub use lowrank::{FisherWeights, LowRankState};
pub use switch::{HyloMode, SwitchPolicy};
