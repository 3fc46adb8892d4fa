//! Every reader on small files written in its real format, including the bad cases.

use std::io::Write;
use std::path::Path;

use hylo_datasets::cifar::encode_cifar;
use hylo_datasets::idx::encode_idx;
use hylo_datasets::*;

fn rng() -> rand::rngs::StdRng {
    sample_rng(0, 0, 0)
}

fn pixels(seed: u8) -> Vec<u8> {
    (0..3072).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

fn message(err: DatasetError) -> String {
    err.to_string()
}

#[test]
fn cifar10_reads_every_batch_and_checks_records() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&sub).unwrap();
    for (i, name) in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ]
    .iter()
    .enumerate()
    {
        let records = vec![(i as u8, pixels(i as u8 + 1)), (9, pixels(7))];
        std::fs::write(
            sub.join(format!("{name}.bin")),
            encode_cifar(CifarVariant::Cifar10, &records),
        )
        .unwrap();
    }
    std::fs::write(
        sub.join("test_batch.bin"),
        encode_cifar(CifarVariant::Cifar10, &[(3, pixels(3))]),
    )
    .unwrap();

    // The archive's subdirectory is found from its parent.
    let train = CifarDataset::load(dir.path(), CifarVariant::Cifar10, Split::Train).unwrap();
    assert_eq!(train.len(), 10);
    assert_eq!(train.labels(), &[0, 9, 1, 9, 2, 9, 3, 9, 4, 9]);
    let s = train.load(2, &mut rng()).unwrap();
    assert_eq!((s.shape(), s.target), ([3, 32, 32], Target::Class(1)));
    assert_eq!(s.pixels[5], pixels(2)[5] as f32 / 255.0);
    let test = CifarDataset::load(&sub, CifarVariant::Cifar10, Split::Test).unwrap();
    assert_eq!(test.len(), 1);

    // Truncated record.
    let bad = sub.join("data_batch_2.bin");
    std::fs::write(
        &bad,
        &encode_cifar(CifarVariant::Cifar10, &[(1, pixels(1))])[..3000],
    )
    .unwrap();
    let err = message(CifarDataset::load(&sub, CifarVariant::Cifar10, Split::Train).unwrap_err());
    assert!(
        err.contains("data_batch_2.bin") && err.contains("truncated"),
        "{err}"
    );
    // Label out of range.
    std::fs::write(
        &bad,
        encode_cifar(CifarVariant::Cifar10, &[(1, pixels(1)), (10, pixels(1))]),
    )
    .unwrap();
    let err = message(CifarDataset::load(&sub, CifarVariant::Cifar10, Split::Train).unwrap_err());
    assert!(
        err.contains("data_batch_2.bin") && err.contains("label 10") && err.contains("record 1"),
        "{err}"
    );
    // Missing file, missing directory.
    std::fs::write(&bad, encode_cifar(CifarVariant::Cifar10, &[(1, pixels(1))])).unwrap();
    std::fs::remove_file(sub.join("data_batch_4.bin")).unwrap();
    let err = CifarDataset::load(&sub, CifarVariant::Cifar10, Split::Train).unwrap_err();
    assert!(matches!(err, DatasetError::MissingFile { .. }));
    assert!(message(err).contains("data_batch_4.bin"));
    let err = message(
        CifarDataset::load(
            &dir.path().join("nope"),
            CifarVariant::Cifar10,
            Split::Train,
        )
        .unwrap_err(),
    );
    assert!(
        err.contains("nope") && err.contains("directory not found"),
        "{err}"
    );
}

#[test]
fn cifar100_uses_the_fine_label() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("train.bin"),
        encode_cifar(CifarVariant::Cifar100, &[(99, pixels(2)), (42, pixels(3))]),
    )
    .unwrap();
    let d = CifarDataset::load(dir.path(), CifarVariant::Cifar100, Split::Train).unwrap();
    assert_eq!((d.labels(), d.classes()), (&[99u8, 42][..], 100));
    let mut bytes = encode_cifar(CifarVariant::Cifar100, &[(1, pixels(2))]);
    bytes[1] = 100;
    let err = message(
        CifarDataset::parse(Path::new("x/test.bin"), &bytes, CifarVariant::Cifar100).unwrap_err(),
    );
    assert!(
        err.contains("x/test.bin") && err.contains("label 100"),
        "{err}"
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn idx_plain_and_gzipped_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        encode_idx(&[3, 4, 5], &images),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte.gz"),
        gzip(&encode_idx(&[3], &[7, 0, 9])),
    )
    .unwrap();
    let d = MnistDataset::load(dir.path(), Split::Train).unwrap();
    assert_eq!((d.len(), d.sample_shape()), (3, [1, 4, 5]));
    let s = d.load(1, &mut rng()).unwrap();
    assert_eq!(s.target, Target::Class(0));
    assert_eq!(s.pixels[0], 20.0 / 255.0);

    let labels = dir.path().join("train-labels-idx1-ubyte.gz");
    // Wrong magic (images where labels are expected).
    std::fs::write(&labels, gzip(&encode_idx(&[3, 1, 1], &[1, 2, 3]))).unwrap();
    let err = message(MnistDataset::load(dir.path(), Split::Train).unwrap_err());
    assert!(
        err.contains("train-labels-idx1-ubyte.gz") && err.contains("magic 0x00000803"),
        "{err}"
    );
    // Truncated.
    std::fs::write(&labels, &encode_idx(&[3], &[1, 2, 3])[..9]).unwrap();
    let err = message(MnistDataset::load(dir.path(), Split::Train).unwrap_err());
    assert!(err.contains("truncated"), "{err}");
    // Count mismatch and label out of range.
    std::fs::write(&labels, encode_idx(&[2], &[1, 2])).unwrap();
    let err = message(MnistDataset::load(dir.path(), Split::Train).unwrap_err());
    assert!(err.contains("2 labels for 3 images"), "{err}");
    std::fs::write(&labels, encode_idx(&[3], &[1, 12, 3])).unwrap();
    let err = message(MnistDataset::load(dir.path(), Split::Train).unwrap_err());
    assert!(err.contains("label 1 is 12"), "{err}");
    // Missing file.
    let err = message(MnistDataset::load(dir.path(), Split::Test).unwrap_err());
    assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
}

fn write_png(path: &Path, w: u32, h: u32, shade: u8) {
    image::RgbImage::from_pixel(w, h, image::Rgb([shade, 255 - shade, 10]))
        .save(path)
        .unwrap();
}

#[test]
fn image_folders_scan_decode_and_transform() {
    let dir = tempfile::tempdir().unwrap();
    for (class, shade) in [("cat", 200u8), ("dog", 20)] {
        for split in ["train", "val"] {
            let d = dir.path().join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            write_png(&d.join("a.png"), 40, 30, shade);
            image::RgbImage::from_pixel(50, 64, image::Rgb([shade, shade, shade]))
                .save(d.join("b.JPEG"))
                .unwrap();
            std::fs::write(d.join("notes.txt"), "ignored").unwrap();
        }
    }
    let train =
        ImageFolder::scan(dir.path(), "train", FolderTransform::Train { size: 24 }).unwrap();
    assert_eq!(train.class_names(), &["cat".to_string(), "dog".to_string()]);
    assert_eq!(train.len(), 4);
    let s = train.load(0, &mut rng()).unwrap();
    assert_eq!(
        (s.shape(), s.target.clone()),
        ([3, 24, 24], Target::Class(0))
    );
    assert!((s.pixels[0] - 200.0 / 255.0).abs() < 0.02);
    let val = ImageFolder::scan(
        dir.path(),
        "val",
        FolderTransform::Eval {
            resize: 32,
            size: 28,
        },
    )
    .unwrap();
    let s = val.load(3, &mut rng()).unwrap();
    assert_eq!((s.shape(), s.target), ([3, 28, 28], Target::Class(1)));

    std::fs::write(dir.path().join("val/dog/broken.jpg"), b"not a jpeg at all").unwrap();
    let val = ImageFolder::scan(dir.path(), "val", FolderTransform::imagenet_eval()).unwrap();
    let broken = (0..val.len())
        .find_map(|i| val.load(i, &mut rng()).err())
        .unwrap();
    let err = message(broken);
    assert!(
        err.contains("broken.jpg") && err.contains("cannot decode"),
        "{err}"
    );
    let err = message(
        ImageFolder::scan(dir.path(), "test", FolderTransform::imagenet_eval()).unwrap_err(),
    );
    assert!(
        err.contains("test") && err.contains("directory not found"),
        "{err}"
    );
}

fn write_lgg(root: &Path, patients: usize, slices: usize) {
    for p in 0..patients {
        let name = format!("TCGA_CS_{p:04}_19970101");
        let d = root.join("kaggle_3m").join(&name);
        std::fs::create_dir_all(&d).unwrap();
        for k in 1..=slices {
            image::RgbImage::from_pixel(20, 20, image::Rgb([p as u8 * 40, 0, k as u8]))
                .save(d.join(format!("{name}_{k}.tif")))
                .unwrap();
            let mask = image::GrayImage::from_fn(20, 20, |x, _| {
                image::Luma([if x < 5 { 255 } else { 0 }])
            });
            mask.save(d.join(format!("{name}_{k}_mask.tif"))).unwrap();
        }
    }
}

#[test]
fn lgg_splits_by_patient_and_reads_masks() {
    let dir = tempfile::tempdir().unwrap();
    write_lgg(dir.path(), 5, 3);
    let config = LggConfig {
        size: 16,
        val_fraction: 0.4,
        seed: 3,
    };
    let train = LggDataset::load(dir.path(), Split::Train, &config).unwrap();
    let val = LggDataset::load(dir.path(), Split::Test, &config).unwrap();
    assert_eq!((train.patients().len(), val.patients().len()), (3, 2));
    assert!(train.patients().iter().all(|p| !val.patients().contains(p)));
    assert_eq!((train.len(), val.len()), (9, 6));
    let again = LggDataset::load(dir.path(), Split::Test, &config).unwrap();
    assert_eq!(again.patients(), val.patients());
    let other = LggDataset::load(
        dir.path(),
        Split::Test,
        &LggConfig {
            seed: 11,
            ..config.clone()
        },
    )
    .unwrap();
    let other_train = LggDataset::load(
        dir.path(),
        Split::Train,
        &LggConfig {
            seed: 11,
            ..config.clone()
        },
    )
    .unwrap();
    // Another seed may pick other patients; its split is disjoint and covers all five too.
    assert!(other_train
        .patients()
        .iter()
        .all(|p| !other.patients().contains(p)));
    let mut everyone: Vec<&String> = other_train
        .patients()
        .iter()
        .chain(other.patients())
        .collect();
    everyone.sort();
    everyone.dedup();
    assert_eq!(everyone.len(), 5);
    let s = train.load(0, &mut rng()).unwrap();
    assert_eq!(s.shape(), [3, 16, 16]);
    let Target::Mask(mask) = s.target else {
        panic!("no mask")
    };
    assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0));
    assert_eq!(mask.iter().sum::<f32>(), 4.0 * 16.0);
    assert!(train.patient_of(0).starts_with("TCGA_CS_"));

    // A mask of another size, a missing mask.
    let d = dir.path().join("kaggle_3m/TCGA_CS_0001_19970101");
    image::GrayImage::new(10, 20)
        .save(d.join("TCGA_CS_0001_19970101_2_mask.tif"))
        .unwrap();
    let all = [
        LggDataset::load(dir.path(), Split::Train, &config).unwrap(),
        LggDataset::load(dir.path(), Split::Test, &config).unwrap(),
    ];
    let err = all
        .iter()
        .flat_map(|d| (0..d.len()).filter_map(|i| d.load(i, &mut rng()).err()))
        .next()
        .unwrap();
    let err = message(err);
    assert!(
        err.contains("_2_mask.tif") && err.contains("10x20") && err.contains("20x20"),
        "{err}"
    );
    std::fs::remove_file(d.join("TCGA_CS_0001_19970101_3_mask.tif")).unwrap();
    let err = message(
        LggDataset::load(dir.path(), Split::Train, &config)
            .and(LggDataset::load(dir.path(), Split::Test, &config))
            .unwrap_err(),
    );
    assert!(err.contains("_3_mask.tif"), "{err}");
    let err =
        message(LggDataset::load(&dir.path().join("none"), Split::Train, &config).unwrap_err());
    assert!(err.contains("none"), "{err}");
}
