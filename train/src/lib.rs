//! The `hylo-train` binary's library: arguments, data, optimizers, the training loop, outputs
//! and plots.

#![warn(missing_docs)]

pub mod app;
pub mod cli;
pub mod data;
pub mod demo;
pub mod device;
pub mod optimizers;
pub mod output;
pub mod plot;
pub mod task;
pub mod trainer;
pub mod training;
pub mod watches;
pub mod workers;
