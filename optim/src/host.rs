//! Blocking device-to-host reads, counted in one place.
//!
//! Every read of a device tensor by this crate goes through [`read_f64`] or [`read_f32`], so the
//! reads a training step makes can be counted ([`reads`]) and checked: a step between curvature
//! refreshes makes none (the NaN guard and KL clipping stay on the device), a refresh reads only
//! the small n x n / r x r matrices it factorises (plus, for HyLo, the gradient norm and KIS's
//! sampling weights). Training loops that read their own metrics can use the same functions to
//! be counted alongside.

use std::cell::Cell;

use burn::tensor::{backend::Backend, Tensor};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Blocking device-to-host reads made through this module by the calling thread so far (each
/// training loop, and each in-process worker, counts its own).
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

fn count() {
    READS.with(|r| r.set(r.get() + 1));
}

/// Reads a tensor to the host as f64 values (row-major); one blocking read.
#[allow(clippy::disallowed_methods)] // The one place that reads, and counts.
pub fn read_f64<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f64> {
    count();
    tensor
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("a float tensor converts to f64")
}

/// Reads a tensor to the host as f32 values (row-major); one blocking read.
#[allow(clippy::disallowed_methods)] // The one place that reads, and counts.
pub fn read_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    count();
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("a float tensor converts to f32")
}

/// Reads a one-element tensor as an f64; one blocking read.
pub fn read_scalar<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> f64 {
    read_f64(tensor.reshape([1]))[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn every_read_is_counted() {
        let t = Tensor::<Flex, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &Default::default());
        let before = reads();
        assert_eq!(read_f64(t.clone()), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(read_f32(t.clone()), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(read_scalar(t.sum()), 10.0);
        assert_eq!(reads() - before, 3);
    }
}
