//! HyLo inside burn-train's `Learner`: a small CNN on a synthetic image set, Burn's loss and
//! accuracy metrics, its file checkpointer (model, optimizer and scheduler records) and a resume
//! from a checkpoint.
//!
//! ```text
//! cargo run -p hylo-optim --example learner             # 3 epochs into runs/learner
//! cargo run -p hylo-optim --example learner -- 1        # ... resumed after epoch 1
//! ```
//!
//! The one line that differs from a plain Burn `TrainStep` is the gradients: they go through the
//! capture handle, `capture.gradients(loss.backward(), self)`, instead of
//! `GradientsParams::from_grads(...)` / `TrainOutput::new(...)`, so that the optimizer gets its
//! curvature. (Burn's data loader builds batches on its worker threads: fine on the CPU; on a GPU
//! backend prefer a loader that builds device tensors on the training thread, as `hylo-train`
//! does, because Burn 0.21's GPU backends can race on tensors made on another thread.)

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use hylo_optim::{
    CaptureHandle, CapturedConv2d, CapturedLinear, CurvatureConfig, DampingConfig, HyloConfig,
    StepReport,
};

type B = Autodiff<Flex>;

const SIDE: usize = 8;
const CLASSES: usize = 4;

/// conv 3x3 -> ReLU -> conv 3x3 stride 2 -> ReLU -> linear, every layer preconditioned.
#[derive(Module, Debug)]
pub struct Net<B: Backend> {
    conv1: CapturedConv2d<B>,
    conv2: CapturedConv2d<B>,
    fc: CapturedLinear<B>,
    /// Shared with the optimizer, which arms it for its curvature steps.
    #[module(skip)]
    capture: CaptureHandle,
}

impl<B: Backend> Net<B> {
    /// The network, reporting its layers to `capture`.
    pub fn new(capture: &CaptureHandle, device: &B::Device) -> Self {
        let conv = |c: [usize; 2], stride: usize| {
            Conv2dConfig::new(c, [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        };
        Self {
            conv1: CapturedConv2d::from_config(&conv([1, 8], 1), capture, device).unwrap(),
            conv2: CapturedConv2d::from_config(&conv([8, 8], 2), capture, device).unwrap(),
            fc: CapturedLinear::from_config(
                &LinearConfig::new(8 * (SIDE / 2) * (SIDE / 2), CLASSES),
                capture,
                device,
            ),
            capture: capture.clone(),
        }
    }

    fn logits(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.conv2.forward(relu(self.conv1.forward(images))));
        let [n, c, hh, ww] = h.dims();
        self.fc.forward(h.reshape([n, c * hh * ww]))
    }

    fn classify(&self, batch: ImageBatch<B>) -> ClassificationOutput<B> {
        let logits = self.logits(batch.images);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), batch.labels.clone());
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

impl<B: AutodiffBackend> TrainStep for Net<B> {
    type Input = ImageBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: ImageBatch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let output = self.classify(batch);
        // The one line that changes: the gradients go through the capture handle.
        let grads = self.capture.gradients(output.loss.backward(), self);
        TrainOutput {
            grads,
            item: output,
        }
    }
}

impl<B: Backend> InferenceStep for Net<B> {
    type Input = ImageBatch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: ImageBatch<B>) -> ClassificationOutput<B> {
        self.classify(batch)
    }
}

/// One image and its class.
#[derive(Clone, Debug)]
pub struct Item {
    pixels: Vec<f32>,
    label: i64,
}

/// A batch on the device.
#[derive(Clone, Debug)]
pub struct ImageBatch<B: Backend> {
    images: Tensor<B, 4>,
    labels: Tensor<B, 1, Int>,
}

#[derive(Clone, Default)]
struct ImageBatcher;

impl<B: Backend> Batcher<B, Item, ImageBatch<B>> for ImageBatcher {
    fn batch(&self, items: Vec<Item>, device: &B::Device) -> ImageBatch<B> {
        let n = items.len();
        let pixels: Vec<f32> = items.iter().flat_map(|i| i.pixels.clone()).collect();
        let labels: Vec<i64> = items.iter().map(|i| i.label).collect();
        ImageBatch {
            images: Tensor::from_data(TensorData::new(pixels, [n, 1, SIDE, SIDE]), device),
            labels: Tensor::from_data(TensorData::new(labels, [n]).convert::<B::IntElem>(), device),
        }
    }
}

/// `len` images whose class is the quadrant holding a bright square, on noise (deterministic).
fn images(len: usize, seed: u64) -> Vec<Item> {
    let mut z = seed;
    let mut noise = move || {
        z = z
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    (0..len)
        .map(|i| {
            let label = i % CLASSES;
            let (r0, c0) = ((label / 2) * SIDE / 2, (label % 2) * SIDE / 2);
            let mut pixels: Vec<f32> = (0..SIDE * SIDE).map(|_| 0.5 * noise()).collect();
            for r in r0 + 1..r0 + 3 {
                for c in c0 + 1..c0 + 3 {
                    pixels[r * SIDE + c] += 1.5;
                }
            }
            Item {
                pixels,
                label: label as i64,
            }
        })
        .collect()
}

/// What a run left behind: the trained model's weights and every optimizer step's report.
pub struct Run {
    /// Every float of the trained model.
    pub weights: Vec<f32>,
    /// The optimizer's report of each step, in order.
    pub reports: Vec<StepReport>,
}

/// Trains for `epochs` epochs in `dir` (checkpointing every epoch), resuming from the checkpoint
/// of epoch `resume` when given.
pub fn run(dir: &Path, epochs: usize, resume: Option<usize>) -> Run {
    let device = Default::default();
    B::seed(&device, 0);
    let capture = CaptureHandle::new();
    let model = Net::<B>::new(&capture, &device);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    let optim = HyloConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_freq(4)
                .with_weight_decay(1e-4)
                .with_damping(DampingConfig::new().with_initial(0.3)),
        )
        .init::<B>(&capture)
        .expect("valid settings")
        .with_report_observer(Arc::new(move |r: &StepReport| {
            sink.lock().unwrap().push(r.clone())
        }));
    let train = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(32)
        .build(InMemDataset::new(images(256, 1)));
    let valid = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(64)
        .build(InMemDataset::new(images(128, 2)));
    let mut training = SupervisedTraining::new(dir, train, valid)
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .metric_train_numeric(AccuracyMetric::new())
        .metric_valid_numeric(AccuracyMetric::new())
        // Full precision: a resumed run continues bit for bit (Burn's CompactRecorder stores
        // f16).
        .with_file_checkpointer(NamedMpkFileRecorder::<FullPrecisionSettings>::new())
        .num_epochs(epochs);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(Learner::new(model, optim, 0.05));
    let weights = hylo_optim::comm::flatten_params::<Flex, _>(&result.model);
    let reports = reports.lock().unwrap().clone();
    Run { weights, reports }
}

#[allow(dead_code)]
fn main() {
    let resume = std::env::args()
        .nth(1)
        .map(|e| e.parse().expect("an epoch"));
    let run = run(Path::new("runs/learner"), 3, resume);
    let refreshes = run.reports.iter().filter(|r| r.refreshed).count();
    println!(
        "{} steps, {refreshes} curvature refreshes (HyLo mode at the last: {:?}); checkpoints in \
         runs/learner/checkpoint",
        run.reports.len(),
        run.reports.last().and_then(|r| r.mode)
    );
}
