//! Image folders in the ImageNet layout: `root/{train,val}/<class>/*.{jpg,jpeg,png}`.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::Rng;

use crate::augment::{random_resized_crop, resize_center_crop, rgb_to_chw};
use crate::error::{require_dir, DatasetError};
use crate::sample::{Sample, SampleSource, Target};

/// How images are turned into fixed-size tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolderTransform {
    /// Random-resized crop to `size` and a random horizontal flip.
    Train {
        /// Output side.
        size: u32,
    },
    /// Resize the shorter side to `resize`, then a center crop of `size`.
    Eval {
        /// Shorter side after resizing.
        resize: u32,
        /// Output side.
        size: u32,
    },
}

impl FolderTransform {
    /// ImageNet's training transform (224).
    pub fn imagenet_train() -> Self {
        Self::Train { size: 224 }
    }

    /// ImageNet's validation transform (resize 256, crop 224).
    pub fn imagenet_eval() -> Self {
        Self::Eval {
            resize: 256,
            size: 224,
        }
    }

    fn size(&self) -> u32 {
        match self {
            Self::Train { size } | Self::Eval { size, .. } => *size,
        }
    }
}

/// The files of one split of an image folder, decoded lazily.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    files: Vec<(PathBuf, usize)>,
    classes: Vec<String>,
    transform: FolderTransform,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let read = std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e, "directory"))?;
    let mut entries = Vec::new();
    for entry in read {
        entries.push(
            entry
                .map_err(|e| DatasetError::io(dir, e, "directory entry"))?
                .path(),
        );
    }
    entries.sort();
    Ok(entries)
}

impl ImageFolder {
    /// Scans `root/<split>/<class>/*` (classes sorted by name, as torchvision does).
    pub fn scan(
        root: &Path,
        split: &str,
        transform: FolderTransform,
    ) -> Result<Self, DatasetError> {
        require_dir(root, "the image-folder root (with train/ and val/)")?;
        let dir = root.join(split);
        require_dir(
            &dir,
            &format!("the {split} split: one subdirectory per class"),
        )?;
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for class_dir in sorted_entries(&dir)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len();
            classes.push(
                class_dir
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
            for file in sorted_entries(&class_dir)? {
                if file.is_file() && is_image(&file) {
                    files.push((file, label));
                }
            }
        }
        if files.is_empty() {
            return Err(DatasetError::format(
                &dir,
                "no images found (expected <class>/*.jpg, *.jpeg or *.png)",
            ));
        }
        Ok(Self {
            files,
            classes,
            transform,
        })
    }

    /// Class names; the label of a class is its position.
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }
}

/// Decodes an image file, naming it on failure.
pub fn decode_image(path: &Path) -> Result<image::DynamicImage, DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e, "image"))?;
    image::load_from_memory(&bytes)
        .map_err(|e| DatasetError::format(path, format!("cannot decode image: {e}")))
}

/// Decodes a segmentation image and its mask, which must have the same size.
pub fn decode_image_and_mask(
    image_path: &Path,
    mask_path: &Path,
) -> Result<(image::DynamicImage, image::DynamicImage), DatasetError> {
    let image = decode_image(image_path)?;
    let mask = decode_image(mask_path)?;
    if (image.width(), image.height()) != (mask.width(), mask.height()) {
        return Err(DatasetError::format(
            mask_path,
            format!(
                "mask is {}x{} but its image {} is {}x{}",
                mask.width(),
                mask.height(),
                image_path.display(),
                image.width(),
                image.height()
            ),
        ));
    }
    Ok((image, mask))
}

impl SampleSource for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let (path, label) = &self.files[index];
        let img = decode_image(path)?;
        let img = match self.transform {
            FolderTransform::Train { size } => {
                let crop = random_resized_crop(&img, size, rng);
                if rng.random_bool(0.5) {
                    crop.fliph()
                } else {
                    crop
                }
            }
            FolderTransform::Eval { resize, size } => resize_center_crop(&img, resize, size),
        };
        let size = self.transform.size() as usize;
        Ok(Sample {
            channels: 3,
            height: size,
            width: size,
            pixels: rgb_to_chw(&img),
            target: Target::Class(*label),
        })
    }

    fn classes(&self) -> usize {
        self.classes.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        let s = self.transform.size() as usize;
        [3, s, s]
    }
}
