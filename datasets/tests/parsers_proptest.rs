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
