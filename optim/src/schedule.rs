//! Schedules of HyLo's code: damping decay per refresh and the warmup + multi-step learning rate.

use burn::config::Config;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::LearningRate;
use burn::tensor::backend::Backend;

use crate::error::ConfigError;

/// Damping lambda: constant, decaying towards a target at each refresh after a warmup, or
/// adapted by the Levenberg-Marquardt rule (`adaptive`).
#[derive(Config, Debug, PartialEq)]
pub struct DampingConfig {
    /// Initial damping lambda_0.
    #[config(default = 0.1)]
    pub initial: f64,
    /// Target damping lambda_T; `None` keeps the damping constant.
    #[config(default = "None")]
    pub target: Option<f64>,
    /// Decay horizon S: alpha = 2 log10(lambda_0 / lambda_T) / S.
    #[config(default = 90)]
    pub decay_refreshes: usize,
    /// Refreshes before the decay starts.
    #[config(default = 0)]
    pub warmup_refreshes: usize,
    /// Adapt lambda at each inversion with the Levenberg-Marquardt rule on the reduction ratio of
    /// the period since the previous one (see [`levenberg_marquardt`]); `initial` is the starting
    /// value, `target` and the decay are then unused. Needs the training loop to report the loss
    /// of the period's first batch before the next inversion
    /// (`NaturalGradient::observe_loss_change`).
    #[config(default = false)]
    pub adaptive: bool,
    /// Smallest lambda the adaptive rule reaches.
    #[config(default = 1e-6)]
    pub min: f64,
    /// Largest lambda the adaptive rule reaches. A layer without curvature moves by `g / lambda`
    /// (times the learning rate): at 10 that is still a tenth of SGD's step, so the rule can
    /// slow a layer down but not freeze it.
    #[config(default = 10.0)]
    pub max: f64,
    /// Factor omega per step of the adaptive rule (Martens & Grosse's 19/20): over a period of
    /// T steps lambda is multiplied by omega^T after a good period and divided by it after a bad
    /// one.
    #[config(default = 0.95)]
    pub omega: f64,
    /// Lambda is lowered only after a period whose step the model's curvature shaped: its
    /// quadratic term at least this fraction of the linear term's size (see
    /// [`curvature_was_tested`]); 0 lowers it on every good ratio.
    #[config(default = 0.1)]
    pub min_curvature_share: f64,
}

/// Relative size of the predicted change below which the quadratic model is taken to predict
/// nothing (the loss's own f32 resolution).
pub const PREDICTED_EPSILON: f64 = 1e-6;

/// The Levenberg-Marquardt update of the damping (Martens & Grosse 2015, section 6.5) from the
/// actual change of the loss on the refresh batch, `actual = L(theta + delta) - L(theta)`, and
/// the change the local quadratic model `q(delta) = g^T delta + delta^T F delta / 2` predicts,
/// `predicted`. When the model predicts no decrease (`predicted >= -epsilon |loss|`, possible
/// after momentum overshoot) the ratio says nothing and lambda stays. Otherwise, with
/// `rho = actual / predicted`: the model is trusted (`rho > 3/4`): lambda shrinks by `omega`;
/// it is not (`rho < 1/4`, the loss rose, or `rho` is not finite): lambda grows by `1/omega`; in
/// between it stays. The result is clamped to `[min, max]`.
pub fn levenberg_marquardt(
    lambda: f64,
    actual: f64,
    predicted: f64,
    loss: f64,
    omega: f64,
    min: f64,
    max: f64,
) -> f64 {
    let epsilon = PREDICTED_EPSILON * if loss.is_finite() { loss.abs() } else { 1.0 };
    // NaN counts as no decrease.
    if predicted.is_nan() || predicted >= -epsilon {
        return lambda;
    }
    let rho = actual / predicted;
    let next = if !rho.is_finite() || rho < 0.25 {
        lambda / omega
    } else if rho > 0.75 {
        lambda * omega
    } else {
        lambda
    };
    next.clamp(min, max)
}

/// Whether a period's step tested the model's curvature: its quadratic term
/// `delta^T F delta / 2` is at least `min_share` times the size of its linear term `g^T delta`
/// (`predicted` is their sum). A step whose quadratic term is a few percent of its linear term
/// checks the first-order part of the model only: a ratio near 1 then says nothing about the
/// curvature, and lowering lambda on it, period after period, drives lambda to its minimum
/// without evidence. With grafting (the step's length set by SGD's) that is the common case:
/// measured on the U-Net with the Dice loss, the quadratic term was 1-4% of the linear one
/// while the damping fell from 1 to 0.03 and training stalled above SGD's loss; on the MNIST
/// MLP and the synthetic ResNet-20 it was 5-450%. Unknown parts (NaN) count as tested.
pub fn curvature_was_tested(predicted: f64, quadratic: f64, min_share: f64) -> bool {
    if quadratic.is_nan() || predicted.is_nan() {
        return true;
    }
    let linear = predicted - quadratic;
    quadratic >= min_share * linear.abs()
}

impl DampingConfig {
    /// Checks the values, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field,
                    message: format!("expected a positive finite number, got {v}"),
                })
            }
        };
        positive("damping", self.initial)?;
        if self.adaptive {
            positive("damping_min", self.min)?;
            positive("damping_max", self.max)?;
            if !(self.min <= self.max && self.omega > 0.0 && self.omega < 1.0) {
                return Err(ConfigError::Invalid {
                    field: "damping",
                    message: format!(
                        "adaptive damping needs min <= max and 0 < omega < 1, got min {} max {} \
                         omega {}",
                        self.min, self.max, self.omega
                    ),
                });
            }
            if !(self.min_curvature_share >= 0.0 && self.min_curvature_share.is_finite()) {
                return Err(ConfigError::Invalid {
                    field: "min_curvature_share",
                    message: format!(
                        "expected a finite number >= 0, got {}",
                        self.min_curvature_share
                    ),
                });
            }
        }
        if let Some(t) = self.target {
            positive("target_damping", t)?;
            if self.decay_refreshes == 0 {
                return Err(ConfigError::Invalid {
                    field: "damping_decay",
                    message: "must be at least 1 when a target damping is set".into(),
                });
            }
        }
        Ok(())
    }

    /// The damping after `refreshes` refreshes have been done.
    pub fn value_after(&self, refreshes: usize) -> f64 {
        let Some(target) = self.target else {
            return self.initial;
        };
        let alpha =
            (2.0 * (self.initial / target).log10() / self.decay_refreshes as f64).clamp(0.0, 1.0);
        let decays = refreshes.saturating_sub(self.warmup_refreshes);
        let mut lambda = self.initial;
        for _ in 0..decays {
            lambda = (1.0 - alpha) * lambda + alpha * target;
        }
        lambda
    }
}

/// Linear warmup over `warmup_steps`, then the rate is multiplied by `decay` at each milestone.
#[derive(Config, Debug)]
pub struct WarmupMultiStepConfig {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Steps of linear warmup from `base_lr / warmup_steps` to `base_lr`.
    #[config(default = 0)]
    pub warmup_steps: usize,
    /// Steps at which the rate is multiplied by `decay`.
    #[config(default = "Vec::new()")]
    pub milestones: Vec<usize>,
    /// Factor applied at each milestone.
    #[config(default = 0.1)]
    pub decay: f64,
}

impl WarmupMultiStepConfig {
    /// The scheduler, or an error naming the bad field.
    pub fn init(&self) -> Result<WarmupMultiStep, ConfigError> {
        if !(self.base_lr.is_finite() && self.base_lr > 0.0) {
            return Err(ConfigError::Invalid {
                field: "lr",
                message: format!("expected a positive learning rate, got {}", self.base_lr),
            });
        }
        if !(self.decay.is_finite() && self.decay > 0.0) {
            return Err(ConfigError::Invalid {
                field: "lr_decay",
                message: format!("expected a positive factor, got {}", self.decay),
            });
        }
        Ok(WarmupMultiStep {
            config: self.clone(),
            step: 0,
        })
    }
}

/// The learning-rate schedule of HyLo's code, as a Burn `LrScheduler`.
#[derive(Clone, Debug)]
pub struct WarmupMultiStep {
    config: WarmupMultiStepConfig,
    step: usize,
}

impl WarmupMultiStep {
    /// The rate at a given step (0-based).
    pub fn rate_at(&self, step: usize) -> f64 {
        let c = &self.config;
        if step < c.warmup_steps {
            return c.base_lr * (step + 1) as f64 / c.warmup_steps as f64;
        }
        let passed = c.milestones.iter().filter(|&&m| step >= m).count();
        c.base_lr * c.decay.powi(passed as i32)
    }
}

impl LrScheduler for WarmupMultiStep {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> LearningRate {
        let lr = self.rate_at(self.step);
        self.step += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> Self::Record<B> {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: Self::Record<B>) -> Self {
        self.step = record;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damping_decays_towards_target() {
        let d = DampingConfig::new()
            .with_initial(1.5)
            .with_target(Some(0.1))
            .with_decay_refreshes(90)
            .with_warmup_refreshes(2);
        assert_eq!(d.value_after(0), 1.5);
        assert_eq!(d.value_after(2), 1.5);
        let alpha = 2.0 * (15.0f64).log10() / 90.0;
        let one = (1.0 - alpha) * 1.5 + alpha * 0.1;
        assert!((d.value_after(3) - one).abs() < 1e-12);
        let late = d.value_after(2000);
        assert!((late - 0.1).abs() < 1e-6);
        let mut prev = f64::INFINITY;
        for k in 0..200 {
            let v = d.value_after(k);
            assert!(v <= prev);
            prev = v;
        }
    }

    #[test]
    fn levenberg_marquardt_trusts_good_models_and_distrusts_bad_ones() {
        // A predicted decrease of 1 on a loss of 2; actual decreases of 1, 0.8, 0.5, 0.1, a rise.
        let lm = |actual| levenberg_marquardt(1.0, actual, -1.0, 2.0, 0.5, 1e-3, 10.0);
        assert_eq!(lm(-1.0), 0.5); // as predicted: less damping
        assert_eq!(lm(-0.8), 0.5);
        assert_eq!(lm(-0.5), 1.0); // roughly: unchanged
        assert_eq!(lm(-0.1), 2.0); // much worse than predicted: more damping
        assert_eq!(lm(3.0), 2.0); // the loss went up: symmetric, one step
        assert_eq!(lm(f64::NAN), 2.0);
        // Clamped.
        assert_eq!(
            levenberg_marquardt(8.0, 0.0, -1.0, 2.0, 0.5, 1e-3, 10.0),
            10.0
        );
        assert_eq!(
            levenberg_marquardt(1.5e-3, -1.0, -1.0, 2.0, 0.5, 1e-3, 10.0),
            1e-3
        );
    }

    #[test]
    fn levenberg_marquardt_leaves_lambda_alone_when_no_decrease_is_predicted() {
        for predicted in [0.0, 0.3, -1e-8, f64::NAN] {
            for actual in [-1.0, 0.0, 5.0] {
                assert_eq!(
                    levenberg_marquardt(0.7, actual, predicted, 2.0, 0.5, 1e-3, 10.0),
                    0.7,
                    "q = {predicted}, actual {actual}"
                );
            }
        }
        // Just below the threshold the rule acts again.
        assert_eq!(
            levenberg_marquardt(0.7, -1e-3, -1e-3, 2.0, 0.5, 1e-3, 10.0),
            0.35
        );
    }

    #[test]
    fn only_a_step_the_curvature_shaped_tests_the_curvature() {
        // Linear term -1: a quadratic term of 0.02 (2%, the U-Net's) tests nothing at 0.1.
        assert!(!curvature_was_tested(-0.98, 0.02, 0.1));
        assert!(curvature_was_tested(-0.9, 0.1, 0.1));
        assert!(curvature_was_tested(-0.5, 0.5, 0.1));
        // A model that predicts an increase (quadratic term above the linear one) is tested.
        assert!(curvature_was_tested(0.5, 1.5, 0.1));
        // 0 disables the test; unknown parts count as tested.
        assert!(curvature_was_tested(-1.0, 0.0, 0.0));
        assert!(curvature_was_tested(-1.0, f64::NAN, 0.1));
        assert!(DampingConfig::new()
            .with_adaptive(true)
            .with_min_curvature_share(-0.1)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_curvature_share"));
    }

    #[test]
    fn constant_damping_and_validation() {
        let d = DampingConfig::new().with_initial(0.03);
        assert_eq!(d.value_after(1000), 0.03);
        assert!(d.validate().is_ok());
        assert!(DampingConfig::new().with_initial(-1.0).validate().is_err());
        assert!(DampingConfig::new()
            .with_target(Some(0.01))
            .with_decay_refreshes(0)
            .validate()
            .is_err());
    }

    #[test]
    fn warmup_then_milestones() {
        let mut s = WarmupMultiStepConfig::new(1.0)
            .with_warmup_steps(4)
            .with_milestones(vec![6, 8])
            .with_decay(0.5)
            .init()
            .unwrap();
        let rates: Vec<f64> = (0..10).map(|_| s.step()).collect();
        assert_eq!(
            rates,
            vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
        );
        assert!(WarmupMultiStepConfig::new(0.0).init().is_err());
    }
}
