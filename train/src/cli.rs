//! The training arguments shared by `classify` and `segment`, saved as `config.json`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use hylo_optim::{ConvMode, SwitchPolicy};
use serde::{Deserialize, Serialize};

use crate::device::DeviceArg;

/// Optimizers the binary trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimName {
    /// SGD with momentum (Burn's).
    Sgd,
    /// Adam (Burn's).
    Adam,
    /// The Neumann optimizer (Krishnan et al., ICLR 2018).
    Neumann,
    /// K-FAC (KAISA-style eigen form).
    Kfac,
    /// Exact damped natural gradient through Sherman-Morrison-Woodbury.
    Sngd,
    /// HyLo: KID/KIS low-rank natural gradient with switching.
    Hylo,
}

/// `--damping`: adaptive, or a fixed starting value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DampingArg {
    /// Levenberg-Marquardt adaptation from this start (`auto`: [`DampingArg::AUTO_START`]).
    Auto(f64),
    /// This value (then the schedule of --target-damping, if any).
    Value(f64),
}

impl DampingArg {
    /// Where `auto` starts: a high damping the rule lowers while the quadratic model predicts the
    /// loss well (starting too low can diverge before the rule reacts).
    pub const AUTO_START: f64 = 1.0;

    /// The starting value.
    pub fn initial(self) -> f64 {
        match self {
            Self::Auto(v) | Self::Value(v) => v,
        }
    }

    /// Whether the damping adapts.
    pub fn is_auto(self) -> bool {
        matches!(self, Self::Auto(_))
    }
}

impl std::str::FromStr for DampingArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || format!("expected `auto`, `auto:START` or a number, got `{s}`");
        if s == "auto" {
            return Ok(Self::Auto(Self::AUTO_START));
        }
        if let Some(start) = s.strip_prefix("auto:") {
            return start.parse::<f64>().map(Self::Auto).map_err(|_| expected());
        }
        s.parse::<f64>().map(Self::Value).map_err(|_| expected())
    }
}

impl std::fmt::Display for DampingArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto(v) if *v == Self::AUTO_START => f.write_str("auto"),
            Self::Auto(v) => write!(f, "auto:{v}"),
            Self::Value(v) => write!(f, "{v}"),
        }
    }
}

impl Serialize for DampingArg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto(_) => s.serialize_str(&self.to_string()),
            Self::Value(v) => s.serialize_f64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for DampingArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A number (configs written before `auto` existed) or a string.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(v) => Ok(Self::Value(v)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `--kfac-method`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KfacMethodArg {
    /// Eigendecompositions of the factors.
    #[default]
    Eigen,
    /// Cholesky inverses of the damped factors.
    Inverse,
}

impl From<KfacMethodArg> for hylo_optim::KfacMethod {
    fn from(m: KfacMethodArg) -> Self {
        match m {
            KfacMethodArg::Eigen => Self::Eigen,
            KfacMethodArg::Inverse => Self::Inverse,
        }
    }
}

/// `--normalize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormalizeArg {
    /// The dataset's own constants.
    #[default]
    Dataset,
    /// Pixels in [0, 1].
    None,
    /// Pixel values 0-255.
    Raw,
}

/// `--step-length`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepLengthArg {
    /// Adapted from each curvature period (with `--damping auto`).
    #[default]
    Auto,
    /// The learning rate as given.
    Off,
}

/// Datasets the binary reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// Synthetic classification (no files).
    Synthetic,
    /// CIFAR-10 binary files from --data-dir.
    Cifar10,
    /// CIFAR-100 binary files from --data-dir.
    Cifar100,
    /// MNIST IDX files from --data-dir.
    Mnist,
    /// Fashion-MNIST IDX files from --data-dir.
    FashionMnist,
    /// ImageNet-layout image folders (train/, val/) from --data-dir, ImageNet's transforms.
    Imagenet,
    /// Your own images: --data-dir/{train,val}/CLASS/*, resized to --image-size (default 32),
    /// --channels 1 or 3 (default 3), normalised from the training images.
    ImageFolder,
    /// Your own segmentation set: --data-dir/{train,val}/images/* with masks/* of the same file
    /// names, resized to --image-size (default 64), --channels 1 or 3 (default 3).
    MaskFolder,
    /// Synthetic segmentation of random shapes (no files).
    Shapes,
    /// LGG brain-MRI segmentation (kaggle_3m) from --data-dir.
    Lgg,
}

impl DatasetName {
    /// The name as typed on the command line.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Whether the dataset has masks rather than labels.
    pub fn is_segmentation(self) -> bool {
        matches!(self, Self::Shapes | Self::Lgg | Self::MaskFolder)
    }

    /// Whether the dataset is read from `--data-dir`.
    pub fn needs_files(self) -> bool {
        !matches!(self, Self::Synthetic | Self::Shapes)
    }
}

/// Everything a training run needs; `config.json` holds it so the run can be repeated.
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Model name (small-cnn, resnet20..110, resnet18..152, 3c1f, mlp, unet).
    #[arg(long, default_value = "small-cnn")]
    pub model: String,
    /// Dataset.
    #[arg(long, value_enum, default_value = "synthetic")]
    pub dataset: DatasetName,
    /// Directory of a real dataset.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "hylo")]
    pub optim: OptimName,
    /// Epochs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Samples per batch (global batch in distributed runs).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Peak learning rate (default: 0.1; Adam's 0.001).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Epochs of linear learning-rate warmup.
    #[arg(long, default_value_t = 0)]
    pub warmup_epochs: u64,
    /// Epochs at which the learning rate is multiplied by --lr-decay (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub milestones: Vec<u64>,
    /// Learning-rate factor at each milestone.
    #[arg(long, default_value_t = 0.1)]
    pub lr_decay: f64,
    /// Damping lambda: `auto` (Levenberg-Marquardt on the reduction ratio of each curvature
    /// period, from 1 and kept between 1e-6 and 10; `auto:START` starts elsewhere) or a value
    /// (constant, or decaying with --target-damping).
    #[arg(long, default_value = "auto")]
    pub damping: DampingArg,
    /// KL clipping (KAISA's; its default is 0.001): every natural-gradient update is scaled so
    /// that its quadratic KL estimate `lr^2 sum <v, g>` stays below this; none or 0: off. It
    /// bounds the steps a damping far too small would take before `auto` has adapted it, but it
    /// scales only the preconditioned layers: with BatchNorm models the BatchNorm parameters
    /// then do the learning and validation can lag far behind training.
    #[arg(long)]
    #[serde(default)]
    pub kl_clip: Option<f64>,
    /// Damping reached after --damping-decay refreshes (none: constant).
    #[arg(long)]
    pub target_damping: Option<f64>,
    /// Refreshes over which the damping decays to --target-damping.
    #[arg(long, default_value_t = 0)]
    pub damping_decay: u64,
    /// Curvature refresh period in steps.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub freq: u64,
    /// HyLo compression ratio (rows kept per layer = ceil(rho n)).
    #[arg(long, default_value_t = 0.1)]
    pub rho: f64,
    /// HyLo switching: auto, auto:THRESHOLD, kid, kis, or epochs:A,B,C.
    #[arg(long, default_value = "auto")]
    pub switch: String,
    /// Convolution curvature of SNGD and HyLo: spatial-mean (the HyLo paper's rows, about 1/L
    /// of the per-sample gradient over L output positions), gradient-scale (the same rows at
    /// the gradient's scale) or exact (the per-sample gradients, materialised).
    #[arg(long, default_value = "gradient-scale")]
    pub conv_mode: String,
    /// Step size of the natural-gradient directions: sgd (each layer's direction rescaled to the
    /// norm of its gradient, so that --lr and its schedule work as for SGD) or none (the
    /// preconditioned direction as it is, as in the papers).
    #[arg(long, default_value = "sgd")]
    #[serde(default = "default_graft")]
    pub graft: String,
    /// Step-length trust region of the natural-gradient optimizers with `--damping auto`: auto
    /// (a factor on the learning rate, shortened when the loss of a curvature period's first
    /// batch rose over the period or the quadratic model predicts an overshoot, grown back up
    /// to 1 otherwise) or off.
    #[arg(long, value_enum, default_value = "auto")]
    #[serde(default = "default_step_length")]
    pub step_length: StepLengthArg,
    /// K-FAC eigendecomposition period (a multiple of --freq; default: --freq).
    #[arg(long)]
    pub inverse_every: Option<u64>,
    /// How K-FAC inverts its factors: eigen (eigendecompositions, exact damped Kronecker
    /// inverse) or inverse (Cholesky inverses of the factors damped by sqrt(damping) each;
    /// much cheaper, the damping is fixed at each inversion).
    #[arg(long, value_enum, default_value = "eigen")]
    #[serde(default)]
    pub kfac_method: KfacMethodArg,
    /// cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of weights, data order and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (config.json, metrics.csv, train.log, curves.png, checkpoint/); by
    /// default a new `runs/<command>-<model>-<optim>[-N]`. A directory holding a run is refused
    /// (resume it with --resume, or pass --overwrite).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Let --out replace the run it holds.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    /// Stop after this many optimizer steps (a checkpoint is saved; --resume continues).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop after this many seconds of training (a checkpoint is saved).
    #[arg(long)]
    pub time_budget: Option<f64>,
    /// Synthetic sets: training samples.
    #[arg(long, default_value_t = 4096)]
    pub train_samples: u64,
    /// Synthetic sets: validation samples.
    #[arg(long, default_value_t = 1024)]
    pub val_samples: u64,
    /// Image side for synthetic, shapes, ImageNet (crop), LGG (resize) and MNIST/Fashion-MNIST
    /// (zero padding around the 28x28 images); default per dataset.
    #[arg(long)]
    pub image_size: Option<u64>,
    /// Average every image down to a SIDE x SIDE grid and interpolate it back to its size
    /// (inputs of low intrinsic dimension: neighbouring pixels nearly equal).
    #[arg(long, value_name = "SIDE")]
    #[serde(default)]
    pub low_res: Option<u64>,
    /// Input normalisation: dataset (its usual per-channel mean and deviation), none (pixels in
    /// [0, 1]) or raw (pixel values 0-255, unnormalised).
    #[arg(long, value_enum, default_value = "dataset")]
    #[serde(default)]
    pub normalize: NormalizeArg,
    /// Hidden widths of the MLP (comma separated: `256,256,256` is four layers).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Channels of the synthetic classification images (default 1) or of the image folders'
    /// (1 or 3, default 3).
    #[arg(long)]
    pub channels: Option<u64>,
    /// Classes of the synthetic classification set (2 to 16).
    #[arg(long, default_value_t = 4)]
    #[serde(default = "default_classes")]
    pub classes: u64,
    /// Amplitude of the synthetic classification set's background noise.
    #[arg(long, default_value_t = 0.8)]
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// U-Net channels at the first level.
    #[arg(long, default_value_t = 32)]
    pub init_features: u64,
    /// Give the CIFAR ResNets' convolutions a bias (as the HyLo code does).
    #[arg(long)]
    pub conv_bias: bool,
    /// LGG: fraction of patients held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Validate every N steps as well as at the end of each epoch (off the training clock;
    /// the convergence benchmark's time to target).
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub val_every: Option<u64>,
    /// BatchNorm statistics recomputed before each validation as the average over N training
    /// batches at the current weights ("precise BatchNorm"; 0: the running averages of the
    /// training steps, which lag behind the weights and make validation swing).
    #[arg(long, value_name = "N", default_value_t = 20)]
    #[serde(default)]
    pub bn_recalibrate: u64,
    /// Batches the BatchNorm statistics are recomputed over before each `--val-every` check
    /// (at most `--bn-recalibrate`; epoch ends use `--bn-recalibrate`'s count).
    #[arg(long, value_name = "N", default_value_t = 4)]
    #[serde(default)]
    pub bn_recalibrate_checks: u64,
    /// Steps between reads of the training metrics from the device (progress, skip checks).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Stop with an error after this many consecutive steps skipped for NaN or Inf gradients.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default = "default_max_consecutive_skips")]
    pub max_consecutive_skips: u64,
    /// Leave out samples that cannot be read (undecodable images, missing masks), logging and
    /// counting each, instead of stopping with an error naming the file.
    #[arg(long)]
    #[serde(default)]
    pub skip_bad_samples: bool,
    /// Data-parallel training over MPI (`mpirun -np P hylo-train ... --distributed`; needs the
    /// `mpi` feature). --batch-size is the global batch, split evenly over the ranks.
    #[arg(long)]
    #[serde(default)]
    pub distributed: bool,
}

/// `--graft` of a `config.json` written before the flag existed: those runs had none.
fn default_graft() -> String {
    "none".into()
}

/// `--step-length` of a `config.json` written before the flag existed: those runs had none.
fn default_step_length() -> StepLengthArg {
    StepLengthArg::Off
}

fn default_hidden() -> Vec<usize> {
    vec![256]
}

fn default_classes() -> u64 {
    4
}

fn default_noise() -> f64 {
    0.8
}

fn default_log_every() -> u64 {
    20
}

fn default_max_consecutive_skips() -> u64 {
    20
}

impl TrainArgs {
    /// Parsed device.
    pub fn device(&self) -> Result<DeviceArg, String> {
        self.device.parse()
    }

    /// The HyLo switching policy, with epochs converted to steps.
    pub fn switch_policy(&self, steps_per_epoch: usize) -> Result<SwitchPolicy, String> {
        parse_switch(&self.switch, steps_per_epoch)
    }

    /// The convolution curvature mode.
    pub fn conv_mode(&self) -> Result<ConvMode, String> {
        self.conv_mode
            .parse()
            .map_err(|e| format!("--conv-mode: {e}"))
    }

    /// The grafting of the natural-gradient directions.
    pub fn graft(&self) -> Result<hylo_optim::Graft, String> {
        self.graft.parse().map_err(|e| format!("--graft: {e}"))
    }

    /// The step-length trust region's settings.
    pub fn step_length(&self) -> hylo_optim::StepLengthConfig {
        hylo_optim::StepLengthConfig::new().with_adaptive(self.step_length == StepLengthArg::Auto)
    }

    /// The output directory (resolved by `run_training` before a run starts).
    pub fn out_dir(&self) -> &std::path::Path {
        self.out
            .as_deref()
            .unwrap_or(std::path::Path::new("runs/latest"))
    }

    /// The peak learning rate: `--lr`, or the optimizer's default (Adam's 0.001, 0.1 for the
    /// others).
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(match self.optim {
            OptimName::Adam => 1e-3,
            _ => 0.1,
        })
    }

    /// The KL clip in effect: `--kl-clip`, none when absent or 0.
    pub fn kl_clip(&self) -> Option<f64> {
        self.kl_clip.filter(|k| *k > 0.0)
    }

    /// Checks what clap cannot: names, ranges and combinations; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.device()?;
        if !(2..=16).contains(&self.classes) {
            return Err(format!(
                "--classes: the synthetic set has 2 to 16 classes, got {}",
                self.classes
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(format!(
                "--noise: expected a finite amplitude >= 0, got {}",
                self.noise
            ));
        }
        self.conv_mode()?;
        self.graft()?;
        parse_switch(&self.switch, 1)?;
        let model: hylo_models::ModelName =
            self.model.parse().map_err(|e| format!("--model: {e}"))?;
        if model.is_segmenter() != self.dataset.is_segmentation() {
            return Err(format!(
                "--model {} does not fit --dataset {}: segmentation datasets (shapes, lgg) need \
                 unet, classification datasets need a classifier",
                self.model,
                self.dataset.name()
            ));
        }
        if self.dataset.needs_files() && self.data_dir.is_none() {
            return Err(format!(
                "--dataset {} is read from files: give --data-dir DIR",
                self.dataset.name()
            ));
        }
        for (flag, v) in [("--lr", self.lr()), ("--damping", self.damping.initial())] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{flag}: expected a positive number, got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!(
                "--momentum: expected a value in [0, 1), got {}",
                self.momentum
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "--weight-decay: expected >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(self.rho > 0.0 && self.rho <= 1.0) {
            return Err(format!(
                "--rho: expected a value in (0, 1], got {}",
                self.rho
            ));
        }
        if let Some(k) = self.kl_clip {
            if !(k.is_finite() && k >= 0.0) {
                return Err(format!(
                    "--kl-clip: expected a positive number (0: off), got {k}"
                ));
            }
        }
        if self.target_damping.is_some() && self.damping.is_auto() {
            return Err(
                "--target-damping sets a schedule for a fixed damping: give --damping a value"
                    .into(),
            );
        }
        if let Some(t) = self.target_damping {
            if !(t.is_finite() && t > 0.0) || self.damping_decay == 0 {
                return Err(format!(
                    "--target-damping {t} needs a positive value and --damping-decay > 0 refreshes"
                ));
            }
        }
        if let Some(k) = self.inverse_every {
            if k == 0 || k % self.freq != 0 {
                return Err(format!(
                    "--inverse-every {k} must be a positive multiple of --freq {}",
                    self.freq
                ));
            }
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(format!(
                "--hidden: expected one or more positive widths, got {:?}",
                self.hidden
            ));
        }
        if self.low_res == Some(0) {
            return Err("--low-res: expected a grid side of at least 1".into());
        }
        if self.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "--milestones must increase, got {:?}",
                self.milestones
            ));
        }
        if let Some(t) = self.time_budget {
            if !(t.is_finite() && t > 0.0) {
                return Err(format!("--time-budget: expected positive seconds, got {t}"));
            }
        }
        if self.train_samples < self.batch_size && !self.dataset.needs_files() {
            return Err(format!(
                "--batch-size {} is larger than --train-samples {}",
                self.batch_size, self.train_samples
            ));
        }
        Ok(())
    }
}

/// Parses `auto`, `auto:T`, `kid`, `kis` or `epochs:A,B,C`.
pub fn parse_switch(s: &str, steps_per_epoch: usize) -> Result<SwitchPolicy, String> {
    let bad =
        || format!("--switch: expected auto, auto:THRESHOLD, kid, kis or epochs:A,B,C, got `{s}`");
    Ok(match s {
        "auto" => SwitchPolicy::Auto { threshold: 0.2 },
        "kid" => SwitchPolicy::Kid,
        "kis" => SwitchPolicy::Kis,
        _ => {
            if let Some(t) = s.strip_prefix("auto:") {
                let threshold: f64 = t.parse().map_err(|_| bad())?;
                if !(threshold.is_finite() && threshold >= 0.0) {
                    return Err(bad());
                }
                SwitchPolicy::Auto { threshold }
            } else if let Some(list) = s.strip_prefix("epochs:") {
                let v: Vec<usize> = list
                    .split(',')
                    .map(|x| x.trim().parse().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?;
                let [a, b, c] = v[..] else { return Err(bad()) };
                if !(a <= b && b <= c) {
                    return Err(format!("--switch epochs:{a},{b},{c}: expected A <= B <= C"));
                }
                SwitchPolicy::Epochs {
                    a,
                    b,
                    c,
                    steps_per_epoch: steps_per_epoch.max(1),
                }
            } else {
                return Err(bad());
            }
        }
    })
}
