//! Datasets for the training binaries; nothing is downloaded.

pub mod synthetic;
