//! Host<->device traffic, counted in one place: blocking device-to-host reads and uploads.
//!
//! Every read of a device tensor by this crate goes through [`read_f64`] or [`read_f32`], and
//! every upload of host values through [`upload`], so the traffic a training step makes can be
//! counted ([`reads`], [`traffic`]) and checked: a step between curvature refreshes moves
//! nothing (the NaN guard and KL clipping stay on the device), a refresh reads only the small
//! n x n / r x r matrices it factorises (plus, for HyLo, the gradient norm and KIS's sampling
//! weights) and uploads what it computed from them. Training loops that read their own metrics
//! can use the same functions to be counted alongside.

use std::cell::Cell;
use std::ops::Sub;

use burn::tensor::{backend::Backend, BasicOps, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// Host<->device traffic through this module: reads and uploads, with their bytes (in the
/// tensors' element type on the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Blocking device-to-host reads.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Host-to-device uploads.
    pub uploads: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
}

impl Traffic {
    /// Bytes moved either way.
    pub fn bytes(&self) -> u64 {
        self.read_bytes + self.upload_bytes
    }
}

impl Sub for Traffic {
    type Output = Traffic;

    /// The traffic between two snapshots (`later - earlier`).
    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            reads: self.reads.saturating_sub(earlier.reads),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            uploads: self.uploads.saturating_sub(earlier.uploads),
            upload_bytes: self.upload_bytes.saturating_sub(earlier.upload_bytes),
        }
    }
}

thread_local! {
    static TRAFFIC: Cell<Traffic> = const {
        Cell::new(Traffic { reads: 0, read_bytes: 0, uploads: 0, upload_bytes: 0 })
    };
}

/// The traffic through this module of the calling thread so far (each training loop, and each
/// in-process worker, counts its own).
pub fn traffic() -> Traffic {
    TRAFFIC.with(Cell::get)
}

/// Blocking device-to-host reads made through this module by the calling thread so far.
pub fn reads() -> u64 {
    traffic().reads
}

fn count(update: impl FnOnce(&mut Traffic)) {
    TRAFFIC.with(|t| {
        let mut value = t.get();
        update(&mut value);
        t.set(value);
    });
}

/// Reads a tensor's data to the host, counted; one blocking read.
#[allow(clippy::disallowed_methods)] // The one place that reads, and counts.
fn read<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> TensorData {
    let data = tensor.into_data();
    let bytes = data.as_bytes().len() as u64;
    count(|t| {
        t.reads += 1;
        t.read_bytes += bytes;
    });
    data
}

/// Reads a tensor to the host as f64 values (row-major); one blocking read.
pub fn read_f64<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f64> {
    read(tensor)
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("a float tensor converts to f64")
}

/// Reads a tensor to the host as f32 values (row-major); one blocking read.
pub fn read_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    read(tensor)
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("a float tensor converts to f32")
}

/// Reads a one-element tensor as an f64; one blocking read.
pub fn read_scalar<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> f64 {
    read_f64(tensor.reshape([1]))[0]
}

/// Uploads host values to `device` as a tensor, counted (convert `data` to the backend's element
/// type first, so that the bytes counted are the bytes moved).
#[allow(clippy::disallowed_methods)] // The one place that uploads, and counts.
pub fn upload<B: Backend, const D: usize, K: BasicOps<B>>(
    data: TensorData,
    device: &B::Device,
) -> Tensor<B, D, K> {
    let bytes = data.as_bytes().len() as u64;
    count(|t| {
        t.uploads += 1;
        t.upload_bytes += bytes;
    });
    Tensor::from_data(data, device)
}

/// Uploads f32 values of shape `shape` as a float tensor in the backend's element type,
/// counted.
pub fn upload_floats<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    upload(
        TensorData::new(values, shape).convert::<B::FloatElem>(),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn every_read_and_upload_is_counted_with_its_bytes() {
        let device = Default::default();
        let before = traffic();
        let t: Tensor<Flex, 2> = upload_floats(vec![1.0, 2.0, 3.0, 4.0], [2, 2], &device);
        type Index = <Flex as burn::tensor::backend::BackendTypes>::IntElem;
        let indices = TensorData::new(vec![0i64, 1, 1], [3]).convert::<Index>();
        let idx: Tensor<Flex, 1, burn::tensor::Int> = upload(indices, &device);
        assert_eq!(read_f64(t.clone()), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(read_f32(t.clone()), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(read_scalar(t.select(0, idx).sum()), 17.0); // rows 0, 1, 1
        let moved = traffic() - before;
        // f32 on the device: 4 bytes a value; the indices in the backend's integer type.
        let index_bytes = 3 * std::mem::size_of::<Index>() as u64;
        assert_eq!(
            moved,
            Traffic {
                reads: 3,
                read_bytes: 4 * 4 + 4 * 4 + 4,
                uploads: 2,
                upload_bytes: 4 * 4 + index_bytes,
            }
        );
        assert_eq!(moved.bytes(), 36 + 16 + index_bytes);
        assert_eq!(reads() - before.reads, 3);
    }
}
