//! Your own images: classification from `root/{train,val}/<class>/*` and segmentation from
//! `root/{train,val}/images/*` with `root/{train,val}/masks/*` (the same file stems), any image
//! size, resized to a square side, with 1 or 3 channels; and per-channel normalisation measured
//! on the training images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::DynamicImage;
use rand::rngs::StdRng;
use rand::Rng;

use crate::augment::{rgb_to_chw, Normalization};
use crate::error::{require_dir, DatasetError};
use crate::image_folder::{decode_image, decode_image_and_mask};
use crate::sample::{sample_rng, Sample, SampleSource, Target};

/// Image files: `.png`, `.jpg`, `.jpeg`, `.tif`, `.tiff`, `.bmp` (any case).
pub fn is_image_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "tif" | "tiff" | "bmp"
                )
            })
            .unwrap_or(false)
}

fn sorted(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e, "directory"))? {
        out.push(
            entry
                .map_err(|e| DatasetError::io(dir, e, "directory entry"))?
                .path(),
        );
    }
    out.sort();
    Ok(out)
}

/// How the images of a folder become tensors: a square side and a channel count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderShape {
    /// Side images are resized to (exactly, aspect ratio not kept).
    pub size: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
}

impl FolderShape {
    /// Checks the channel count.
    pub fn validate(&self) -> Result<(), DatasetError> {
        if !matches!(self.channels, 1 | 3) || self.size == 0 {
            return Err(DatasetError::Invalid(format!(
                "image folders give 1 or 3 channels at a side of at least 1, got {} channels at \
                 {}",
                self.channels, self.size
            )));
        }
        Ok(())
    }

    /// `img` resized to the side, as CHW floats in [0, 1].
    fn pixels(&self, img: &DynamicImage) -> Vec<f32> {
        let s = self.size;
        let img = if (img.width(), img.height()) == (s, s) {
            img.clone()
        } else {
            img.resize_exact(s, s, FilterType::Triangle)
        };
        match self.channels {
            1 => img
                .to_luma8()
                .pixels()
                .map(|p| f32::from(p[0]) / 255.0)
                .collect(),
            _ => rgb_to_chw(&img),
        }
    }

    fn dims(&self) -> [usize; 3] {
        [self.channels, self.size as usize, self.size as usize]
    }
}

/// Classification from `root/<split>/<class>/*`: any image size, resized; a random horizontal
/// flip on the training split when `flip` is set.
#[derive(Clone, Debug)]
pub struct ClassFolder {
    files: Vec<(PathBuf, usize)>,
    classes: Vec<String>,
    shape: FolderShape,
    flip: bool,
}

impl ClassFolder {
    /// Scans `root/<split>/<class>/*` (classes sorted by folder name).
    pub fn scan(
        root: &Path,
        split: &str,
        shape: FolderShape,
        flip: bool,
    ) -> Result<Self, DatasetError> {
        shape.validate()?;
        require_dir(root, "the image-folder root (with train/ and val/)")?;
        let dir = root.join(split);
        require_dir(&dir, &format!("the {split} split: one folder per class"))?;
        let mut classes = Vec::new();
        let mut files = Vec::new();
        for class_dir in sorted(&dir)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len();
            classes.push(
                class_dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            files.extend(
                sorted(&class_dir)?
                    .into_iter()
                    .filter(|f| is_image_file(f))
                    .map(|f| (f, label)),
            );
        }
        if files.is_empty() {
            return Err(DatasetError::format(
                &dir,
                "no images found (expected <class>/*.png, .jpg, .jpeg, .tif or .bmp)",
            ));
        }
        Ok(Self {
            files,
            classes,
            shape,
            flip,
        })
    }

    /// Class names; a class's label is its position.
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }
}

/// Flips CHW `pixels` of side `s` horizontally.
fn flip_chw(pixels: &mut [f32], s: usize) {
    for row in pixels.chunks_mut(s) {
        row.reverse();
    }
}

impl SampleSource for ClassFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let (path, label) = &self.files[index];
        let mut pixels = self.shape.pixels(&decode_image(path)?);
        let [c, s, _] = self.shape.dims();
        if self.flip && rng.random_bool(0.5) {
            flip_chw(&mut pixels, s);
        }
        Ok(Sample {
            channels: c,
            height: s,
            width: s,
            pixels,
            target: Target::Class(*label),
        })
    }

    fn classes(&self) -> usize {
        self.classes.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.shape.dims()
    }
}

/// Segmentation from `root/<split>/images/*` and `root/<split>/masks/*`: each image's mask has
/// its file stem (any image extension); a mask pixel above half its range is foreground.
#[derive(Clone, Debug)]
pub struct MaskFolder {
    pairs: Vec<(PathBuf, PathBuf)>,
    shape: FolderShape,
}

impl MaskFolder {
    /// Scans `root/<split>/images` and pairs every image with its mask in `root/<split>/masks`.
    pub fn scan(root: &Path, split: &str, shape: FolderShape) -> Result<Self, DatasetError> {
        shape.validate()?;
        require_dir(root, "the segmentation-folder root (with train/ and val/)")?;
        let images = root.join(split).join("images");
        let masks = root.join(split).join("masks");
        require_dir(&images, &format!("the {split} images (images/*)"))?;
        require_dir(
            &masks,
            &format!("the {split} masks (masks/*, one per image)"),
        )?;
        let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned());
        let by_stem: BTreeMap<String, PathBuf> = sorted(&masks)?
            .into_iter()
            .filter(|p| is_image_file(p))
            .filter_map(|p| stem(&p).map(|s| (s, p)))
            .collect();
        let mut pairs = Vec::new();
        for image in sorted(&images)?.into_iter().filter(|p| is_image_file(p)) {
            let name = stem(&image).unwrap_or_default();
            let mask = by_stem
                .get(&name)
                .ok_or_else(|| DatasetError::MissingFile {
                    path: masks.join(&name),
                    what: format!(
                        "the mask of {} (masks/{name}.png or another image type)",
                        image.display()
                    ),
                })?;
            pairs.push((image, mask.clone()));
        }
        if pairs.is_empty() {
            return Err(DatasetError::format(&images, "no images found"));
        }
        Ok(Self { pairs, shape })
    }
}

impl SampleSource for MaskFolder {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn load(&self, index: usize, _rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let (image_path, mask_path) = &self.pairs[index];
        let (image, mask) = decode_image_and_mask(image_path, mask_path)?;
        let s = self.shape.size;
        let mask = mask
            .resize_exact(s, s, FilterType::Nearest)
            .to_luma8()
            .pixels()
            .map(|p| f32::from(u8::from(p[0] > 127)))
            .collect();
        let [c, s, _] = self.shape.dims();
        Ok(Sample {
            channels: c,
            height: s,
            width: s,
            pixels: self.shape.pixels(&image),
            target: Target::Mask(mask),
        })
    }

    fn classes(&self) -> usize {
        1
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.shape.dims()
    }
}

/// Per-channel mean and standard deviation of up to `max` samples of `source` (evenly spaced,
/// loaded as the first epoch would load them): normalisation from the data.
pub fn measured_normalization(
    source: &dyn SampleSource,
    max: usize,
) -> Result<Normalization, DatasetError> {
    let [c, _, _] = source.sample_shape();
    let n = source.len();
    let count = n.min(max.max(1));
    let (mut sum, mut sq, mut values) = (vec![0.0f64; c], vec![0.0f64; c], 0usize);
    for k in 0..count {
        let index = k * n / count;
        let sample = source.load(index, &mut sample_rng(0, 0, index as u64))?;
        let plane = sample.pixels.len() / c;
        for ch in 0..c {
            for &v in &sample.pixels[ch * plane..(ch + 1) * plane] {
                sum[ch] += f64::from(v);
                sq[ch] += f64::from(v) * f64::from(v);
            }
        }
        values += plane;
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / values as f64) as f32).collect();
    let std: Vec<f32> = (0..c)
        .map(|ch| {
            let m = sum[ch] / values as f64;
            ((sq[ch] / values as f64 - m * m).max(0.0).sqrt().max(1e-3)) as f32
        })
        .collect();
    Ok(Normalization { mean, std })
}
