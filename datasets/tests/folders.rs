//! Your own images: class folders and image/mask folders at any size and channel count, their
//! errors naming the file, and normalisation measured on the data.

use hylo_datasets::fixtures::{write_class_folder, write_mask_folder};
use hylo_datasets::{
    measured_normalization, sample_rng, ClassFolder, FolderShape, MaskFolder, SampleSource, Target,
};

#[test]
fn class_folders_read_any_size_in_one_or_three_channels() {
    let dir = tempfile::tempdir().unwrap();
    write_class_folder(dir.path(), 3, 4, 20).unwrap();
    for channels in [1, 3] {
        let shape = FolderShape { size: 12, channels };
        let train = ClassFolder::scan(dir.path(), "train", shape, true).unwrap();
        let val = ClassFolder::scan(dir.path(), "val", shape, false).unwrap();
        assert_eq!((train.len(), val.len(), train.classes()), (12, 6, 3));
        assert_eq!(train.class_names(), &["class_0", "class_1", "class_2"]);
        let s = val.load(5, &mut sample_rng(0, 0, 5)).unwrap();
        assert_eq!(s.shape(), [channels, 12, 12]);
        assert_eq!(s.target, Target::Class(2));
        assert!(s.pixels.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    // Normalisation from the data: the mean and deviation of the pixels themselves.
    let train = ClassFolder::scan(
        dir.path(),
        "train",
        FolderShape {
            size: 12,
            channels: 1,
        },
        false,
    )
    .unwrap();
    let norm = measured_normalization(&train, 100).unwrap();
    let all: Vec<f32> = (0..train.len())
        .flat_map(|i| {
            train
                .load(i, &mut sample_rng(0, 0, i as u64))
                .unwrap()
                .pixels
        })
        .collect();
    let mean = all.iter().sum::<f32>() / all.len() as f32;
    assert!((norm.mean[0] - mean).abs() < 1e-4, "{norm:?} vs {mean}");
    assert!(norm.std[0] > 0.05);
}

#[test]
fn mask_folders_pair_images_and_masks_by_name_and_name_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    write_mask_folder(dir.path(), 6, 24).unwrap();
    let shape = FolderShape {
        size: 16,
        channels: 3,
    };
    let train = MaskFolder::scan(dir.path(), "train", shape).unwrap();
    assert_eq!(train.len(), 6);
    let s = train.load(1, &mut sample_rng(0, 0, 1)).unwrap();
    assert_eq!(s.shape(), [3, 16, 16]);
    let Target::Mask(mask) = &s.target else {
        panic!("a mask")
    };
    assert_eq!(mask.len(), 256);
    assert!(mask.contains(&1.0) && mask.contains(&0.0));
    // A mask of another size than its image names both.
    image::GrayImage::new(10, 10)
        .save(dir.path().join("train/masks/2.png"))
        .unwrap();
    let err = train
        .load(2, &mut sample_rng(0, 0, 2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mask is 10x10") && err.contains("2.png") && err.contains("24x24"),
        "{err}"
    );
    // A missing mask names the image and where its mask was expected.
    std::fs::remove_file(dir.path().join("train/masks/3.png")).unwrap();
    let err = MaskFolder::scan(dir.path(), "train", shape)
        .unwrap_err()
        .to_string();
    assert!(err.contains("masks") && err.contains("3.png"), "{err}");
    // A folder without the layout names what it expected.
    let err = MaskFolder::scan(dir.path(), "test", shape)
        .unwrap_err()
        .to_string();
    assert!(err.contains("images"), "{err}");
    let err = ClassFolder::scan(
        dir.path(),
        "train",
        FolderShape {
            size: 8,
            channels: 2,
        },
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("1 or 3 channels"), "{err}");
}
