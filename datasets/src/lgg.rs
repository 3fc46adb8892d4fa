//! The LGG brain-MRI segmentation set (Kaggle "lgg-mri-segmentation"):
//! `kaggle_3m/<patient>/<patient>_<k>.tif` with `<patient>_<k>_mask.tif`, split by patient.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::augment::rgb_to_chw;
use crate::cifar::Split;
use crate::error::{require_dir, DatasetError};
use crate::image_folder::decode_image_and_mask;
use crate::sample::{Sample, SampleSource, Target};

/// Settings of the LGG reader.
#[derive(Clone, Debug, PartialEq)]
pub struct LggConfig {
    /// Side the slices and masks are resized to (256 keeps them as they are).
    pub size: u32,
    /// Fraction of patients held out for validation (at least one patient).
    pub val_fraction: f64,
    /// Seed of the patient split.
    pub seed: u64,
}

impl Default for LggConfig {
    fn default() -> Self {
        Self {
            size: 256,
            val_fraction: 0.1,
            seed: 0,
        }
    }
}

/// The slices of one split of the LGG set.
#[derive(Clone, Debug)]
pub struct LggDataset {
    slices: Vec<(PathBuf, PathBuf)>,
    patients: Vec<String>,
    size: u32,
}

impl LggDataset {
    /// Scans `dir` (the `kaggle_3m` folder or its parent) and keeps the patients of `split`.
    pub fn load(dir: &Path, split: Split, config: &LggConfig) -> Result<Self, DatasetError> {
        require_dir(dir, "the LGG data directory (kaggle_3m)")?;
        let root = if dir.join("kaggle_3m").is_dir() {
            dir.join("kaggle_3m")
        } else {
            dir.to_path_buf()
        };
        let mut patients: Vec<PathBuf> = std::fs::read_dir(&root)
            .map_err(|e| DatasetError::io(&root, e, "directory"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        patients.sort();
        if patients.len() < 2 {
            return Err(DatasetError::format(
                &root,
                format!(
                    "found {} patient directories; need at least 2 to split by patient",
                    patients.len()
                ),
            ));
        }
        patients.shuffle(&mut StdRng::seed_from_u64(config.seed));
        let n_val = ((patients.len() as f64 * config.val_fraction).round() as usize)
            .clamp(1, patients.len() - 1);
        let chosen = match split {
            Split::Test => patients[..n_val].to_vec(),
            Split::Train => patients[n_val..].to_vec(),
        };
        let mut slices = Vec::new();
        let mut names = Vec::new();
        for patient in chosen {
            names.push(patient.file_name().unwrap().to_string_lossy().into_owned());
            let mut files: Vec<PathBuf> = std::fs::read_dir(&patient)
                .map_err(|e| DatasetError::io(&patient, e, "directory"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .to_ascii_lowercase();
                    name.ends_with(".tif") && !name.ends_with("_mask.tif")
                })
                .collect();
            files.sort();
            for image in files {
                let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
                let mask = image.with_file_name(format!("{stem}_mask.tif"));
                if !mask.is_file() {
                    return Err(DatasetError::MissingFile {
                        path: mask,
                        what: format!("the mask of {}", image.display()),
                    });
                }
                slices.push((image, mask));
            }
        }
        names.sort();
        if slices.is_empty() {
            return Err(DatasetError::format(
                &root,
                "no <patient>_<k>.tif slices found",
            ));
        }
        Ok(Self {
            slices,
            patients: names,
            size: config.size,
        })
    }

    /// The patients of this split, sorted.
    pub fn patients(&self) -> &[String] {
        &self.patients
    }

    /// The patient of slice `index` (for per-volume Dice).
    pub fn patient_of(&self, index: usize) -> String {
        let parent = self.slices[index].0.parent().and_then(|p| p.file_name());
        parent
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl SampleSource for LggDataset {
    fn len(&self) -> usize {
        self.slices.len()
    }

    fn load(&self, index: usize, _rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let (image_path, mask_path) = &self.slices[index];
        let (image, mask) = decode_image_and_mask(image_path, mask_path)?;
        let s = self.size;
        let (image, mask) = if (image.width(), image.height()) == (s, s) {
            (image, mask)
        } else {
            (
                image.resize_exact(s, s, FilterType::Triangle),
                mask.resize_exact(s, s, FilterType::Nearest),
            )
        };
        let mask = mask
            .to_luma8()
            .pixels()
            .map(|p| f32::from(u8::from(p[0] > 127)))
            .collect();
        let s = s as usize;
        Ok(Sample {
            channels: 3,
            height: s,
            width: s,
            pixels: rgb_to_chw(&image),
            target: Target::Mask(mask),
        })
    }

    fn classes(&self) -> usize {
        1
    }

    fn sample_shape(&self) -> [usize; 3] {
        [3, self.size as usize, self.size as usize]
    }
}
