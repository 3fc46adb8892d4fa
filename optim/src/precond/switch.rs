//! HyLo's choice between KID (accurate) and KIS (cheap) at each curvature refresh.

use serde::{Deserialize, Serialize};

/// Which compression HyLo uses at a refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HyloMode {
    /// Kronecker interpolative decomposition.
    Kid,
    /// Kronecker importance sampling.
    Kis,
}

impl core::fmt::Display for HyloMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Kid => "kid",
            Self::Kis => "kis",
        })
    }
}

/// When HyLo uses KID and when KIS.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SwitchPolicy {
    /// The paper's `--adaptive a b c`: KID while epoch < a or b < epoch <= c, else KIS.
    /// The epoch is `step / steps_per_epoch`.
    Epochs {
        /// KID before this epoch.
        a: usize,
        /// KID after this epoch ...
        b: usize,
        /// ... up to and including this one.
        c: usize,
        /// Optimizer steps in one epoch.
        steps_per_epoch: usize,
    },
    /// KID when the total gradient norm changed by more than `threshold` (relative) since the
    /// previous refresh, else KIS; the first refresh uses KID.
    Auto {
        /// Relative change of the gradient norm that counts as a critical phase.
        threshold: f64,
    },
    /// Always KID.
    Kid,
    /// Always KIS.
    Kis,
}

impl SwitchPolicy {
    /// The mode for a refresh at optimizer step `step`, given the gradient norms of this and the
    /// previous refresh.
    pub fn mode(&self, step: usize, grad_norm: f64, previous_norm: Option<f64>) -> HyloMode {
        match self {
            Self::Kid => HyloMode::Kid,
            Self::Kis => HyloMode::Kis,
            Self::Epochs {
                a,
                b,
                c,
                steps_per_epoch,
            } => {
                let epoch = step / (*steps_per_epoch).max(1);
                if epoch < *a || (*b < epoch && epoch <= *c) {
                    HyloMode::Kid
                } else {
                    HyloMode::Kis
                }
            }
            Self::Auto { threshold } => match previous_norm {
                None => HyloMode::Kid,
                Some(prev) => {
                    let change = (grad_norm - prev).abs() / prev.max(f64::MIN_POSITIVE);
                    if !change.is_finite() || change > *threshold {
                        HyloMode::Kid
                    } else {
                        HyloMode::Kis
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_policy_follows_the_paper() {
        let p = SwitchPolicy::Epochs {
            a: 10,
            b: 35,
            c: 40,
            steps_per_epoch: 100,
        };
        let at = |epoch: usize| p.mode(epoch * 100 + 50, 1.0, Some(1.0));
        assert_eq!(at(0), HyloMode::Kid);
        assert_eq!(at(9), HyloMode::Kid);
        assert_eq!(at(10), HyloMode::Kis);
        assert_eq!(at(35), HyloMode::Kis);
        assert_eq!(at(36), HyloMode::Kid);
        assert_eq!(at(40), HyloMode::Kid);
        assert_eq!(at(41), HyloMode::Kis);
        assert_eq!(at(99), HyloMode::Kis);
    }

    #[test]
    fn auto_policy_switches_on_norm_change() {
        let p = SwitchPolicy::Auto { threshold: 0.2 };
        assert_eq!(p.mode(0, 1.0, None), HyloMode::Kid);
        assert_eq!(p.mode(5, 1.1, Some(1.0)), HyloMode::Kis);
        assert_eq!(p.mode(5, 0.7, Some(1.0)), HyloMode::Kid);
        assert_eq!(p.mode(5, 1.5, Some(1.0)), HyloMode::Kid);
        assert_eq!(p.mode(5, 1.0, Some(0.0)), HyloMode::Kid);
    }

    #[test]
    fn fixed_policies() {
        assert_eq!(SwitchPolicy::Kid.mode(1000, 1.0, Some(1.0)), HyloMode::Kid);
        assert_eq!(SwitchPolicy::Kis.mode(0, 1.0, None), HyloMode::Kis);
    }
}
