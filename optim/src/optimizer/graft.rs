//! Learning-rate grafting (Shampoo's default): each preconditioned layer's direction is rescaled
//! to the norm of that layer's plain gradient, so that SGD's learning rate and schedule carry
//! over to every natural-gradient method. The preconditioner then chooses the direction and SGD
//! the step size.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// Whose step size the natural-gradient directions take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Graft {
    /// None: the preconditioned direction as it is (the papers' update).
    None,
    /// SGD's: each layer's direction rescaled to the norm of its gradient, `v |g| / |v|`.
    #[default]
    Sgd,
}

impl Graft {
    /// The name used on command lines (`none`, `sgd`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Sgd => "sgd",
        }
    }

    /// `direction` with the step size this grafting gives it, for a layer whose plain gradient
    /// is `gradient` (same shape). A zero direction stays zero.
    pub fn apply<B: Backend>(
        self,
        direction: Tensor<B, 2>,
        gradient: &Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let squared = |t: Tensor<B, 2>| {
            let n = t.shape().num_elements();
            t.powi_scalar(2).reshape([1, n]).sum_dim(1)
        };
        match self.scale(squared(gradient.clone()), squared(direction.clone())) {
            Some(scale) => direction * scale,
            None => direction,
        }
    }

    /// The factor on a direction whose squared norm is `direction_sq`, for a layer whose
    /// gradient's squared norm is `gradient_sq` (any shape, elementwise: one factor per layer);
    /// `None` when the direction keeps its length.
    pub fn scale<B: Backend, const D: usize>(
        self,
        gradient_sq: Tensor<B, D>,
        direction_sq: Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        match self {
            Self::None => None,
            // `sqrt(|g|^2 / (|v|^2 + 1e-30))`: a zero direction stays zero, without a clamp
            // (two more kernels on WGPU); three element-wise operations on each layer's norms.
            Self::Sgd => Some((gradient_sq / (direction_sq + 1e-30)).sqrt()),
        }
    }
}

impl std::str::FromStr for Graft {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::None, Self::Sgd]
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| format!("expected sgd or none, got `{s}`"))
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests read freely.
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn sgd_grafting_keeps_the_direction_and_takes_the_gradients_norm() {
        let device = Default::default();
        let g = Tensor::<Flex, 2>::from_floats([[3.0, 0.0], [0.0, 4.0]], &device); // |g| = 5
        let v = Tensor::<Flex, 2>::from_floats([[0.1, 0.2], [0.2, 0.4]], &device); // |v| = 0.5
        let grafted: Vec<f32> = Graft::Sgd
            .apply(v.clone(), &g)
            .into_data()
            .to_vec()
            .unwrap();
        for (x, y) in grafted.iter().zip([1.0, 2.0, 2.0, 4.0]) {
            assert!((x - y).abs() < 1e-6, "{grafted:?}");
        }
        let same: Vec<f32> = Graft::None.apply(v, &g).into_data().to_vec().unwrap();
        assert_eq!(same, vec![0.1, 0.2, 0.2, 0.4]);
        let zero = Graft::Sgd.apply(Tensor::zeros([2, 2], &device), &g);
        assert_eq!(zero.into_data().to_vec::<f32>().unwrap(), vec![0.0; 4]);
        assert_eq!("sgd".parse::<Graft>(), Ok(Graft::Sgd));
        assert!("adam".parse::<Graft>().is_err());
    }
}
