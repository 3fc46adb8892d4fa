//! HyLo with its defaults inside burn-train's `Learner`: a BatchNorm ResNet-20 of `hylo-models`
//! on the synthetic set of `hylo-datasets`, Burn's loss and accuracy metrics, its file
//! checkpointer (model, optimizer and scheduler records) and a resume from a checkpoint.
//!
//! ```text
//! cargo run -p hylo-train --example learner             # 3 epochs into runs/learner
//! cargo run -p hylo-train --example learner -- 1        # ... resumed after epoch 1
//! ```
//!
//! The one line that differs from a plain Burn `TrainStep` is the gradients: they go through the
//! capture handle, `capture.gradients_with_loss(loss, self, &batch, loss_of)`, instead of
//! `loss.backward()` into `TrainOutput::new(...)`. The handle gives the optimizer its curvature
//! and keeps what adaptive damping needs: each curvature period's first batch, which it
//! evaluates again (with `loss_of`) when the period ends. A resume from a checkpoint restarts
//! the curvature period it falls in: that period's damping verdict is skipped (the damping
//! goes on from the checkpoint), so a resumed run with adaptive damping can differ from an
//! uninterrupted one after the resume; with a fixed damping it is the same bit for bit.
//! (Burn's data loader builds batches on its worker threads: fine on the CPU; on a GPU backend
//! prefer a loader that builds device tensors on the training thread, as `hylo-train` does,
//! because Burn 0.21's GPU backends can race on tensors made on another thread.)

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::backend::{Autodiff, Flex};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use hylo_datasets::{
    Batch, EpochOrder, Normalization, SampleBatcher, SampleRef, SampleSource,
    SyntheticClassification,
};
use hylo_models::batch_norm::with_frozen_statistics;
use hylo_models::{Classifier, ClassifierSpec, ModelName};
use hylo_optim::{CaptureHandle, CurvatureConfig, DampingConfig, HyloConfig, StepReport};

type B = Autodiff<Flex>;

/// The settings shared with the `hylo-train` run the test compares against.
#[derive(Clone)]
pub struct Settings {
    /// Seed of the weights and the data.
    pub seed: u64,
    /// Training samples (validation: a quarter).
    pub samples: usize,
    /// Side of the 3-channel images.
    pub side: usize,
    /// Batch size.
    pub batch: usize,
    /// Epochs.
    pub epochs: usize,
    /// Learning rate.
    pub lr: f64,
    /// Curvature refresh period.
    pub freq: usize,
    /// A fixed damping instead of the default adaptive one.
    pub fixed_damping: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seed: 0,
            samples: 256,
            side: 8,
            batch: 32,
            epochs: 3,
            lr: 0.1,
            freq: 4,
            fixed_damping: None,
        }
    }
}

/// A classifier of `hylo-models` as a `Learner` model.
#[derive(Module, Debug)]
pub struct Net<B: Backend> {
    net: Classifier<B>,
    /// Shared with the optimizer, which arms it for its curvature steps.
    #[module(skip)]
    capture: CaptureHandle,
}

impl<B: Backend> Net<B> {
    fn classify(&self, batch: Batch<B>) -> ClassificationOutput<B> {
        let logits = self.net.forward(batch.images);
        let labels = batch.labels.expect("classification batches have labels");
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), labels.clone());
        ClassificationOutput::new(loss, logits, labels)
    }
}

impl<B: AutodiffBackend> TrainStep for Net<B> {
    type Input = Batch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Batch<B>) -> TrainOutput<ClassificationOutput<B>> {
        let output = self.classify(batch.clone());
        // The one line that changes: the gradients go through the capture handle, with the
        // loss of a batch for adaptive damping (BatchNorm statistics untouched by that pass).
        let loss_of =
            |m: &Self, b: &Batch<B>| with_frozen_statistics(|| m.classify(b.clone()).loss);
        let grads = self
            .capture
            .gradients_with_loss(output.loss.clone(), self, &batch, loss_of);
        TrainOutput {
            grads,
            item: output,
        }
    }
}

impl<B: Backend> InferenceStep for Net<B> {
    type Input = Batch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Batch<B>) -> ClassificationOutput<B> {
        self.classify(batch)
    }
}

/// Burn's batcher over `hylo-datasets`' sample references.
#[derive(Clone)]
struct Batches(SampleBatcher);

impl<B: Backend> Batcher<B, SampleRef, Batch<B>> for Batches {
    fn batch(&self, refs: Vec<SampleRef>, device: &B::Device) -> Batch<B> {
        self.0
            .load(&refs, device)
            .expect("synthetic samples always load")
    }
}

/// The synthetic set of `hylo-train classify --dataset synthetic` with `--channels 3`.
pub fn data(s: &Settings) -> (SyntheticClassification, SyntheticClassification) {
    let train = SyntheticClassification::new(s.samples, 3, s.side, s.seed);
    let val = SyntheticClassification {
        len: s.samples / 4,
        seed: s.seed.wrapping_add(1_000_003),
        ..train.clone()
    };
    (train, val)
}

/// Batches of `source` in the order of `hylo-train`'s epoch 0 (shuffled for training).
fn loader<Bk: Backend>(
    source: SyntheticClassification,
    s: &Settings,
    shuffle: bool,
) -> Arc<dyn DataLoader<Bk, Batch<Bk>>> {
    let len = source.len();
    let source: Arc<dyn SampleSource> = Arc::new(source);
    let batcher = Batches(SampleBatcher::new(
        source,
        Normalization::identity(3),
        s.seed,
    ));
    DataLoaderBuilder::new(batcher)
        .batch_size(s.batch)
        .build(EpochOrder::new(len, s.batch, s.seed, 0, shuffle, shuffle))
}

/// What a run left behind: the trained model's weights and every optimizer step's report.
pub struct Run {
    /// Every float of the trained model.
    pub weights: Vec<f32>,
    /// The optimizer's report of each step, in order.
    pub reports: Vec<StepReport>,
}

/// Trains for `s.epochs` epochs in `dir` (checkpointing every epoch), resuming from the
/// checkpoint of epoch `resume` when given. The batches of every epoch are those of
/// `hylo-train`'s epoch 0.
pub fn run(dir: &Path, s: &Settings, resume: Option<usize>) -> Run {
    let device = Default::default();
    let capture = CaptureHandle::new();
    // As hylo-train draws them: seeded, materialised in the model's parameter order.
    Flex::seed(&device, s.seed);
    let (train, val) = data(s);
    let spec = ClassifierSpec::new(3, s.side, train.classes());
    let net = Classifier::<B>::build(ModelName::CifarResNet(20), &spec, &capture, &device)
        .expect("resnet20");
    let net = net.clone().load_record(net.into_record());
    let model = Net {
        net,
        capture: capture.clone(),
    };
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    // hylo-train's defaults (its --weight-decay default is 5e-4, the library's 0).
    let mut curvature = CurvatureConfig::new()
        .with_freq(s.freq)
        .with_weight_decay(5e-4);
    if let Some(d) = s.fixed_damping {
        curvature = curvature.with_damping(DampingConfig::new().with_initial(d));
    }
    let optim = HyloConfig::new()
        .with_curvature(curvature)
        .with_seed(s.seed)
        .init::<B>(&capture)
        .expect("valid settings")
        .with_report_observer(Arc::new(move |r: &StepReport| {
            sink.lock().unwrap().push(r.clone())
        }));
    let mut training = SupervisedTraining::new(
        dir,
        loader::<B>(train, s, true),
        loader::<Flex>(val, s, false),
    )
    .metric_train_numeric(LossMetric::new())
    .metric_valid_numeric(LossMetric::new())
    .metric_train_numeric(AccuracyMetric::new())
    .metric_valid_numeric(AccuracyMetric::new())
    // Full precision: a resumed run continues bit for bit (Burn's CompactRecorder stores
    // f16).
    .with_file_checkpointer(NamedMpkFileRecorder::<FullPrecisionSettings>::new())
    .num_epochs(s.epochs);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(Learner::new(model, optim, s.lr));
    let weights = hylo_optim::comm::flatten_params::<Flex, _>(&result.model.net);
    let reports = reports.lock().unwrap().clone();
    Run { weights, reports }
}

#[allow(dead_code)]
fn main() {
    let resume = std::env::args()
        .nth(1)
        .map(|e| e.parse().expect("an epoch"));
    let run = run(Path::new("runs/learner"), &Settings::default(), resume);
    let refreshes = run.reports.iter().filter(|r| r.refreshed).count();
    println!(
        "{} steps, {refreshes} curvature refreshes (HyLo mode at the last: {:?}, damping {:.3}); \
         checkpoints in runs/learner/checkpoint",
        run.reports.len(),
        run.reports.last().and_then(|r| r.mode),
        run.reports.last().map_or(f64::NAN, |r| r.damping)
    );
}
