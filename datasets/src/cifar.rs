//! CIFAR-10 and CIFAR-100 in their binary format, read from a directory.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;

use crate::error::{require_dir, DatasetError};
use crate::sample::{Sample, SampleSource, Target};

const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarVariant {
    /// 10 classes; files `data_batch_1..5.bin`, `test_batch.bin`; records of 1 + 3072 bytes.
    Cifar10,
    /// 100 classes; files `train.bin`, `test.bin`; records of 2 + 3072 bytes (coarse, fine).
    Cifar100,
}

/// Training or test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training files.
    Train,
    /// The test files.
    Test,
}

impl CifarVariant {
    /// Number of classes.
    pub fn classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }

    /// The split's file names.
    pub fn files(self, split: Split) -> Vec<String> {
        match (self, split) {
            (Self::Cifar10, Split::Train) => {
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
            }
            (Self::Cifar10, Split::Test) => vec!["test_batch.bin".into()],
            (Self::Cifar100, Split::Train) => vec!["train.bin".into()],
            (Self::Cifar100, Split::Test) => vec!["test.bin".into()],
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }
}

/// A CIFAR split held in memory as bytes (150 MB for CIFAR-10's training set).
#[derive(Clone, Debug)]
pub struct CifarDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    variant: CifarVariant,
}

impl CifarDataset {
    /// Reads `split` from `dir`, which holds the binary files directly or in the archive's
    /// `cifar-10-batches-bin` / `cifar-100-binary` subdirectory.
    pub fn load(dir: &Path, variant: CifarVariant, split: Split) -> Result<Self, DatasetError> {
        require_dir(dir, "the CIFAR data directory")?;
        let sub = match variant {
            CifarVariant::Cifar10 => "cifar-10-batches-bin",
            CifarVariant::Cifar100 => "cifar-100-binary",
        };
        let files = variant.files(split);
        let base: PathBuf = if !dir.join(&files[0]).exists() && dir.join(sub).is_dir() {
            dir.join(sub)
        } else {
            dir.to_path_buf()
        };
        let mut out = Self {
            images: Vec::new(),
            labels: Vec::new(),
            variant,
        };
        for name in files {
            let path = base.join(&name);
            let bytes = std::fs::read(&path).map_err(|e| {
                DatasetError::io(&path, e, &format!("{variant:?} {split:?} file {name}"))
            })?;
            out.append(&path, &bytes)?;
        }
        Ok(out)
    }

    /// Parses the records of one file's `bytes` (named `path` in errors).
    pub fn parse(path: &Path, bytes: &[u8], variant: CifarVariant) -> Result<Self, DatasetError> {
        let mut out = Self {
            images: Vec::new(),
            labels: Vec::new(),
            variant,
        };
        out.append(path, bytes)?;
        Ok(out)
    }

    fn append(&mut self, path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
        let record = self.variant.label_bytes() + PIXELS;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            return Err(DatasetError::format(
                path,
                format!(
                    "truncated or wrong format: {} bytes is not a whole number of {record}-byte \
                     records ({:?})",
                    bytes.len(),
                    self.variant
                ),
            ));
        }
        let classes = self.variant.classes();
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[self.variant.label_bytes() - 1];
            if label as usize >= classes {
                return Err(DatasetError::format(
                    path,
                    format!("record {i}: label {label} out of range (expected 0..{classes})"),
                ));
            }
            self.labels.push(label);
            self.images
                .extend_from_slice(&rec[self.variant.label_bytes()..]);
        }
        Ok(())
    }

    /// The label of each sample.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl SampleSource for CifarDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn load(&self, index: usize, _rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let bytes = &self.images[index * PIXELS..(index + 1) * PIXELS];
        Ok(Sample {
            channels: 3,
            height: 32,
            width: 32,
            pixels: bytes.iter().map(|&b| b as f32 / 255.0).collect(),
            target: Target::Class(self.labels[index] as usize),
        })
    }

    fn classes(&self) -> usize {
        self.variant.classes()
    }

    fn sample_shape(&self) -> [usize; 3] {
        [3, 32, 32]
    }
}

/// Writes records in CIFAR's binary format (for tests and fixtures).
pub fn encode_cifar(variant: CifarVariant, samples: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (label, pixels) in samples {
        if variant == CifarVariant::Cifar100 {
            out.push(label / 5);
        }
        out.push(*label);
        out.extend_from_slice(pixels);
    }
    out
}
