//! One type for every optimizer the binary trains with: Burn's SGD and Adam, and ours.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{Adam, AdamConfig, GradientsParams, Optimizer, Sgd, SgdConfig};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use hylo_optim::neumann::Neumann;
use hylo_optim::{
    CaptureHandle, CurvatureConfig, DampingConfig, HyloConfig, KfacConfig, NaturalGradient,
    NeumannConfig, SngdConfig,
};

use crate::cli::{OptimName, TrainArgs};

/// The recorder of checkpoints: full precision, so a resumed run continues bit for bit.
pub type CheckpointRecorder = BinFileRecorder<FullPrecisionSettings>;

/// Any optimizer of the binary, for a model `M`.
pub enum AnyOptimizer<M: AutodiffModule<B>, B: AutodiffBackend> {
    /// SGD with momentum (dampening 0) and L2 weight decay.
    Sgd(OptimizerAdaptor<Sgd<B::InnerBackend>, M, B>),
    /// Adam with L2 weight decay.
    Adam(OptimizerAdaptor<Adam, M, B>),
    /// The Neumann optimizer.
    Neumann(OptimizerAdaptor<Neumann, M, B>),
    /// SNGD, K-FAC or HyLo.
    Natural(Box<NaturalGradient<B>>),
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> AnyOptimizer<M, B> {
    /// Builds the optimizer of `args`; the natural-gradient ones read curvature from `capture`.
    pub fn build(
        args: &TrainArgs,
        steps_per_epoch: usize,
        capture: &CaptureHandle,
        workers: &crate::workers::Workers,
    ) -> Result<Self, String> {
        let decay =
            (args.weight_decay > 0.0).then(|| WeightDecayConfig::new(args.weight_decay as f32));
        let damping = DampingConfig::new()
            .with_initial(args.damping.initial())
            .with_target(args.target_damping)
            .with_decay_refreshes(args.damping_decay as usize)
            .with_adaptive(args.damping.is_auto());
        let curvature = CurvatureConfig::new()
            .with_momentum(args.momentum)
            .with_weight_decay(args.weight_decay)
            .with_freq(args.freq as usize)
            .with_damping(damping)
            .with_kl_clip(args.kl_clip())
            .with_conv_mode(args.conv_mode()?)
            .with_graft(args.graft()?)
            .with_step_length(args.step_length());
        let err = |e: hylo_optim::error::ConfigError| e.to_string();
        let optim = match args.optim {
            OptimName::Sgd => Self::Sgd(
                SgdConfig::new()
                    .with_momentum((args.momentum > 0.0).then(|| {
                        MomentumConfig::new()
                            .with_momentum(args.momentum)
                            .with_dampening(0.0)
                    }))
                    .with_weight_decay(decay)
                    .init(),
            ),
            OptimName::Adam => Self::Adam(AdamConfig::new().with_weight_decay(decay).init()),
            OptimName::Neumann => Self::Neumann(
                NeumannConfig::new(steps_per_epoch)
                    .with_weight_decay(args.weight_decay)
                    .init()
                    .map_err(err)?,
            ),
            OptimName::Sngd => Self::Natural(Box::new(
                SngdConfig::new()
                    .with_curvature(curvature)
                    .init(capture)
                    .map_err(err)?,
            )),
            OptimName::Kfac => Self::Natural(Box::new(
                KfacConfig::new()
                    .with_inverse_every(args.inverse_every.unwrap_or(args.freq) as usize)
                    .with_method(args.kfac_method.into())
                    .with_curvature(curvature)
                    .init(capture)
                    .map_err(err)?,
            )),
            OptimName::Hylo => Self::Natural(Box::new(
                HyloConfig::new()
                    .with_rho(args.rho)
                    .with_switch(args.switch_policy(steps_per_epoch)?)
                    .with_seed(args.seed)
                    .with_curvature(curvature)
                    .init(capture)
                    .map_err(err)?,
            )),
        };
        Ok(match optim {
            Self::Natural(o) if workers.distributed() => {
                Self::Natural(Box::new(o.with_communicator(workers.comm.clone())))
            }
            other => other,
        })
    }

    /// Bytes the last curvature refresh moved between workers (zero when not distributed).
    pub fn refresh_bytes(&self) -> Option<hylo_optim::comm::CommBytes> {
        match self {
            Self::Natural(o) if o.last_known().refreshed => Some(o.last_known().comm),
            _ => None,
        }
    }

    /// Whether steps with non-finite gradients are skipped (ours) rather than applied (Burn's).
    pub fn skips_non_finite(&self) -> bool {
        matches!(self, Self::Natural(_))
    }

    /// Adaptive damping: how the period that ended at the last step was judged (no device read).
    pub fn last_period(&self) -> Option<hylo_optim::PeriodVerdict> {
        match self {
            Self::Natural(o) => o.last_known().period,
            _ => None,
        }
    }

    /// Adaptive damping: periods rejected in a row up to the last step.
    pub fn consecutive_rejections(&self) -> usize {
        match self {
            Self::Natural(o) => o.consecutive_rejections(),
            _ => 0,
        }
    }

    /// Why the optimizer gave up training (too many rejected periods in a row), if it did.
    pub fn failure(&self) -> Option<&hylo_optim::TrainingError> {
        match self {
            Self::Natural(o) => o.failure(),
            _ => None,
        }
    }

    /// The step-length factor of the natural-gradient optimizers' trust region.
    pub fn step_scale(&self) -> Option<f64> {
        match self {
            Self::Natural(o) => Some(o.step_scale()),
            _ => None,
        }
    }

    /// Adaptive damping: whether the next step starts a period (its batch's loss is measured
    /// again at the period's end).
    pub fn starts_period(&self) -> bool {
        matches!(self, Self::Natural(o) if o.adapts_damping() && o.is_inversion_step(o.steps()))
    }

    /// One update of `model` with learning rate `lr`.
    pub fn step(&mut self, lr: f64, model: M, grads: GradientsParams) -> M {
        match self {
            Self::Sgd(o) => o.step(lr, model, grads),
            Self::Adam(o) => o.step(lr, model, grads),
            Self::Neumann(o) => o.step(lr, model, grads),
            Self::Natural(o) => o.step(lr, model, grads),
        }
    }

    /// Whether the damping adapts (`--damping auto` with a natural-gradient optimizer).
    pub fn adapts_damping(&self) -> bool {
        matches!(self, Self::Natural(o) if o.adapts_damping())
    }

    /// Current damping (natural-gradient optimizers).
    pub fn damping(&self) -> Option<f64> {
        match self {
            Self::Natural(o) => Some(o.damping()),
            _ => None,
        }
    }

    /// HyLo's current mode (`kid`/`kis`); `None` for the other optimizers.
    pub fn mode(&self) -> Option<String> {
        match self {
            Self::Natural(o) => o.mode().map(|m| m.to_string()),
            _ => None,
        }
    }

    /// `(skipped updates, consecutive skipped updates up to the last step)`: NaN or Inf in the
    /// gradients (SNGD, K-FAC, HyLo; Burn's SGD and Adam do not check). One blocking read.
    pub fn skipped_steps(&self) -> (u64, u64) {
        match self {
            Self::Natural(o) => o.skipped_steps(),
            _ => (0, 0),
        }
    }

    /// Saves the optimizer state to `path` (without extension).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let recorder = CheckpointRecorder::new();
        let path = path.to_path_buf();
        let result = match self {
            Self::Sgd(o) => recorder.record(o.to_record(), path.clone()),
            Self::Adam(o) => recorder.record(o.to_record(), path.clone()),
            Self::Neumann(o) => recorder.record(o.to_record(), path.clone()),
            Self::Natural(o) => {
                recorder.record(Optimizer::<M, B>::to_record(o.as_ref()), path.clone())
            }
        };
        result.map_err(|e| format!("{}: cannot save the optimizer state: {e}", path.display()))
    }

    /// Loads the optimizer state saved by [`AnyOptimizer::save`].
    pub fn load(self, path: &Path, device: &B::Device) -> Result<Self, String> {
        let recorder = CheckpointRecorder::new();
        let path = path.to_path_buf();
        let fail = |e: burn::record::RecorderError| {
            format!("{}: cannot load the optimizer state: {e}", path.display())
        };
        Ok(match self {
            Self::Sgd(o) => {
                Self::Sgd(o.load_record(recorder.load(path.clone(), device).map_err(fail)?))
            }
            Self::Adam(o) => {
                Self::Adam(o.load_record(recorder.load(path.clone(), device).map_err(fail)?))
            }
            Self::Neumann(o) => {
                Self::Neumann(o.load_record(recorder.load(path.clone(), device).map_err(fail)?))
            }
            Self::Natural(o) => {
                let record = recorder.load(path.clone(), device).map_err(|e| {
                    format!(
                        "{}: cannot load the optimizer state ({e}); checkpoints of SNGD, K-FAC \
                         and HyLo written by an earlier hylo-optim (before record format {}, \
                         hylo-optim {}) cannot be resumed by this version: start the run again \
                         (checkpoint/model.bin still loads as a Burn record)",
                        path.display(),
                        hylo_optim::optimizer::RECORD_FORMAT,
                        env!("CARGO_PKG_VERSION")
                    )
                })?;
                Self::Natural(Box::new(Optimizer::<M, B>::load_record(*o, record)))
            }
        })
    }
}
