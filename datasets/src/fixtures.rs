//! Small files in each format this crate reads, with deterministic contents: for tests, and for
//! trying a command on stand-in data before pointing it at the real set.

use std::path::Path;

use crate::cifar::{encode_cifar, CifarVariant};
use crate::error::DatasetError;

fn io(path: &Path, e: impl std::fmt::Display) -> DatasetError {
    DatasetError::Invalid(format!("{}: {e}", path.display()))
}

/// A deterministic byte per (sample, position).
fn byte(sample: usize, position: usize) -> u8 {
    ((sample * 131 + position * 7 + (position / 97) * 13) % 251) as u8
}

/// `dir/data_batch_{1..5}.bin` and `dir/test_batch.bin` of CIFAR-10 (`records` per file, labels
/// cycling over the 10 classes).
pub fn write_cifar10(dir: &Path, records: usize) -> Result<(), DatasetError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let file = |first: usize| -> Vec<u8> {
        let records: Vec<(u8, Vec<u8>)> = (first..first + records)
            .map(|i| ((i % 10) as u8, (0..3072).map(|p| byte(i, p)).collect()))
            .collect();
        encode_cifar(CifarVariant::Cifar10, &records)
    };
    for k in 1..=5 {
        let path = dir.join(format!("data_batch_{k}.bin"));
        std::fs::write(&path, file(k * records)).map_err(|e| io(&path, e))?;
    }
    let path = dir.join("test_batch.bin");
    std::fs::write(&path, file(0)).map_err(|e| io(&path, e))
}

/// The LGG layout: `dir/kaggle_3m/<patient>/<patient>_<k>.tif` with `<patient>_<k>_mask.tif`,
/// `side` x `side` RGB slices with a square of foreground.
pub fn write_lgg(
    dir: &Path,
    patients: usize,
    slices: usize,
    side: u32,
) -> Result<(), DatasetError> {
    for p in 0..patients {
        let name = format!("TCGA_CS_{p:04}_19970101");
        let d = dir.join("kaggle_3m").join(&name);
        std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
        for k in 1..=slices {
            let (x0, y0) = ((k as u32 * 3) % (side / 2), (p as u32 * 5) % (side / 2));
            let inside = |x: u32, y: u32| {
                (x0..x0 + side / 3).contains(&x) && (y0..y0 + side / 3).contains(&y)
            };
            let image = image::RgbImage::from_fn(side, side, |x, y| {
                let v = if inside(x, y) {
                    200
                } else {
                    byte(k, (x * side + y) as usize) / 4
                };
                image::Rgb([v, v / 2, v])
            });
            let mask = image::GrayImage::from_fn(side, side, |x, y| {
                image::Luma([if inside(x, y) { 255 } else { 0 }])
            });
            let path = d.join(format!("{name}_{k}.tif"));
            image.save(&path).map_err(|e| io(&path, e))?;
            let path = d.join(format!("{name}_{k}_mask.tif"));
            mask.save(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

/// `dir/{train,val}/<class>/<k>.png` for `classes` classes, `per_class` images each (`val`
/// gets half as many), `side` x `side` RGB with a bright band whose row is the class.
pub fn write_class_folder(
    dir: &Path,
    classes: usize,
    per_class: usize,
    side: u32,
) -> Result<(), DatasetError> {
    for (split, count) in [("train", per_class), ("val", per_class.div_ceil(2))] {
        for c in 0..classes {
            let d = dir.join(split).join(format!("class_{c}"));
            std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
            for k in 0..count {
                let band = (c as u32 * side) / classes as u32;
                let img = image::RgbImage::from_fn(side, side, |x, y| {
                    let v = if y / (side / classes as u32).max(1)
                        == band / (side / classes as u32).max(1)
                    {
                        220
                    } else {
                        byte(k + 100 * c, (x + y * side) as usize) / 3
                    };
                    image::Rgb([v, v, v])
                });
                let path = d.join(format!("{k}.png"));
                img.save(&path).map_err(|e| io(&path, e))?;
            }
        }
    }
    Ok(())
}

/// `dir/{train,val}/images/<k>.png` with `dir/{train,val}/masks/<k>.png`: `count` training
/// pairs (`val` gets half as many), `side` x `side`, a square of foreground.
pub fn write_mask_folder(dir: &Path, count: usize, side: u32) -> Result<(), DatasetError> {
    for (split, n) in [("train", count), ("val", count.div_ceil(2))] {
        let images = dir.join(split).join("images");
        let masks = dir.join(split).join("masks");
        for d in [&images, &masks] {
            std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
        }
        for k in 0..n {
            let x0 = (k as u32 * 7) % (side / 2);
            let inside = |x: u32, y: u32| {
                (x0..x0 + side / 3).contains(&x) && (x0..x0 + side / 3).contains(&y)
            };
            let image = image::RgbImage::from_fn(side, side, |x, y| {
                let v = if inside(x, y) {
                    210
                } else {
                    byte(k, (x * side + y) as usize) / 4
                };
                image::Rgb([v, v, v / 2])
            });
            let mask = image::GrayImage::from_fn(side, side, |x, y| {
                image::Luma([if inside(x, y) { 255 } else { 0 }])
            });
            let path = images.join(format!("{k}.png"));
            image.save(&path).map_err(|e| io(&path, e))?;
            let path = masks.join(format!("{k}.png"));
            mask.save(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}
