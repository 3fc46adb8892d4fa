//! A trust region on the step length, kept beside grafting: a factor `tau` in `[min, max]` on
//! the learning rate of every parameter, adapted once per curvature period from the same
//! numbers as adaptive damping (the loss of the period's first batch before and after the
//! period, and the change the quadratic model predicted).
//!
//! With grafting the damping no longer sets how long a step is (a layer's step is SGD's length
//! whatever the damping): raising lambda changes the direction only. `tau` is the step length's
//! own control:
//!
//! - the quadratic model predicts that the period's step raised the loss of its first batch
//!   (`predicted > epsilon`, an overshoot along the step): `tau <- tau * shrink`;
//! - the loss of that batch rose although the model predicted a decrease: `tau <- tau *
//!   rise_shrink` (by default the same cut). Once the loss is at its noise floor a batch's loss
//!   rises over a period by chance in one period out of five or so, and with the factors
//!   0.3 / 1.25 that alone drives `tau` towards its floor late in long runs; a milder
//!   `rise_shrink` (0.5 with `grow` 1.5) keeps it near 1, but measured on every task of the
//!   convergence benchmark it trained some better and the U-Net and MNIST's ResNet-20 worse
//!   (BENCHMARKS.md), so the default keeps one cut;
//! - otherwise the loss came down as a step of this length should: `tau <- min(max, tau *
//!   grow)`, back towards the learning rate the schedule gives.
//!
//! The reduction ratio `rho = actual / predicted` is left to the damping: measured, the models
//! of the curvature each preconditioner holds (the empirical Fisher of the kept rows, `G kron
//! A`) predict the loss change too poorly early in training (predicted increases while the loss
//! fell by half, ratios of 0.03) for a trust region driven by `rho` not to shrink healthy steps
//! (BatchNorm ResNets lost 2-4 points of accuracy that way); the sign of the actual change and
//! of the model's prediction are robust. A rejected period (its loss blew up) always retries
//! with a step `reject_shrink` times shorter. `max` = 1 keeps every step at most SGD's length
//! (with grafting) at the learning rate the schedule gives.

use burn::config::Config;

use crate::error::ConfigError;
use crate::schedule::PREDICTED_EPSILON;

/// Settings of the step-length trust region.
#[derive(Config, Debug, PartialEq)]
pub struct StepLengthConfig {
    /// Adapt the factor from each period's reduction ratio (needs adaptive damping's periods);
    /// off: the learning rate as given.
    #[config(default = true)]
    pub adaptive: bool,
    /// Factor at the start.
    #[config(default = 1.0)]
    pub initial: f64,
    /// Smallest factor. Unnormalised inputs (0-255 pixels) need steps a thousand times shorter
    /// than SGD's at its usual learning rate: at a floor of 0.01 K-FAC's loss climbed tenfold
    /// within two epochs on the MNIST digits, at 0.001 it came down on every seed.
    #[config(default = 0.001)]
    pub min: f64,
    /// Largest factor (1: never longer than the learning rate says).
    #[config(default = 1.0)]
    pub max: f64,
    /// Factor applied after a period whose step the quadratic model says went too far (it
    /// predicts that the step raised the loss).
    #[config(default = 0.3)]
    pub shrink: f64,
    /// Factor applied after a period whose first batch's loss rose although the model predicted
    /// a decrease (set it milder than `shrink` where the loss rises by chance at its noise
    /// floor).
    #[config(default = 0.3)]
    pub rise_shrink: f64,
    /// Factor applied after a period whose loss came down.
    #[config(default = 1.25)]
    pub grow: f64,
    /// Factor applied when a period is rejected.
    #[config(default = 0.1)]
    pub reject_shrink: f64,
}

impl StepLengthConfig {
    /// Checks the values, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ok = self.min > 0.0
            && self.min <= self.initial
            && self.initial <= self.max
            && self.max.is_finite()
            && self.shrink > 0.0
            && self.shrink < 1.0
            && self.rise_shrink > 0.0
            && self.rise_shrink < 1.0
            && self.reject_shrink > 0.0
            && self.reject_shrink < 1.0
            && self.grow >= 1.0
            && self.grow.is_finite();
        if ok {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            field: "step_length",
            message: format!(
                "expected 0 < min <= initial <= max, 0 < shrink, rise_shrink, reject_shrink < 1 \
                 and grow >= 1, got min {} initial {} max {} shrink {} rise_shrink {} \
                 reject_shrink {} grow {}",
                self.min,
                self.initial,
                self.max,
                self.shrink,
                self.rise_shrink,
                self.reject_shrink,
                self.grow
            ),
        })
    }

    /// The factor after a period that changed the loss of its first batch by `actual` where the
    /// quadratic model predicted `predicted`; `loss` is that batch's loss at the start (the
    /// scale of "nothing").
    pub fn adapt(&self, tau: f64, actual: f64, predicted: f64, loss: f64) -> f64 {
        if !self.adaptive {
            return tau;
        }
        let epsilon = PREDICTED_EPSILON * if loss.is_finite() { loss.abs() } else { 1.0 };
        let rose = !actual.is_finite() || actual > epsilon;
        let overshoot = predicted.is_nan() || predicted > epsilon;
        let next = if overshoot {
            tau * self.shrink
        } else if rose {
            tau * self.rise_shrink
        } else {
            tau * self.grow
        };
        next.clamp(self.min, self.max)
    }

    /// The factor after a rejected period.
    pub fn rejected(&self, tau: f64) -> f64 {
        if !self.adaptive {
            return tau;
        }
        (tau * self.reject_shrink).clamp(self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn a_predicted_increase_or_a_rise_shrinks_the_step() {
        let c = StepLengthConfig::new();
        // The model predicts an increase (overshoot), whatever happened: the strong cut.
        assert!(close(c.adapt(1.0, -0.5, 0.2, 2.0), 0.3));
        assert!(close(c.adapt(1.0, 0.5, 0.2, 2.0), 0.3));
        // The loss rose although the model predicted a decrease: the rise's cut.
        assert!(close(c.adapt(1.0, 0.1, -0.2, 2.0), 0.3));
        let mild = StepLengthConfig::new().with_rise_shrink(0.5);
        assert!(close(mild.adapt(1.0, 0.1, -0.2, 2.0), 0.5));
        assert!(close(mild.adapt(1.0, 0.1, 0.2, 2.0), 0.3));
        // Non-finite changes.
        assert!(close(c.adapt(0.8, f64::NAN, -0.2, 2.0), 0.24));
        assert!(close(c.adapt(0.8, -0.1, f64::NAN, 2.0), 0.24));
    }

    #[test]
    fn a_decrease_grows_the_step_back_up_to_the_maximum() {
        let c = StepLengthConfig::new();
        // Whatever the ratio: a poor one (0.1) is the damping's business.
        assert!(close(c.adapt(0.4, -0.02, -0.2, 2.0), 0.5));
        assert!(close(c.adapt(0.4, -0.19, -0.2, 2.0), 0.5));
        assert!(close(c.adapt(0.9, -0.19, -0.2, 2.0), 1.0));
        // Nothing predicted, nothing happened (a zero learning rate): not a bad period.
        assert!(close(c.adapt(0.4, 0.0, 0.0, 2.0), 0.5));
    }

    #[test]
    fn a_mild_rise_cut_keeps_the_step_near_its_maximum_under_chance_rises() {
        // At the loss's noise floor: one period in five sees its batch's loss rise. With the
        // default cut (0.3, growth 1.25) the factor drifts low; with 0.5 / 1.5 it stays near 1.
        let mean = |c: &StepLengthConfig| {
            let mut tau = 1.0;
            let mut sum = 0.0;
            for period in 0..200 {
                let actual = if period % 5 == 4 { 0.01 } else { -0.01 };
                tau = c.adapt(tau, actual, -0.02, 0.05);
                sum += tau;
            }
            sum / 200.0
        };
        assert!(mean(&StepLengthConfig::new()) < 0.2);
        let c = StepLengthConfig::new().with_rise_shrink(0.5).with_grow(1.5);
        assert!(mean(&c) > 0.7, "mean factor {}", mean(&c));
        // Rises in most periods still shorten it to its floor.
        let mut tau = 1.0;
        for period in 0..60 {
            let actual = if period % 3 == 2 { -0.01 } else { 0.01 };
            tau = c.adapt(tau, actual, -0.02, 0.05);
        }
        assert!(tau < 0.05, "{tau}");
    }

    #[test]
    fn the_factor_stays_in_its_range_and_a_rejection_cuts_it() {
        let c = StepLengthConfig::new();
        assert!(close(c.adapt(0.002, 1.0, 1.0, 2.0), 0.001));
        assert!(close(c.rejected(1.0), 0.1));
        assert!(close(c.rejected(0.005), 0.001));
        // Three orders of magnitude below SGD's step: reached after six cuts.
        let tau = (0..6).fold(1.0, |tau, _| c.adapt(tau, 1.0, 1.0, 2.0));
        assert!(close(tau, 0.001), "{tau}");
        let fixed = StepLengthConfig::new().with_adaptive(false);
        assert_eq!(fixed.adapt(0.7, 1.0, 1.0, 2.0), 0.7);
        assert_eq!(fixed.rejected(0.7), 0.7);
    }

    #[test]
    fn invalid_settings_name_the_field() {
        for bad in [
            StepLengthConfig::new().with_min(0.0),
            StepLengthConfig::new().with_initial(2.0),
            StepLengthConfig::new().with_shrink(1.0),
            StepLengthConfig::new().with_rise_shrink(0.0),
            StepLengthConfig::new().with_grow(0.5),
            StepLengthConfig::new().with_reject_shrink(0.0),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains("step_length"), "{err}");
        }
        StepLengthConfig::new().validate().unwrap();
    }
}
