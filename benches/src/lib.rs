//! Measurements behind `hylo-bench` and the criterion benches: per-layer curvature work and
//! per-step preconditioning of K-FAC, SNGD and HyLo on real model shapes, training-step times,
//! communication volumes, optimizer-state memory and data-loading throughput; the convergence
//! benchmark.

#![warn(missing_docs)]

pub mod batch;
pub mod comm;
pub mod conv;
pub mod convergence;
pub mod curvature_scale;
pub mod journal;
pub mod kernels;
pub mod layers;
pub mod peer;
pub mod results;
pub mod steps;
pub mod sweep;

pub use layers::{model_layer_cases, time_layer, LayerCase, LayerTiming};

use std::time::Instant;

/// Seconds taken by `f` (the minimum of `repeats` runs, after one warm-up when `repeats > 1`).
pub fn seconds<T>(repeats: usize, mut f: impl FnMut() -> T) -> f64 {
    if repeats > 1 {
        std::hint::black_box(f());
    }
    (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
