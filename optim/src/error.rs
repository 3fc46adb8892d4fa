//! Errors of the curvature computations and of user input to the optimizers.

use thiserror::Error;

/// Why a layer's curvature could not be computed; the optimizer falls back to the plain gradient.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CurvatureError {
    /// A matrix that must be positive definite was not (Cholesky failed).
    #[error("a {size}x{size} matrix that should be positive definite is not (Cholesky failed)")]
    NotPositiveDefinite {
        /// Order of the matrix.
        size: usize,
    },
    /// NaN or Inf appeared in the named quantity.
    #[error("NaN or Inf in {what}")]
    NonFinite {
        /// The quantity that held the non-finite value.
        what: &'static str,
    },
    /// An iterative host routine did not converge.
    #[error("{what} did not converge")]
    NoConvergence {
        /// The routine.
        what: &'static str,
    },
    /// The captured tensors do not fit the layer's gradient.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Invalid settings given to an optimizer or a capture wrapper.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    /// A setting is outside its valid range.
    #[error("invalid value for `{field}`: {message}")]
    Invalid {
        /// The setting's name.
        field: &'static str,
        /// What was expected.
        message: String,
    },
    /// The layer is not supported by curvature capture.
    #[error("unsupported layer: {0}")]
    Unsupported(String),
}

/// Why a natural-gradient optimizer stopped training.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TrainingError {
    /// Adaptive damping rejected this many curvature periods in a row (the loss of each
    /// period's first batch blew up although every retry took a shorter, more damped step): the
    /// weights are those of the last period that was kept, and further steps leave them alone.
    #[error(
        "training diverges: {rejections} curvature periods in a row were rejected (the loss of \
         the period's first batch went from {before} to {after}; damping {damping}, step-length \
         factor {step_scale}); the weights are those of the last period that was kept. Lower \
         the learning rate, or start the damping higher"
    )]
    Diverged {
        /// Periods rejected in a row.
        rejections: usize,
        /// The last rejected period's loss at its start.
        before: f64,
        /// Its loss at its end.
        after: f64,
        /// The damping reached.
        damping: f64,
        /// The step-length factor reached.
        step_scale: f64,
    },
}
