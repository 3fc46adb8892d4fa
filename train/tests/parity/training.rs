//! Whole training steps side by side: every optimizer setting, NaN batches, records that cross
//! backends.

use burn::module::{Module, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use hylo_optim::capture::CaptureHandle;
use hylo_optim::{
    ConvMode, CurvatureConfig, DampingConfig, Graft, HyloConfig, KfacConfig, KfacMethod,
    NaturalGradient, SngdConfig, StepReport, SwitchPolicy,
};

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sgd,
    SngdDefaults,
    KfacDefaults,
    HyloDefaults,
    SngdExact,
    SngdSpatialMean,
    SngdKlClip,
    Kfac,
    KfacInverse,
    KfacInverseEvery,
    Kid,
    Kis,
    /// The Neumann optimizer (Burn's `OptimizerAdaptor`), past its SGD warm-up.
    Neumann,
}

/// Every optimizer setting the suite runs.
pub const KINDS: [Kind; 13] = [
    Kind::Sgd,
    Kind::SngdDefaults,
    Kind::KfacDefaults,
    Kind::HyloDefaults,
    Kind::SngdExact,
    Kind::SngdSpatialMean,
    Kind::SngdKlClip,
    Kind::Kfac,
    Kind::KfacInverse,
    Kind::KfacInverseEvery,
    Kind::Kid,
    Kind::Kis,
    Kind::Neumann,
];

const FREQ: usize = 2;

/// The papers' settings: a fixed damping, the preconditioner's own step.
fn curvature(mode: ConvMode) -> CurvatureConfig {
    CurvatureConfig::new()
        .with_freq(FREQ)
        .with_weight_decay(1e-3)
        .with_conv_mode(mode)
        .with_graft(Graft::None)
        .with_damping(DampingConfig::new().with_initial(0.5))
}

/// The defaults (grafting, gradient-scale rows, adaptive damping) at this suite's period.
fn defaults() -> CurvatureConfig {
    let config = CurvatureConfig::new()
        .with_freq(FREQ)
        .with_weight_decay(1e-3);
    // The shipped defaults but for the damping's curvature-share gate: over this test's few
    // grafted steps it would hold lambda at its start, and the rule's decisions on both
    // backends are what is compared here.
    let damping = config.damping.clone().with_min_curvature_share(0.0);
    config.with_damping(damping)
}

fn natural<B: AutodiffBackend>(kind: Kind, capture: &CaptureHandle) -> Option<NaturalGradient<B>> {
    let hylo = |switch| {
        HyloConfig::new()
            .with_curvature(curvature(ConvMode::SpatialMean))
            .with_rho(0.5)
            .with_switch(switch)
            .init(capture)
    };
    let kfac = |curvature, method, every| {
        KfacConfig::new()
            .with_curvature(curvature)
            .with_method(method)
            .with_inverse_every(every)
            .init(capture)
    };
    Some(
        match kind {
            Kind::Sgd | Kind::Neumann => return None,
            Kind::SngdDefaults => SngdConfig::new().with_curvature(defaults()).init(capture),
            Kind::KfacDefaults => kfac(defaults(), KfacMethod::Eigen, FREQ),
            Kind::HyloDefaults => HyloConfig::new()
                .with_curvature(defaults())
                .with_rho(0.5)
                .init(capture),
            Kind::SngdExact => SngdConfig::new()
                .with_curvature(curvature(ConvMode::Exact))
                .init(capture),
            Kind::SngdSpatialMean => SngdConfig::new()
                .with_curvature(curvature(ConvMode::SpatialMean))
                .init(capture),
            Kind::SngdKlClip => SngdConfig::new()
                .with_curvature(curvature(ConvMode::GradientScale).with_kl_clip(Some(1e-4)))
                .init(capture),
            Kind::Kfac => kfac(curvature(ConvMode::SpatialMean), KfacMethod::Eigen, FREQ),
            Kind::KfacInverse => kfac(curvature(ConvMode::SpatialMean), KfacMethod::Inverse, FREQ),
            Kind::KfacInverseEvery => kfac(
                curvature(ConvMode::SpatialMean),
                KfacMethod::Eigen,
                2 * FREQ,
            ),
            Kind::Kid => hylo(SwitchPolicy::Kid),
            Kind::Kis => hylo(SwitchPolicy::Kis),
        }
        .unwrap(),
    )
}

/// One backend's side of a run: model, optimizer and capture handle.
struct Trainer<B: AutodiffBackend> {
    model: ParityNet<B>,
    natural: Option<NaturalGradient<B>>,
    sgd: burn::optim::adaptor::OptimizerAdaptor<burn::optim::Sgd<B::InnerBackend>, ParityNet<B>, B>,
    neumann: Option<
        burn::optim::adaptor::OptimizerAdaptor<hylo_optim::neumann::Neumann, ParityNet<B>, B>,
    >,
    capture: CaptureHandle,
    device: B::Device,
    /// The batch of the last step that started a curvature period (adaptive damping keeps it in
    /// the capture handle until the period ends).
    period_batch: usize,
}

impl<B: AutodiffBackend> Trainer<B> {
    fn new(kind: Kind, bytes: &[u8], device: B::Device) -> Self {
        let capture = CaptureHandle::new();
        let natural = natural::<B>(kind, &capture);
        Self {
            model: load(bytes, &capture, &device),
            natural,
            sgd: SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
                .init(),
            // Four SGD steps (an "epoch" of 4), then the Neumann iterations.
            neumann: (kind == Kind::Neumann).then(|| {
                hylo_optim::NeumannConfig::new(4)
                    .with_weight_decay(1e-3)
                    .init()
                    .unwrap()
            }),
            capture,
            device,
            period_batch: 0,
        }
    }

    /// One step on batch `index` (with a NaN in it when `poison`); returns the report.
    fn step(&mut self, index: usize, poison: bool) -> Option<StepReport> {
        let (mut x, y) = batch::<B>(index, &self.device);
        if poison {
            x = x.slice_assign(
                [0..1, 0..1, 0..1, 0..1],
                Tensor::from_data(TensorData::new(vec![f32::NAN], [1, 1, 1, 1]), &self.device),
            );
        }
        let train_loss = |m: &ParityNet<B>, (x, y): &(Tensor<B, 4>, Tensor<B, 1, Int>)| {
            let logits = m.forward(x.clone());
            CrossEntropyLossConfig::new()
                .init(&logits.device())
                .forward(logits, y.clone())
        };
        // As hylo-train: the step's forward pass updates the BatchNorm statistics; the period's
        // re-evaluation leaves them alone.
        let loss_of = |m: &ParityNet<B>, batch: &(Tensor<B, 4>, Tensor<B, 1, Int>)| {
            hylo_models::batch_norm::with_frozen_statistics(|| train_loss(m, batch))
        };
        let batch = (x, y);
        if let Some(o) = &self.natural {
            if o.is_inversion_step(o.steps()) {
                self.period_batch = index;
            }
        }
        let loss = train_loss(&self.model, &batch);
        // Adaptive damping's bookkeeping too (the defaults use it).
        let grads: GradientsParams =
            self.capture
                .gradients_with_loss(loss, &self.model, &batch, loss_of);
        let model = self.model.clone();
        match (&mut self.natural, &mut self.neumann) {
            (Some(o), _) => {
                self.model = o.step(0.05, model, grads);
                Some(o.last_report().clone())
            }
            (None, Some(neumann)) => {
                self.model = neumann.step(0.05, model, grads);
                None
            }
            (None, None) => {
                self.model = self.sgd.step(0.05, model, grads);
                None
            }
        }
    }

    fn layers(&self) -> Vec<ParamId> {
        self.natural
            .as_ref()
            .map(|o| o.layers().map(|l| l.meta.weight_id).collect())
            .unwrap_or_default()
    }
}

fn same_report(kind: Kind, step: usize, cpu: &Option<StepReport>, gpu: &Option<StepReport>) {
    let (Some(c), Some(g)) = (cpu, gpu) else {
        assert_eq!(cpu.is_none(), gpu.is_none());
        return;
    };
    // Which parameters and layers a NaN reaches depends on each backend's NaN semantics (ReLU's,
    // for one): on a skipped step only whether there were any is compared.
    let fallbacks = |r: &StepReport| (!r.skipped).then(|| r.fallbacks.clone());
    assert_eq!(
        (
            c.step,
            c.refreshed,
            c.skipped,
            c.mode,
            fallbacks(c),
            c.non_finite.is_empty()
        ),
        (
            g.step,
            g.refreshed,
            g.skipped,
            g.mode,
            fallbacks(g),
            g.non_finite.is_empty()
        ),
        "{kind:?} step {step}: reports differ ({:?} / {:?})",
        c.non_finite,
        g.non_finite
    );
    assert!(
        (c.damping - g.damping).abs() <= 1e-9 * c.damping.abs(),
        "{kind:?} step {step}: damping {} on the CPU, {} on the GPU",
        c.damping,
        g.damping
    );
    assert_eq!(
        c.period.is_some(),
        g.period.is_some(),
        "{kind:?} step {step}"
    );
}

pub fn train_side_by_side<G: AutodiffBackend>(device: G::Device) {
    let bytes = initial_bytes();
    for kind in KINDS {
        let mut cpu = Trainer::<Cpu>::new(kind, &bytes, Default::default());
        let mut gpu = Trainer::<G>::new(kind, &bytes, device.clone());
        let steps = 4 * FREQ + 1;
        let mut dampings = Vec::new();
        for step in 0..steps {
            let (cpu_before, gpu_before) = (tensors(&cpu.model), tensors(&gpu.model));
            let (c, g) = (cpu.step(step, false), gpu.step(step, false));
            same_report(kind, step, &c, &g);
            let cpu_update = updates(&cpu_before, &tensors(&cpu.model));
            // The BatchNorm statistics (the last four tensors) moved, so comparing them below
            // compares something.
            for (k, u) in cpu_update[cpu_update.len() - 4..].iter().enumerate() {
                assert!(
                    u.iter().any(|v| *v != 0.0),
                    "{kind:?} step {step}: BatchNorm statistic {k} did not move on the CPU"
                );
            }
            same_updates(
                kind,
                step,
                &cpu_update,
                &updates(&gpu_before, &tensors(&gpu.model)),
            );
            if let Some(report) = &c {
                assert!(report.fallbacks.is_empty(), "{kind:?}: {report:?}");
                if step % FREQ == 0 {
                    assert!(report.refreshed, "{kind:?} step {step}");
                }
                dampings.push(report.damping);
            }
        }
        // The defaults adapt their damping: the reports compared above are not constants.
        if matches!(
            kind,
            Kind::SngdDefaults | Kind::KfacDefaults | Kind::HyloDefaults
        ) {
            assert!(
                dampings.iter().any(|d| *d != dampings[0]),
                "{kind:?}: {dampings:?}"
            );
        }
        // Every preconditioned layer was captured, the plain convolution was not.
        if !matches!(kind, Kind::Sgd | Kind::Neumann) {
            let expected = [
                cpu.model.conv1.inner.weight.id,
                cpu.model.conv2.inner.weight.id,
                cpu.model.head.inner.weight.id,
            ];
            for layers in [cpu.layers(), gpu.layers()] {
                assert_eq!(layers.len(), 3, "{kind:?}");
                assert!(expected.iter().all(|id| layers.contains(id)), "{kind:?}");
                assert!(!layers.contains(&cpu.model.plain.weight.id), "{kind:?}");
            }
        }
        eprintln!("{kind:?}: {steps} steps agree");
    }
}

/// The kinds with curvature (SGD and the Neumann optimizer have none).
fn natural_kinds() -> impl Iterator<Item = Kind> {
    KINDS
        .into_iter()
        .filter(|k| !matches!(k, Kind::Sgd | Kind::Neumann))
}

/// A CPU and a device trainer of `kind` from the same initial model, after `steps` clean steps.
fn after_clean_steps<G: AutodiffBackend>(
    kind: Kind,
    device: &G::Device,
    steps: usize,
) -> (Trainer<Cpu>, Trainer<G>) {
    let bytes = initial_bytes();
    let mut cpu = Trainer::<Cpu>::new(kind, &bytes, Default::default());
    let mut gpu = Trainer::<G>::new(kind, &bytes, device.clone());
    for step in 0..steps {
        cpu.step(step, false);
        gpu.step(step, false);
    }
    (cpu, gpu)
}

pub fn nan_batch_is_skipped<G: AutodiffBackend>(device: G::Device) {
    for kind in natural_kinds() {
        let (mut cpu, mut gpu) = after_clean_steps::<G>(kind, &device, 3);
        // Step 3 is a plain step, step 4 a refresh step: a NaN pixel in both. Parameters and
        // BatchNorm statistics stay as they were.
        for step in [3, 4] {
            let (before_cpu, before_gpu) = (state(&cpu.model), state(&gpu.model));
            let (c, g) = (cpu.step(step, true), gpu.step(step, true));
            same_report(kind, step, &c, &g);
            assert!(g.unwrap().skipped, "{kind:?} step {step}");
            for (side, now, before) in [
                ("cpu", state(&cpu.model), before_cpu),
                ("gpu", state(&gpu.model), before_gpu),
            ] {
                let moved: Vec<usize> = (0..now.len()).filter(|&i| now[i] != before[i]).collect();
                assert!(
                    moved.is_empty(),
                    "{kind:?} step {step}: {side} moved {} of {} values, first {:?}",
                    moved.len(),
                    now.len(),
                    &moved[..moved.len().min(5)]
                );
            }
        }
        assert_eq!(
            cpu.natural.as_ref().unwrap().skipped_steps(),
            (2, 2),
            "{kind:?}"
        );
        assert_eq!(
            gpu.natural.as_ref().unwrap().skipped_steps(),
            (2, 2),
            "{kind:?}"
        );
        // Training goes on alike.
        let (cpu_before, gpu_before) = (tensors(&cpu.model), tensors(&gpu.model));
        let (c, g) = (cpu.step(5, false), gpu.step(5, false));
        same_report(kind, 5, &c, &g);
        assert!(!g.unwrap().skipped);
        same_updates(
            kind,
            5,
            &updates(&cpu_before, &tensors(&cpu.model)),
            &updates(&gpu_before, &tensors(&gpu.model)),
        );
        assert!(state(&gpu.model).iter().all(|v| v.is_finite()));
    }
}

/// Optimizer state written on one backend loads on the other and training continues alike.
pub fn records_cross_backends<G: AutodiffBackend>(device: G::Device) {
    for kind in natural_kinds() {
        let (mut cpu, mut gpu) = after_clean_steps::<G>(kind, &device, 3);
        // Each side continues from the other's model and optimizer records.
        let cpu_from_gpu = swapped::<G, Cpu>(&gpu, kind, Default::default());
        let gpu_from_cpu = swapped::<Cpu, G>(&cpu, kind, device.clone());
        let (mut cpu_from_gpu, mut gpu_from_cpu) = (cpu_from_gpu, gpu_from_cpu);
        // Steps 3 (plain) and 4 (refresh) on all four: the same reports and updates.
        for step in [3, 4] {
            let before = [
                tensors(&cpu.model),
                tensors(&gpu.model),
                tensors(&cpu_from_gpu.model),
                tensors(&gpu_from_cpu.model),
            ];
            let reports = [
                cpu.step(step, false),
                gpu.step(step, false),
                cpu_from_gpu.step(step, false),
                gpu_from_cpu.step(step, false),
            ];
            for r in &reports[1..] {
                same_report(kind, step, &reports[0], r);
            }
            let after = [
                tensors(&cpu.model),
                tensors(&gpu.model),
                tensors(&cpu_from_gpu.model),
                tensors(&gpu_from_cpu.model),
            ];
            let reference = updates(&before[0], &after[0]);
            for k in 1..4 {
                same_updates(kind, step, &reference, &updates(&before[k], &after[k]));
            }
        }
    }
}

/// A trainer on backend `T` holding `from`'s model and optimizer state, through their records.
fn swapped<F: AutodiffBackend, T: AutodiffBackend>(
    from: &Trainer<F>,
    kind: Kind,
    device: T::Device,
) -> Trainer<T> {
    let model = recorder()
        .record(from.model.clone().into_record(), ())
        .unwrap();
    let optim = Optimizer::<ParityNet<F>, F>::to_record(from.natural.as_ref().unwrap());
    let optim = recorder().record(optim, ()).unwrap();
    let mut to = Trainer::<T>::new(kind, &model, device.clone());
    // The open curvature period's first batch lives in the capture handle, not the record: a
    // training loop gives it back after a resume (as hylo-train does).
    to.capture
        .restore_period_batch(batch::<T>(from.period_batch, &device));
    to.period_batch = from.period_batch;
    let fresh = to.natural.take().unwrap();
    to.natural = Some(Optimizer::<ParityNet<T>, T>::load_record(
        fresh,
        recorder().load(optim, &device).unwrap(),
    ));
    to
}
