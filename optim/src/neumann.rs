//! The Neumann optimizer (Krishnan, Xiao and Saurous, "Neumann Optimizer: A Practical
//! Optimization Algorithm for Deep Neural Networks", ICLR 2018, algorithm 2), as a Burn
//! optimizer: one gradient per step, no Hessian-vector products, the mini-batch Hessian inverted
//! implicitly by a Neumann series whose iterate doubles as momentum.
//!
//! Per parameter tensor `w` with gradient `g` at step `t` (1-based), learning rate `eta`:
//!
//! - the moving average starts at the initial weights (`v = w_0`, `m = 0`), then the first
//!   `sgd_warmup_steps` steps are plain SGD (`w <- w - eta g`; the paper's "run vanilla SGD for
//!   a small number of iterations"), which leave `v` where it is;
//! - then, with `s` the step's index after the warm-up (1-based) and `mu = mu(s)`:
//!   - every `reset_every` steps, from `s = 1` on, the Neumann iterate starts afresh:
//!     `m <- -eta g` (line 7 of the algorithm);
//!   - otherwise the cubic and repulsive regularisers enter the direction,
//!     `d = g + (alpha |w - v|^2 - beta_w / |w - v|^2) (w - v) / |w - v|` (left out while
//!     `w = v`), and `m <- mu m - eta d`;
//!   - in both cases `w <- w + mu m - eta d` (`d = g` at a reset) and
//!     `v <- w + gamma (v - w)`.
//!
//! The weights the optimizer holds are the point where the next gradient is taken, one
//! momentum step ahead of the iterate: the paper returns `w - mu m` at the end
//! ([`neumann_output`]).
//!
//! Choices the paper leaves open, written down here: the regularisers' norms are per parameter
//! tensor (the paper's TensorFlow variables), and `beta_w = beta x` the tensor's size; the
//! momentum ramps as `mu = 1 - 1 / (1 + e)` clamped to `[momentum_start, momentum_end]`, `e`
//! the epochs since the warm-up (0.5 after one epoch, 0.9 after nine); the reset period and the
//! warm-up are in steps; L2 weight decay, when set, is added to the gradient.

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{LearningRate, SimpleOptimizer};
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::error::ConfigError;

/// Settings of the Neumann optimizer; the paper's constants by default, so that only the
/// learning rate (given to each step) needs choosing.
#[derive(Config, Debug, PartialEq)]
pub struct NeumannConfig {
    /// Steps per epoch: the unit of the momentum ramp and of the default reset period.
    pub steps_per_epoch: usize,
    /// Cubic regulariser alpha.
    #[config(default = 1e-7)]
    pub alpha: f64,
    /// Repulsive regulariser beta, per element of a tensor (a tensor of `n` values uses
    /// `beta n`).
    #[config(default = 1e-5)]
    pub beta: f64,
    /// Decay gamma of the moving average `v` of the weights.
    #[config(default = 0.99)]
    pub gamma: f64,
    /// Momentum at the start of the ramp.
    #[config(default = 0.5)]
    pub momentum_start: f64,
    /// Momentum at its end.
    #[config(default = 0.9)]
    pub momentum_end: f64,
    /// Steps between restarts of the Neumann series (`None`: ten epochs).
    #[config(default = "None")]
    pub reset_every: Option<usize>,
    /// Plain SGD steps before the Neumann iterations (`None`: one epoch).
    #[config(default = "None")]
    pub sgd_warmup_steps: Option<usize>,
    /// L2 weight decay added to the gradient.
    #[config(default = 0.0)]
    pub weight_decay: f64,
}

impl NeumannConfig {
    /// Checks every field, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.steps_per_epoch == 0 {
            return invalid("steps_per_epoch", "expected at least 1".into());
        }
        for (field, v) in [
            ("alpha", self.alpha),
            ("beta", self.beta),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return invalid(field, format!("expected a finite value >= 0, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.gamma) {
            return invalid(
                "gamma",
                format!("expected 0 <= gamma < 1, got {}", self.gamma),
            );
        }
        if !(0.0 <= self.momentum_start
            && self.momentum_start <= self.momentum_end
            && self.momentum_end < 1.0)
        {
            return invalid(
                "momentum_start",
                format!(
                    "expected 0 <= momentum_start <= momentum_end < 1, got {} and {}",
                    self.momentum_start, self.momentum_end
                ),
            );
        }
        if self.reset_every == Some(0) {
            return invalid("reset_every", "expected at least 1".into());
        }
        Ok(())
    }

    /// The optimizer as Burn's `SimpleOptimizer`.
    pub fn build(&self) -> Result<Neumann, ConfigError> {
        self.validate()?;
        Ok(Neumann {
            config: self.clone(),
        })
    }

    /// The optimizer for a module `M`: usable in a custom loop and in burn-train's `Learner`.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> Result<OptimizerAdaptor<Neumann, M, B>, ConfigError> {
        Ok(OptimizerAdaptor::from(self.build()?))
    }

    /// The reset period in steps.
    pub fn reset_period(&self) -> usize {
        self.reset_every.unwrap_or(10 * self.steps_per_epoch).max(1)
    }

    /// The plain SGD steps at the start.
    pub fn warmup_steps(&self) -> usize {
        self.sgd_warmup_steps.unwrap_or(self.steps_per_epoch)
    }

    /// The momentum `mu` at Neumann step `s` (1-based, counted after the warm-up).
    pub fn momentum_at(&self, s: usize) -> f64 {
        let epochs = s as f64 / self.steps_per_epoch as f64;
        (1.0 - 1.0 / (1.0 + epochs)).clamp(self.momentum_start, self.momentum_end)
    }
}

/// The Neumann optimizer (see the module docs); build it with [`NeumannConfig`].
#[derive(Clone, Debug)]
pub struct Neumann {
    config: NeumannConfig,
}

/// What the Neumann optimizer keeps for one parameter tensor.
#[derive(Record, Clone)]
pub struct NeumannState<B: Backend, const D: usize> {
    /// Steps taken on this tensor.
    pub step: usize,
    /// The Neumann iterate (momentum) `m`.
    pub m: Tensor<B, D>,
    /// The moving average of the weights `v`.
    pub v: Tensor<B, D>,
}

impl<B: Backend> SimpleOptimizer<B> for Neumann {
    type State<const D: usize> = NeumannState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let c = &self.config;
        let mut g = grad;
        if c.weight_decay != 0.0 {
            g = g + tensor.clone() * c.weight_decay;
        }
        let t = state.as_ref().map_or(0, |s| s.step) + 1;
        let warmup = c.warmup_steps();
        if t <= warmup {
            // The moving average stays at the initial weights (line 1 of the algorithm comes
            // before the warm-up): after it, the repulsive term sees the warm-up's progress.
            let v = state.map_or_else(|| tensor.clone(), |s| s.v);
            let w = tensor - g * lr;
            let state = NeumannState {
                step: t,
                m: w.zeros_like(),
                v,
            };
            return (w, Some(state));
        }
        let (m, v) = match state {
            Some(s) => (s.m, s.v),
            None => (tensor.zeros_like(), tensor.clone()),
        };
        let s = t - warmup;
        let mu = c.momentum_at(s);
        let reset = (s - 1).is_multiple_of(c.reset_period());
        let (m, d) = if reset {
            (g.clone() * (-lr), g)
        } else {
            let d = g + regularizer(&tensor, &v, c.alpha, c.beta);
            (m * mu - d.clone() * lr, d)
        };
        let w = tensor + m.clone() * mu - d * lr;
        let v = w.clone() + (v - w.clone()) * c.gamma;
        (w, Some(NeumannState { step: t, m, v }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        NeumannState {
            step: state.step,
            m: state.m.to_device(device),
            v: state.v.to_device(device),
        }
    }
}

/// The gradient of the cubic and repulsive regularisers,
/// `(alpha |u|^2 - beta n / |u|^2) u / |u|` with `u = w - v` and `n` the tensor's size; zero
/// where `u = 0` (computed on the device, no read).
pub fn regularizer<B: Backend, const D: usize>(
    w: &Tensor<B, D>,
    v: &Tensor<B, D>,
    alpha: f64,
    beta: f64,
) -> Tensor<B, D> {
    let n = w.shape().num_elements();
    let u = w.clone() - v.clone();
    let flat = u.clone().reshape([n]);
    let sq = flat.clone().powi_scalar(2).sum_dim(0); // [1]
    let norm = sq.clone().sqrt();
    let zero = norm.clone().equal_elem(0.0);
    let safe_sq = sq.clone().mask_fill(zero.clone(), 1.0);
    let safe_norm = norm.mask_fill(zero.clone(), 1.0);
    let factor = (sq * alpha - safe_sq.recip() * (beta * n as f64)) / safe_norm;
    let factor = factor.mask_fill(zero, 0.0);
    (flat * factor).reshape(w.shape())
}

/// The weights the paper returns after training, `w - mu m`, for a tensor `w` whose state is
/// `state` (the optimizer holds the point one momentum step ahead); `w` itself during the
/// SGD warm-up.
pub fn neumann_output<B: Backend, const D: usize>(
    config: &NeumannConfig,
    w: Tensor<B, D>,
    state: &NeumannState<B, D>,
) -> Tensor<B, D> {
    let warmup = config.warmup_steps();
    if state.step <= warmup {
        return w;
    }
    w - state.m.clone() * config.momentum_at(state.step - warmup)
}
