//! Property tests of the binary parsers: arbitrary bytes give an error or a value, never a
//! panic, and encoded files read back exactly.

use std::path::Path;

use hylo_datasets::cifar::encode_cifar;
use hylo_datasets::idx::{encode_idx, parse_idx, IMAGES_MAGIC, LABELS_MAGIC};
use hylo_datasets::{CifarDataset, CifarVariant};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn idx_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_idx(Path::new("f"), &bytes, IMAGES_MAGIC);
        let _ = parse_idx(Path::new("f"), &bytes, LABELS_MAGIC);
    }

    #[test]
    fn idx_header_mutations_never_panic(dims in proptest::collection::vec(0usize..5, 1..4),
                                        cut in 0usize..64, flip in 0usize..16) {
        let count: usize = dims.iter().product();
        let mut bytes = encode_idx(&dims, &vec![1u8; count]);
        if flip < bytes.len() { bytes[flip] ^= 0xff; }
        bytes.truncate(cut.min(bytes.len()));
        let magic = 0x0000_0800 | dims.len() as u32;
        let _ = parse_idx(Path::new("f"), &bytes, magic);
    }

    #[test]
    fn idx_round_trips(dims in proptest::collection::vec(1usize..6, 1..4), seed in any::<u8>()) {
        let count: usize = dims.iter().product();
        let data: Vec<u8> = (0..count).map(|i| (i as u8).wrapping_add(seed)).collect();
        let magic = 0x0000_0800 | dims.len() as u32;
        let parsed = parse_idx(Path::new("f"), &encode_idx(&dims, &data), magic).unwrap();
        prop_assert_eq!(parsed.dims, dims);
        prop_assert_eq!(parsed.data, data);
    }

    #[test]
    fn cifar_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..7000)) {
        let _ = CifarDataset::parse(Path::new("f"), &bytes, CifarVariant::Cifar10);
        let _ = CifarDataset::parse(Path::new("f"), &bytes, CifarVariant::Cifar100);
    }

    #[test]
    fn cifar_round_trips(labels in proptest::collection::vec(0u8..10, 1..4)) {
        let records: Vec<(u8, Vec<u8>)> = labels.iter().map(|&l| (l, vec![l; 3072])).collect();
        let d = CifarDataset::parse(Path::new("f"), &encode_cifar(CifarVariant::Cifar10, &records), CifarVariant::Cifar10).unwrap();
        prop_assert_eq!(d.labels(), &labels[..]);
    }
}

/// Gzip of `bytes`.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Valid headers with a body of the wrong size reach the size check, plain or gzipped, and
    /// the error names the declared and found sizes.
    #[test]
    fn idx_body_size_errors_are_reported(dims in proptest::collection::vec(1usize..5, 1..4),
                                         delta in -3i64..4, gz in any::<bool>()) {
        prop_assume!(delta != 0);
        let count: usize = dims.iter().product();
        let len = (count as i64 + delta).max(0) as usize;
        prop_assume!(len != count);
        let mut bytes = encode_idx(&dims, &vec![7u8; count]);
        bytes.truncate(4 + 4 * dims.len());
        bytes.extend(std::iter::repeat_n(7u8, len));
        let bytes = if gz { gzip(&bytes) } else { bytes };
        let magic = 0x0000_0800 | dims.len() as u32;
        let err = parse_idx(Path::new("f.idx"), &bytes, magic).unwrap_err().to_string();
        prop_assert!(err.starts_with("f.idx: "), "{}", err);
        prop_assert!(err.contains(&format!("need {count} data bytes")), "{}", err);
    }

    /// Valid CIFAR records with one corrupted label reach the label check, which names the
    /// record and the range.
    #[test]
    fn cifar_bad_labels_are_reported(labels in proptest::collection::vec(0u8..10, 1..5),
                                     at in 0usize..5, bad in 10u8..=255) {
        let at = at % labels.len();
        let mut records: Vec<(u8, Vec<u8>)> = labels.iter().map(|&l| (l, vec![l; 3072])).collect();
        records[at].0 = bad;
        let bytes = encode_cifar(CifarVariant::Cifar10, &records);
        let err = CifarDataset::parse(Path::new("b.bin"), &bytes, CifarVariant::Cifar10)
            .unwrap_err()
            .to_string();
        prop_assert!(err.contains(&format!("record {at}: label {bad} out of range")), "{}", err);
    }

    /// Valid records cut or padded to a non-whole number of records reach the length check.
    #[test]
    fn cifar_partial_records_are_reported(n in 1usize..4, cut in 1usize..3073) {
        let records: Vec<(u8, Vec<u8>)> = (0..n).map(|i| (i as u8, vec![0; 3072])).collect();
        let mut bytes = encode_cifar(CifarVariant::Cifar10, &records);
        bytes.truncate(bytes.len() - cut);
        let err = CifarDataset::parse(Path::new("b.bin"), &bytes, CifarVariant::Cifar10)
            .unwrap_err()
            .to_string();
        prop_assert!(err.contains("not a whole number of 3073-byte records"), "{}", err);
    }
}

/// A gzipped IDX whose body is far larger than its header declares is rejected after reading
/// only the declared size (plus one byte), not decompressed whole.
#[test]
fn gzipped_idx_is_decompressed_only_up_to_the_declared_size() {
    let mut bytes = encode_idx(&[2, 2, 2], &[1; 8]);
    bytes.extend(std::iter::repeat_n(0u8, 64 << 20)); // 64 MiB of trailing zeros
    let err = parse_idx(Path::new("big.gz"), &gzip(&bytes), IMAGES_MAGIC)
        .unwrap_err()
        .to_string();
    // Had the stream been read whole, 67108872 bytes would have been found.
    assert!(err.contains("need 8 data bytes, found 9"), "{err}");
}
