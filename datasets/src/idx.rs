//! IDX files (MNIST, Fashion-MNIST), plain or gzipped, from a directory with the standard names.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;

use crate::cifar::Split;
use crate::error::{require_dir, DatasetError};
use crate::sample::{Sample, SampleSource, Target};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The contents of an IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions.
    pub dims: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<u8>,
}

/// The largest IDX payload accepted (4 GiB): MNIST-sized files are far below it, and a header
/// declaring more is treated as corrupt rather than allocated.
pub const MAX_IDX_BYTES: usize = 1 << 32;

/// Parses IDX `bytes` (gzip is detected by its magic) and checks the magic number.
///
/// A gzipped file is decompressed only up to the size its header declares (plus one byte, to
/// detect trailing data): a corrupt or malicious stream cannot make the reader allocate more.
pub fn parse_idx(path: &Path, bytes: &[u8], expected_magic: u32) -> Result<IdxArray, DatasetError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut decoder = flate2::read::GzDecoder::new(bytes);
        let gzip =
            |e: std::io::Error| DatasetError::format(path, format!("corrupt gzip stream: {e}"));
        // The magic number says how many dimensions the header has.
        let mut head = Vec::new();
        (&mut decoder)
            .take(4)
            .read_to_end(&mut head)
            .map_err(gzip)?;
        if head.len() == 4 {
            let ndim = head[3] as usize;
            (&mut decoder)
                .take(4 * ndim as u64)
                .read_to_end(&mut head)
                .map_err(gzip)?;
        }
        let (_, declared) = header(path, &head, expected_magic)?;
        let mut out = head;
        (&mut decoder)
            .take(declared as u64 + 1)
            .read_to_end(&mut out)
            .map_err(gzip)?;
        return parse_plain(path, &out, expected_magic);
    }
    parse_plain(path, bytes, expected_magic)
}

/// `(dims, data bytes)` of the header at the start of `bytes`.
fn header(
    path: &Path,
    bytes: &[u8],
    expected_magic: u32,
) -> Result<(Vec<usize>, usize), DatasetError> {
    if bytes.len() < 4 {
        return Err(DatasetError::format(
            path,
            "truncated: no IDX header (4 bytes)",
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expected_magic {
        return Err(DatasetError::format(
            path,
            format!("wrong IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x}"),
        ));
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(DatasetError::format(
            path,
            format!(
                "truncated: header needs {header} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&c| c <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            DatasetError::format(
                path,
                format!("dimensions {dims:?} declare more than {MAX_IDX_BYTES} bytes"),
            )
        })?;
    Ok((dims, count))
}

fn parse_plain(path: &Path, bytes: &[u8], expected_magic: u32) -> Result<IdxArray, DatasetError> {
    let (dims, count) = header(path, bytes, expected_magic)?;
    let body = &bytes[4 + 4 * dims.len()..];
    if body.len() != count {
        return Err(DatasetError::format(
            path,
            format!(
                "truncated or oversized: dimensions {dims:?} need {count} data bytes, found {}",
                body.len()
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: body.to_vec(),
    })
}

/// Encodes `data` with `dims` as an IDX file of unsigned bytes (for tests and fixtures).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// An MNIST-format split (MNIST or Fashion-MNIST: same names and layout) in memory.
#[derive(Clone, Debug)]
pub struct MnistDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
}

/// Finds `stem` or `stem.gz` in `dir`.
fn find(dir: &Path, stem: &str) -> Result<PathBuf, DatasetError> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    Err(DatasetError::MissingFile {
        path: dir.join(stem),
        what: format!("IDX file {stem} or {stem}.gz"),
    })
}

fn read(path: &Path, magic: u32) -> Result<IdxArray, DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e, "IDX file"))?;
    parse_idx(path, &bytes, magic)
}

impl MnistDataset {
    /// Reads `train-images-idx3-ubyte` / `train-labels-idx1-ubyte` (or `t10k-*`), each plain
    /// or with `.gz`, from `dir`.
    pub fn load(dir: &Path, split: Split) -> Result<Self, DatasetError> {
        require_dir(dir, "the MNIST/Fashion-MNIST data directory")?;
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let image_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let label_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let images = read(&image_path, IMAGES_MAGIC)?;
        let labels = read(&label_path, LABELS_MAGIC)?;
        if images.dims[0] != labels.dims[0] {
            return Err(DatasetError::format(
                &label_path,
                format!(
                    "{} labels for {} images in {}",
                    labels.dims[0],
                    images.dims[0],
                    image_path.display()
                ),
            ));
        }
        if let Some((i, l)) = labels.data.iter().enumerate().find(|(_, &l)| l >= 10) {
            return Err(DatasetError::format(
                &label_path,
                format!("label {i} is {l}, out of range (expected 0..10)"),
            ));
        }
        Ok(Self {
            images: images.data,
            labels: labels.data,
            height: images.dims[1],
            width: images.dims[2],
        })
    }
}

impl SampleSource for MnistDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn load(&self, index: usize, _rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let size = self.height * self.width;
        Ok(Sample {
            channels: 1,
            height: self.height,
            width: self.width,
            pixels: self.images[index * size..(index + 1) * size]
                .iter()
                .map(|&b| b as f32 / 255.0)
                .collect(),
            target: Target::Class(self.labels[index] as usize),
        })
    }

    fn classes(&self) -> usize {
        10
    }

    fn sample_shape(&self) -> [usize; 3] {
        [1, self.height, self.width]
    }
}
