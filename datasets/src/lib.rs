//! Datasets for the training binaries: real formats read from a path the user gives
//! (CIFAR, IDX, image folders, LGG MRI), synthetic defaults, augmentation and batching.
//! Nothing is downloaded.

#![warn(missing_docs)]

pub mod augment;
pub mod batcher;
pub mod cifar;
pub mod error;
pub mod fixtures;
pub mod folders;
pub mod idx;
pub mod image_folder;
pub mod lgg;
pub mod resolution;
pub mod sample;
pub mod synthetic;

pub use augment::{Augmented, Normalization, RandomCropFlip, ZeroPadded};
pub use batcher::{loader, Batch, BatchLoader, EpochOrder, HostBatch, SampleBatcher, SampleRef};
pub use cifar::{CifarDataset, CifarVariant, Split};
pub use error::DatasetError;
pub use folders::{measured_normalization, ClassFolder, FolderShape, MaskFolder};
pub use idx::MnistDataset;
pub use image_folder::{FolderTransform, ImageFolder};
pub use lgg::{LggConfig, LggDataset};
pub use resolution::LowResolution;
pub use sample::{sample_rng, Sample, SampleSource, Target};
pub use synthetic::{SyntheticClassification, SyntheticShapes};
