//! The GPU backends train as the CPU does. Built with a GPU backend feature:
//! `cargo test -p hylo-train --features wgpu --test backend_parity` (WGPU: a real GPU, or Mesa's
//! lavapipe on the CPU) or `--features cuda`. Without a usable device the tests say so and pass,
//! unless `CI` is set: then they fail, so CI cannot silently skip them.
//!
//! One model (convolutions with BatchNorm, a stride that does not divide the height, padding, a
//! Linear head and a convolution that is not preconditioned) is loaded from one record into
//! `Autodiff<Flex>` and the GPU backend and trained side by side on identical batches with every
//! optimizer: SGD; SNGD, K-FAC and HyLo with their defaults (grafting, adaptive damping, which the
//! loop feeds through `CaptureHandle::gradients_with_loss`); and the papers' settings: SNGD
//! (Exact and SpatialMean rows, a KL clip), K-FAC (eigen and inverse methods, inversions less
//! often than factor updates), HyLo-KID and HyLo-KIS. After every step each tensor's update
//! (parameters and BatchNorm statistics) agrees with the CPU's relative to that update, and the
//! step reports (the damping included) agree; a NaN batch is skipped on both; optimizer records
//! cross backends. The preconditioners alone are compared on single layers, ResNet-50 stage-4
//! shapes included, each side decomposing its own factors, and the data loader's batches are
//! checked on the device.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::PaddingConfig2d;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use hylo_datasets::{
    loader, EpochOrder, Normalization, SampleBatcher, SampleSource, SyntheticClassification,
};
use hylo_models::{BatchNorm2d, BatchNorm2dConfig};
use hylo_optim::capture::{
    CaptureHandle, CapturedConv2d, CapturedInput, CapturedLinear, LayerCapture, LayerGeometry,
};
use hylo_optim::factors::{kfac_factors, per_sample_rows};
use hylo_optim::precond::{kid, kis, sngd, KfacState};
use hylo_optim::{
    ConvMode, CurvatureConfig, DampingConfig, Graft, HyloConfig, KfacConfig, KfacMethod,
    NaturalGradient, SngdConfig, StepReport, SwitchPolicy,
};

type Cpu = Autodiff<Flex>;

/// Deterministic values in [-1, 1).
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor<B: Backend, const D: usize>(
    seed: u64,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    let len = shape.iter().product();
    Tensor::from_data(TensorData::new(values(seed, len), shape), device)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// ||a - b|| / ||b||.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Side of the input images: the stride-2 convolution does not divide it.
const SIDE: usize = 11;
const CLASSES: usize = 5;
const BATCH: usize = 16;

/// conv 3x3 (pad 1) -> BN -> ReLU -> conv 3x3 stride 2 (pad 1) -> BN -> ReLU -> conv 1x1 (plain,
/// not preconditioned) -> ReLU -> Linear.
#[derive(Module, Debug)]
struct ParityNet<B: Backend> {
    conv1: CapturedConv2d<B>,
    bn1: BatchNorm2d<B>,
    conv2: CapturedConv2d<B>,
    bn2: BatchNorm2d<B>,
    plain: Conv2d<B>,
    head: CapturedLinear<B>,
}

impl<B: Backend> ParityNet<B> {
    fn new(capture: &CaptureHandle, device: &B::Device) -> Self {
        let conv = |c: [usize; 2], stride: usize, bias: bool| {
            Conv2dConfig::new(c, [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(bias)
        };
        let out = (SIDE + 2 - 3) / 2 + 1;
        Self {
            conv1: CapturedConv2d::from_config(&conv([3, 6], 1, false), capture, device).unwrap(),
            bn1: BatchNorm2dConfig::new(6).init(device),
            conv2: CapturedConv2d::from_config(&conv([6, 8], 2, true), capture, device).unwrap(),
            bn2: BatchNorm2dConfig::new(8).init(device),
            plain: Conv2dConfig::new([8, 8], [1, 1]).init(device),
            head: CapturedLinear::from_config(
                &burn::nn::LinearConfig::new(8 * out * out, CLASSES),
                capture,
                device,
            ),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.bn1.forward(self.conv1.forward(x)));
        let h = relu(self.bn2.forward(self.conv2.forward(h)));
        let h = relu(self.plain.forward(h));
        let [n, c, hh, ww] = h.dims();
        self.head.forward(h.reshape([n, c * hh * ww]))
    }
}

fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::default()
}

/// The same initial weights as bytes (drawn once, on the CPU).
fn initial_bytes() -> Vec<u8> {
    let device = Default::default();
    Flex::seed(&device, 3);
    let model = ParityNet::<Flex>::new(&CaptureHandle::new(), &device);
    recorder().record(model.into_record(), ()).unwrap()
}

fn load<B: Backend>(bytes: &[u8], capture: &CaptureHandle, device: &B::Device) -> ParityNet<B> {
    let record = recorder().load(bytes.to_vec(), device).unwrap();
    ParityNet::new(capture, device).load_record(record)
}

/// Every float of the model's record, tensor by tensor (parameters in visiting order, then the
/// BatchNorm running statistics).
fn tensors<B: Backend>(model: &ParityNet<B>) -> Vec<Vec<f32>> {
    struct Each(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor<Flex> for Each {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Flex, D>>) {
            self.0.push(host(param.val()));
        }
    }
    let bytes = recorder().record(model.clone().into_record(), ()).unwrap();
    let cpu: ParityNet<Flex> = load(&bytes, &CaptureHandle::new(), &Default::default());
    let mut each = Each(Vec::new());
    cpu.visit(&mut each);
    let mut out = each.0;
    for bn in [&cpu.bn1, &cpu.bn2] {
        out.push(host(bn.running_mean.value()));
        out.push(host(bn.running_var.value()));
    }
    out
}

/// Every float of the model's record, in one vector.
fn state<B: Backend>(model: &ParityNet<B>) -> Vec<f32> {
    tensors(model).concat()
}

/// Each tensor's update between `before` and `after`.
fn updates(before: &[Vec<f32>], after: &[Vec<f32>]) -> Vec<Vec<f32>> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.iter().zip(b).map(|(a, b)| a - b).collect())
        .collect()
}

/// Relative tolerance of each tensor's update in a step (f32 with different summation orders,
/// amplified by the damped inverses).
const UPDATE_TOLERANCE: f64 = 5e-3;

/// Root-mean-square difference per value below which two updates are rounding noise: a
/// parameter whose gradient is zero up to rounding (a BatchNorm shift before a bias-free path
/// moves by 1e-9 on one side and not at all on the other); any real update here is over 1e-5.
const UPDATE_NOISE: f64 = 1e-7;

/// Every tensor's update on the GPU against the CPU's, relative to the CPU's update.
fn same_updates(kind: Kind, step: usize, cpu: &[Vec<f32>], gpu: &[Vec<f32>]) {
    assert_eq!(cpu.len(), gpu.len());
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        let diff = c
            .iter()
            .zip(g)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if diff <= UPDATE_NOISE * (c.len() as f64).sqrt() {
            continue;
        }
        let err = rel(g, c);
        assert!(
            err < UPDATE_TOLERANCE,
            "{kind:?} step {step}: tensor {i}'s update differs by {err:e} of its size \
             (CPU {:?}, GPU {:?})",
            &c[..c.len().min(4)],
            &g[..g.len().min(4)]
        );
    }
}

fn batch<B: Backend>(step: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let x = tensor(100 + step as u64, [BATCH, 3, SIDE, SIDE], device);
    let labels: Vec<i64> = (0..BATCH)
        .map(|i| ((i * 7 + step) % CLASSES) as i64)
        .collect();
    (
        x,
        Tensor::from_data(TensorData::new(labels, [BATCH]), device),
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
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
}

/// Every optimizer setting the suite runs.
const KINDS: [Kind; 12] = [
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
    CurvatureConfig::new()
        .with_freq(FREQ)
        .with_weight_decay(1e-3)
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
            Kind::Sgd => return None,
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
        let loss_of = |m: &ParityNet<B>, (x, y): &(Tensor<B, 4>, Tensor<B, 1, Int>)| {
            hylo_models::batch_norm::with_frozen_statistics(|| {
                let logits = m.forward(x.clone());
                CrossEntropyLossConfig::new()
                    .init(&logits.device())
                    .forward(logits, y.clone())
            })
        };
        let batch = (x, y);
        if let Some(o) = &self.natural {
            if o.is_inversion_step(o.steps()) {
                self.period_batch = index;
            }
        }
        let loss = loss_of(&self.model, &batch);
        // Adaptive damping's bookkeeping too (the defaults use it).
        let grads: GradientsParams =
            self.capture
                .gradients_with_loss(loss, &self.model, &batch, loss_of);
        let model = self.model.clone();
        match &mut self.natural {
            Some(o) => {
                self.model = o.step(0.05, model, grads);
                Some(o.last_report().clone())
            }
            None => {
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

fn train_side_by_side<G: AutodiffBackend>(device: G::Device) {
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
            same_updates(
                kind,
                step,
                &updates(&cpu_before, &tensors(&cpu.model)),
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
        if kind != Kind::Sgd {
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

fn nan_batch_is_skipped<G: AutodiffBackend>(device: G::Device) {
    let bytes = initial_bytes();
    for kind in KINDS.into_iter().filter(|k| *k != Kind::Sgd) {
        let mut cpu = Trainer::<Cpu>::new(kind, &bytes, Default::default());
        let mut gpu = Trainer::<G>::new(kind, &bytes, device.clone());
        for step in 0..3 {
            cpu.step(step, false);
            gpu.step(step, false);
        }
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
fn records_cross_backends<G: AutodiffBackend>(device: G::Device) {
    let bytes = initial_bytes();
    for kind in KINDS.into_iter().filter(|k| *k != Kind::Sgd) {
        let mut cpu = Trainer::<Cpu>::new(kind, &bytes, Default::default());
        let mut gpu = Trainer::<G>::new(kind, &bytes, device.clone());
        for step in 0..3 {
            cpu.step(step, false);
            gpu.step(step, false);
        }
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

/// Channels `[in, out]`, input side `[h, w]` and stride of a 3x3 convolution with padding 1.
type ConvShape = ([usize; 2], [usize; 2], usize);

fn layer_capture<B: Backend>(
    conv: Option<ConvShape>,
    n: usize,
    device: &B::Device,
) -> LayerCapture<B> {
    match conv {
        // (channels, side, stride) of a 3x3 convolution with padding 1.
        Some(([c_in, c_out], [h, w], stride)) => {
            let (oh, ow) = ((h + 2 - 3) / stride + 1, (w + 2 - 3) / stride + 1);
            LayerCapture {
                weight_id: ParamId::new(),
                bias_id: None,
                geometry: LayerGeometry::Conv2d {
                    channels_in: c_in,
                    channels_out: c_out,
                    kernel: [3, 3],
                    stride: [stride, stride],
                    dilation: [1, 1],
                    padding: [1, 1, 1, 1],
                    bias: true,
                },
                input: CapturedInput::Conv(tensor(1, [n, c_in, h, w], device)),
                output_grad: tensor::<B, 3>(2, [n, c_out, oh * ow], device)
                    .mul_scalar(1.0 / n as f64),
            }
        }
        None => LayerCapture {
            weight_id: ParamId::new(),
            bias_id: None,
            geometry: LayerGeometry::Linear {
                d_in: 7,
                d_out: 4,
                bias: true,
            },
            input: CapturedInput::Linear(tensor(3, [n, 1, 7], device)),
            output_grad: tensor::<B, 3>(4, [n, 1, 4], device).mul_scalar(1.0 / n as f64),
        },
    }
}

/// SNGD, KID, KIS and K-FAC (eigen and inverse methods) directions of one layer; each backend
/// decomposes its own factors, where the optimizer does it (on the host, from the device's
/// factors).
fn directions<B: Backend>(
    capture: &LayerCapture<B>,
    mode: ConvMode,
) -> Vec<(&'static str, Vec<f32>)> {
    let device = match &capture.input {
        CapturedInput::Conv(x) => x.device(),
        CapturedInput::Linear(x) => x.device(),
    };
    let (d_out, d_in) = (capture.geometry.d_out(), capture.geometry.d_in_with_bias());
    let grad = tensor::<B, 2>(5, [d_out, d_in], &device);
    let damping = 0.1;
    let rows = || per_sample_rows(capture, mode);
    let r = (rows().len() / 3).max(1);
    let mut out = vec![
        (
            "sngd",
            host(sngd::refresh(rows(), damping).unwrap().apply(grad.clone())),
        ),
        (
            "kid",
            host(
                kid::refresh(rows(), damping, r)
                    .unwrap()
                    .apply(grad.clone()),
            ),
        ),
        (
            "kis",
            host(
                kis::refresh(rows(), damping, 0.5, 3)
                    .unwrap()
                    .apply(grad.clone()),
            ),
        ),
    ];
    // KIS samples its rows from their squared norms, read to the host.
    let weights = hylo_optim::host::read_f64(rows().squared_norms());
    let kept = kis::sample_indices(&weights, kis::kept_rows(0.5, weights.len()), 3);
    out.push(("kis rows", kept.iter().map(|&i| i as f32).collect()));
    out.push(("kis weights", weights.iter().map(|&w| w as f32).collect()));
    // K-FAC's factor of a 4608-wide patch is a 4609 x 4609 matrix: decomposing it with both
    // methods on each side and applying it on lavapipe takes many minutes, so the widest
    // layers check the low-rank methods only (K-FAC is checked on the 1152-wide case).
    if d_in > 2048 {
        return out;
    }
    let (a, g) = kfac_factors(capture);
    out.push(("kfac A", host(a.clone())));
    out.push(("kfac G", host(g.clone())));
    let state = KfacState::new(a, g);
    for (name, method) in [
        ("kfac eigen", KfacMethod::Eigen),
        ("kfac inverse", KfacMethod::Inverse),
    ] {
        let mut s = state.clone();
        s.invert(method, damping).unwrap();
        out.push((name, host(s.apply(grad.clone(), damping))));
    }
    out
}

fn preconditioners_match<G: Backend>(device: G::Device) {
    let cases: Vec<(&str, Option<ConvShape>, usize, ConvMode)> = vec![
        ("linear", None, 12, ConvMode::SpatialMean),
        (
            "conv s2",
            Some(([3, 5], [8, 8], 2)),
            12,
            ConvMode::SpatialMean,
        ),
        (
            "conv s2 exact",
            Some(([3, 5], [8, 8], 2)),
            12,
            ConvMode::Exact,
        ),
        // ResNet-32 stage 3 at twice the width: 128->128 at 8x8 (1152-wide patches).
        (
            "conv 128 exact",
            Some(([128, 128], [8, 8], 1)),
            8,
            ConvMode::Exact,
        ),
        // ResNet-50 stage 4: 3x3 convolutions 512->512 at 7x7 (4608-wide patches).
        (
            "resnet50 stage 4",
            Some(([512, 512], [7, 7], 1)),
            8,
            ConvMode::SpatialMean,
        ),
        (
            "resnet50 stage 4 s2",
            Some(([512, 512], [14, 14], 2)),
            8,
            ConvMode::SpatialMean,
        ),
    ];
    for (name, conv, n, mode) in cases {
        let cpu = directions(&layer_capture::<Flex>(conv, n, &Default::default()), mode);
        let gpu = directions(&layer_capture::<G>(conv, n, &device), mode);
        let errors: Vec<(&str, f64)> = cpu
            .iter()
            .zip(&gpu)
            .map(|((method, c), (_, g))| (*method, rel(g, c)))
            .collect();
        eprintln!("{name}: relative errors {errors:?}");
        for (method, err) in errors {
            assert!(err <= 1e-3, "{name} {method}: relative error {err:e}");
        }
    }
}

/// Batches come out of the data loader intact on the device. Its worker thread assembles them on
/// the host: device tensors created on that thread and used on this one raced in Burn 0.21's
/// GPU backends (this check, run on such a loader, found 111 of 192 batches corrupted on WGPU).
/// The device works on each batch without waiting, as training does, and the results are read
/// only at the end.
fn loader_batches_are_intact<G: Backend>(device: G::Device) {
    fn checksum<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = x.matmul(w);
        ((burn::tensor::activation::relu(h.clone()) + h) / 2.0).sum_dim(0)
    }
    let source: Arc<dyn SampleSource> = Arc::new(SyntheticClassification::new(512, 3, 16, 5));
    let batcher = SampleBatcher::new(source, Normalization::identity(3), 0);
    let order = EpochOrder::new(512, 16, 0, 0, true, true);
    let w = values(9, 768 * 64);
    let cpu_w =
        Tensor::<Flex, 2>::from_data(TensorData::new(w.clone(), [768, 64]), &Default::default());
    let expected: Vec<Vec<f32>> = order
        .refs()
        .chunks(16)
        .map(|refs| {
            let pixels = batcher.load_host(refs).unwrap().pixels;
            let x = Tensor::<Flex, 2>::from_data(
                TensorData::new(pixels, [16, 768]),
                &Default::default(),
            );
            host(checksum(x, cpu_w.clone()))
        })
        .collect();
    let weight = Tensor::<G, 2>::from_data(TensorData::new(w, [768, 64]), &device);
    assert_eq!(expected.len(), 32);
    for epoch in 0..6 {
        let sums: Vec<Tensor<G, 2>> = loader::<G>(batcher.clone(), order.clone(), 16, &device)
            .iter()
            .map(|batch| checksum(batch.unwrap().images.reshape([16, 768]), weight.clone()))
            .collect();
        assert_eq!(sums.len(), expected.len(), "epoch {epoch}: batches missing");
        for (k, sum) in sums.into_iter().enumerate() {
            let err = rel(&host(sum), &expected[k]);
            assert!(err < 1e-4, "epoch {epoch} batch {k} corrupted: {err:e}");
        }
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    type G = Autodiff<burn::backend::Wgpu>;

    /// The WGPU device, or `None` (a skip) when there is none and `CI` is not set.
    fn device() -> Option<burn::backend::wgpu::WgpuDevice> {
        match hylo_train::device::wgpu_adapter() {
            Ok(adapter) => {
                eprintln!("WGPU adapter: {adapter}");
                Some(Default::default())
            }
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI is set, so the WGPU tests must run, but: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: the WGPU parity tests did not run: {e}");
                None
            }
        }
    }

    #[test]
    fn training_matches_the_cpu() {
        if let Some(d) = device() {
            train_side_by_side::<G>(d);
        }
    }

    #[test]
    fn nan_batches_are_skipped_as_on_the_cpu() {
        if let Some(d) = device() {
            nan_batch_is_skipped::<G>(d);
        }
    }

    #[test]
    fn optimizer_records_cross_backends() {
        if let Some(d) = device() {
            records_cross_backends::<G>(d);
        }
    }

    #[test]
    fn preconditioner_directions_match_the_cpu() {
        if let Some(d) = device() {
            preconditioners_match::<burn::backend::Wgpu>(d);
        }
    }

    #[test]
    fn loader_batches_are_intact_on_the_device() {
        if let Some(d) = device() {
            loader_batches_are_intact::<burn::backend::Wgpu>(d);
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    type G = Autodiff<burn::backend::Cuda>;

    /// CUDA device 0, or `None` (a skip, said on stderr) when this machine has no CUDA device
    /// and `CI` is not set; with `CI` set a missing device fails the tests (CI has no GPU: there
    /// the CUDA build is only compiled, not tested).
    fn device() -> Option<burn::backend::cuda::CudaDevice> {
        match hylo_train::device::cuda_ready(0) {
            Ok(()) => Some(burn::backend::cuda::CudaDevice::new(0)),
            Err(e) if std::env::var_os("CI").is_some() => {
                panic!("CI is set, so the CUDA tests must run, but: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: the CUDA parity tests did not run: {e}");
                None
            }
        }
    }

    #[test]
    fn training_matches_the_cpu() {
        if let Some(d) = device() {
            train_side_by_side::<G>(d);
        }
    }

    #[test]
    fn nan_batches_are_skipped_as_on_the_cpu() {
        if let Some(d) = device() {
            nan_batch_is_skipped::<G>(d);
        }
    }

    #[test]
    fn optimizer_records_cross_backends() {
        if let Some(d) = device() {
            records_cross_backends::<G>(d);
        }
    }

    #[test]
    fn preconditioner_directions_match_the_cpu() {
        if let Some(d) = device() {
            preconditioners_match::<burn::backend::Cuda>(d);
        }
    }

    #[test]
    fn loader_batches_are_intact_on_the_device() {
        if let Some(d) = device() {
            loader_batches_are_intact::<burn::backend::Cuda>(d);
        }
    }
}
