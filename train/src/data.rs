//! Builds the training and validation sources of a dataset from the arguments.

use std::sync::Arc;

use hylo_datasets::*;

use crate::cli::{DatasetName, NormalizeArg, TrainArgs};

/// Maps a validation sample index to the volume (patient) it belongs to, for per-volume Dice.
pub type VolumeOf = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// The two splits of a dataset and how to feed them to a model.
pub struct DataSources {
    /// Training samples (augmented where the dataset calls for it).
    pub train: Arc<dyn SampleSource>,
    /// Validation samples.
    pub val: Arc<dyn SampleSource>,
    /// Normalisation applied in the batcher.
    pub normalization: Normalization,
    /// Per-volume grouping of validation samples (LGG); `None`: every image is a volume.
    pub volume_of: Option<VolumeOf>,
}

impl DataSources {
    /// `[channels, height, width]` of the samples.
    pub fn shape(&self) -> [usize; 3] {
        self.train.sample_shape()
    }

    /// Number of classes (1 for segmentation).
    pub fn classes(&self) -> usize {
        self.train.classes()
    }
}

/// Loads the dataset named in `args` with its `--low-res` and `--normalize` transforms; errors
/// name the file and what was wrong.
pub fn load(args: &TrainArgs) -> Result<DataSources, String> {
    let mut sources = load_dataset(args)?;
    if let Some(side) = args.low_res {
        let wrap = |s: Arc<dyn SampleSource>| -> Result<Arc<dyn SampleSource>, String> {
            Ok(Arc::new(
                LowResolution::new(s, side as usize).map_err(|e| format!("--low-res: {e}"))?,
            ))
        };
        sources.train = wrap(sources.train)?;
        sources.val = wrap(sources.val)?;
    }
    let channels = sources.shape()[0];
    match args.normalize {
        NormalizeArg::Dataset => {}
        NormalizeArg::None => sources.normalization = Normalization::identity(channels),
        NormalizeArg::Raw => sources.normalization = Normalization::pixel_values(channels),
    }
    Ok(sources)
}

/// The dataset named in `args`, normalised as the dataset usually is.
fn load_dataset(args: &TrainArgs) -> Result<DataSources, String> {
    let err = |e: DatasetError| e.to_string();
    let dir = || args.data_dir.clone().unwrap_or_default();
    let size = |default: u64| args.image_size.unwrap_or(default) as usize;
    let val_seed = args.seed.wrapping_add(1_000_003);
    Ok(match args.dataset {
        DatasetName::Synthetic => {
            let channels = args.channels.unwrap_or(1) as usize;
            let train = SyntheticClassification {
                classes: args.classes as usize,
                noise: args.noise as f32,
                ..SyntheticClassification::new(
                    args.train_samples as usize,
                    channels,
                    size(12),
                    args.seed,
                )
            };
            train.validate().map_err(err)?;
            let val = SyntheticClassification {
                len: args.val_samples as usize,
                seed: val_seed,
                ..train.clone()
            };
            plain(train, val, Normalization::identity(channels))
        }
        DatasetName::Shapes => {
            let train = SyntheticShapes::new(args.train_samples as usize, size(32), args.seed);
            let val = SyntheticShapes {
                len: args.val_samples as usize,
                seed: val_seed,
                ..train.clone()
            };
            plain(train, val, Normalization::imagenet())
        }
        DatasetName::Cifar10 | DatasetName::Cifar100 => {
            let (variant, norm) = if args.dataset == DatasetName::Cifar10 {
                (CifarVariant::Cifar10, Normalization::cifar10())
            } else {
                (CifarVariant::Cifar100, Normalization::cifar100())
            };
            let train = CifarDataset::load(&dir(), variant, Split::Train).map_err(err)?;
            let val = CifarDataset::load(&dir(), variant, Split::Test).map_err(err)?;
            let train = Augmented {
                inner: train,
                augment: RandomCropFlip::cifar(),
            };
            plain(train, val, norm)
        }
        DatasetName::Mnist | DatasetName::FashionMnist => {
            let norm = if args.dataset == DatasetName::Mnist {
                Normalization::mnist()
            } else {
                Normalization::fashion_mnist()
            };
            let train = MnistDataset::load(&dir(), Split::Train).map_err(err)?;
            let val = MnistDataset::load(&dir(), Split::Test).map_err(err)?;
            match args.image_size {
                // Zero-padded, centered (28x28 digits at 32x32 for the CIFAR ResNets).
                Some(size) => {
                    let padded = |s| {
                        ZeroPadded::new(s, size as usize).map_err(|e| format!("--image-size: {e}"))
                    };
                    plain(padded(train)?, padded(val)?, norm)
                }
                None => plain(train, val, norm),
            }
        }
        DatasetName::ImageFolder | DatasetName::MaskFolder => {
            let shape = FolderShape {
                size: size(if args.dataset == DatasetName::MaskFolder {
                    64
                } else {
                    32
                }) as u32,
                channels: args.channels.unwrap_or(3) as usize,
            };
            let (train, val): (Arc<dyn SampleSource>, Arc<dyn SampleSource>) =
                if args.dataset == DatasetName::MaskFolder {
                    (
                        Arc::new(MaskFolder::scan(&dir(), "train", shape).map_err(err)?),
                        Arc::new(MaskFolder::scan(&dir(), "val", shape).map_err(err)?),
                    )
                } else {
                    let train = ClassFolder::scan(&dir(), "train", shape, true).map_err(err)?;
                    let val = ClassFolder::scan(&dir(), "val", shape, false).map_err(err)?;
                    if train.class_names() != val.class_names() {
                        return Err(format!(
                            "{}: train/ has the classes {:?} but val/ has {:?}; both need the \
                             same class folders",
                            dir().display(),
                            train.class_names(),
                            val.class_names()
                        ));
                    }
                    (Arc::new(train), Arc::new(val))
                };
            // Normalisation measured on (up to 2,000 of) the training images.
            let normalization = measured_normalization(train.as_ref(), 2000).map_err(err)?;
            DataSources {
                train,
                val,
                normalization,
                volume_of: None,
            }
        }
        DatasetName::Imagenet => {
            let crop = size(224) as u32;
            let resize = crop * 256 / 224;
            let train = ImageFolder::scan(&dir(), "train", FolderTransform::Train { size: crop })
                .map_err(err)?;
            let val =
                ImageFolder::scan(&dir(), "val", FolderTransform::Eval { resize, size: crop })
                    .map_err(err)?;
            if train.class_names() != val.class_names() {
                return Err(format!(
                    "{}: train/ has {} classes but val/ has {}; both need the same class folders",
                    dir().display(),
                    train.class_names().len(),
                    val.class_names().len()
                ));
            }
            plain(train, val, Normalization::imagenet())
        }
        DatasetName::Lgg => {
            let config = LggConfig {
                size: size(256) as u32,
                val_fraction: args.val_fraction,
                seed: args.seed,
            };
            let train = LggDataset::load(&dir(), Split::Train, &config).map_err(err)?;
            let val = Arc::new(LggDataset::load(&dir(), Split::Test, &config).map_err(err)?);
            let by_patient = val.clone();
            DataSources {
                train: Arc::new(train),
                val,
                normalization: Normalization::imagenet(),
                volume_of: Some(Arc::new(move |i| by_patient.patient_of(i))),
            }
        }
    })
}

fn plain(
    train: impl SampleSource + 'static,
    val: impl SampleSource + 'static,
    normalization: Normalization,
) -> DataSources {
    DataSources {
        train: Arc::new(train),
        val: Arc::new(val),
        normalization,
        volume_of: None,
    }
}
