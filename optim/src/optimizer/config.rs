//! Settings of the natural-gradient optimizers and their `init`.

use burn::config::Config;
use burn::tensor::backend::AutodiffBackend;

use super::{Graft, NaturalGradient, StepLengthConfig};
use crate::capture::CaptureHandle;
use crate::error::ConfigError;
use crate::factors::ConvMode;
use crate::precond::{KfacMethod, SwitchPolicy};
use crate::schedule::DampingConfig;

/// Settings shared by SNGD, K-FAC and HyLo.
#[derive(Config, Debug, PartialEq)]
pub struct CurvatureConfig {
    /// Momentum m of `buf = m buf + d`.
    #[config(default = 0.9)]
    pub momentum: f64,
    /// Weight decay added to the (preconditioned) direction: `d = v + wd p`.
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// Curvature is captured every `freq` steps (SNGD, HyLo: refreshed; K-FAC: factors updated).
    #[config(default = 10)]
    pub freq: usize,
    /// Damping lambda and its schedule: by default adapted from 1 by the Levenberg-Marquardt
    /// rule (which needs the training loop to report each period's loss change, see
    /// `NaturalGradient::observe_loss_change`; without it the damping stays at 1); a fixed
    /// value or decay (`DampingConfig::new().with_initial(..)`) reproduces the papers' runs.
    #[config(default = "DampingConfig::new().with_initial(1.0).with_adaptive(true)")]
    pub damping: DampingConfig,
    /// How convolutions' per-sample gradients are represented (SNGD, HyLo): by default at the
    /// gradient's scale; `ConvMode::SpatialMean` is the HyLo paper's.
    #[config(default = "ConvMode::GradientScale")]
    pub conv_mode: ConvMode,
    /// KL clipping kappa (KAISA): every update is scaled by min(1, sqrt(kappa / (lr^2 sum <v, g>))).
    #[config(default = "None")]
    pub kl_clip: Option<f64>,
    /// Whose step size the directions take: SGD's (the default: each layer's direction
    /// rescaled to the norm of its gradient, so SGD's learning rate and schedule carry over) or
    /// the preconditioner's own (`Graft::None`, the papers' update).
    #[config(default = "Graft::Sgd")]
    pub graft: Graft,
    /// The step-length trust region kept beside grafting (with adaptive damping): a factor on
    /// the learning rate, shrunk when a period's step overshoots and grown back when the
    /// quadratic model predicts it well.
    #[config(default = "StepLengthConfig::new()")]
    pub step_length: StepLengthConfig,
    /// Adaptive damping: periods rejected in a row (each retried with a shorter, more damped
    /// step) after which the optimizer gives up: it leaves the weights of the last kept period
    /// alone and reports `TrainingError::Diverged` (`NaturalGradient::failure`, `try_step`).
    #[config(default = 5)]
    pub max_rejections: usize,
}

impl CurvatureConfig {
    /// Checks every field, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid(
                "momentum",
                format!("expected 0 <= momentum < 1, got {}", self.momentum),
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid(
                "weight_decay",
                format!("expected >= 0, got {}", self.weight_decay),
            );
        }
        if self.max_rejections == 0 {
            return invalid("max_rejections", "expected at least 1".into());
        }
        if self.freq == 0 {
            return invalid("freq", "expected at least 1".into());
        }
        if let Some(k) = self.kl_clip {
            if !(k.is_finite() && k > 0.0) {
                return invalid("kl_clip", format!("expected a positive number, got {k}"));
            }
        }
        self.step_length.validate()?;
        self.damping.validate()
    }
}

/// SNGD: exact damped natural gradient by Sherman-Morrison-Woodbury.
#[derive(Config, Debug)]
pub struct SngdConfig {
    /// Shared settings.
    #[config(default = "CurvatureConfig::new()")]
    pub curvature: CurvatureConfig,
}

/// K-FAC with running-average factors (updated every `curvature.freq` steps) and eigen-decomposed
/// inverses (recomputed every `inverse_every` steps, a multiple of `freq`).
#[derive(Config, Debug)]
pub struct KfacConfig {
    /// Shared settings.
    #[config(default = "CurvatureConfig::new()")]
    pub curvature: CurvatureConfig,
    /// Steps between eigendecompositions (a multiple of `curvature.freq`).
    #[config(default = 10)]
    pub inverse_every: usize,
    /// Running-average decay of the factors.
    #[config(default = 0.95)]
    pub factor_decay: f64,
    /// How the factors are inverted: eigendecompositions (default) or Cholesky inverses of the
    /// damped factors.
    #[config(default = "KfacMethod::Eigen")]
    pub method: KfacMethod,
}

/// HyLo: KID or KIS compression of the SNGD kernel, switched by a policy.
#[derive(Config, Debug)]
pub struct HyloConfig {
    /// Shared settings.
    #[config(default = "CurvatureConfig::new()")]
    pub curvature: CurvatureConfig,
    /// Compression ratio rho: r = max(1, ceil(rho n)) rows are kept.
    #[config(default = 0.1)]
    pub rho: f64,
    /// When KID is used and when KIS.
    #[config(default = "SwitchPolicy::Auto { threshold: 0.2 }")]
    pub switch: SwitchPolicy,
    /// Seed of KIS sampling.
    #[config(default = 0)]
    pub seed: u64,
}

/// Which method an optimizer runs, with its own settings.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// SNGD.
    Sngd,
    /// K-FAC.
    Kfac {
        /// Steps between eigendecompositions (or inversions).
        inverse_every: usize,
        /// Running-average decay of the factors.
        factor_decay: f64,
        /// Eigendecompositions or inverses.
        method: KfacMethod,
    },
    /// HyLo.
    Hylo {
        /// Compression ratio.
        rho: f64,
        /// KID/KIS policy.
        switch: SwitchPolicy,
        /// KIS seed.
        seed: u64,
    },
}

impl SngdConfig {
    /// The optimizer, reading curvature from the layers that share `capture`.
    pub fn init<B: AutodiffBackend>(
        &self,
        capture: &CaptureHandle,
    ) -> Result<NaturalGradient<B>, ConfigError> {
        NaturalGradient::new(Method::Sngd, self.curvature.clone(), capture)
    }
}

impl KfacConfig {
    /// The optimizer, reading curvature from the layers that share `capture`.
    pub fn init<B: AutodiffBackend>(
        &self,
        capture: &CaptureHandle,
    ) -> Result<NaturalGradient<B>, ConfigError> {
        if self.inverse_every == 0
            || !self
                .inverse_every
                .is_multiple_of(self.curvature.freq.max(1))
        {
            return Err(ConfigError::Invalid {
                field: "inverse_every",
                message: format!(
                    "expected a positive multiple of freq = {}, got {}",
                    self.curvature.freq, self.inverse_every
                ),
            });
        }
        if !(0.0..1.0).contains(&self.factor_decay) {
            return Err(ConfigError::Invalid {
                field: "factor_decay",
                message: format!("expected 0 <= decay < 1, got {}", self.factor_decay),
            });
        }
        let method = Method::Kfac {
            inverse_every: self.inverse_every,
            factor_decay: self.factor_decay,
            method: self.method,
        };
        NaturalGradient::new(method, self.curvature.clone(), capture)
    }
}

impl HyloConfig {
    /// The optimizer, reading curvature from the layers that share `capture`.
    pub fn init<B: AutodiffBackend>(
        &self,
        capture: &CaptureHandle,
    ) -> Result<NaturalGradient<B>, ConfigError> {
        if !(self.rho > 0.0 && self.rho <= 1.0) {
            return Err(ConfigError::Invalid {
                field: "rho",
                message: format!("expected 0 < rho <= 1, got {}", self.rho),
            });
        }
        if let SwitchPolicy::Epochs {
            a,
            b,
            c,
            steps_per_epoch,
        } = &self.switch
        {
            if *steps_per_epoch == 0 || a > b || b > c {
                return Err(ConfigError::Invalid {
                    field: "switch",
                    message: format!(
                        "expected epochs a <= b <= c and steps_per_epoch >= 1, got {a},{b},{c} \
                         with {steps_per_epoch} steps per epoch"
                    ),
                });
            }
        }
        let method = Method::Hylo {
            rho: self.rho,
            switch: self.switch.clone(),
            seed: self.seed,
        };
        NaturalGradient::new(method, self.curvature.clone(), capture)
    }
}
