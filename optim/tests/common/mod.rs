//! Shared helpers of the optimizer tests: backend, deterministic data, dense oracles.
#![allow(dead_code)]

use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use faer::Mat;

pub mod models;

pub type TB = Autodiff<Flex>;
pub type IB = Flex;

/// Held while a test seeds Burn's global RNG and draws from it: tests run in parallel threads of
/// one process, and an unguarded draw in between would change the weights a seed gives.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn device() -> burn::tensor::Device<TB> {
    Default::default()
}

/// Deterministic values in [-1, 1) from a seed (SplitMix64), no RNG state shared between tests.
pub fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            (x >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        })
        .collect()
}

pub fn tensor<B: Backend, const D: usize>(seed: u64, shape: [usize; D]) -> Tensor<B, D> {
    let len = shape.iter().product();
    Tensor::from_data(
        TensorData::new(values(seed, len), shape),
        &Default::default(),
    )
}

pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

pub fn to_mat<B: Backend>(t: Tensor<B, 2>) -> Mat<f64> {
    hylo_optim::linalg::to_host(t)
}

/// ||a - b|| / ||b||.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// (F + lambda I)^-1 g with F = (1/n) J^T J, all dense in f64.
pub fn dense_ngd(jac: &Mat<f64>, ghat: &[f64], lambda: f64) -> Vec<f64> {
    let n = jac.nrows() as f64;
    let d = jac.ncols();
    let mut f = jac.transpose() * jac * (1.0 / n);
    for i in 0..d {
        f[(i, i)] += lambda;
    }
    let rhs = Mat::from_fn(d, 1, |i, _| ghat[i]);
    let x = hylo_optim::linalg::spd_solve(f.as_ref(), rhs.as_ref()).unwrap();
    (0..d).map(|i| x[(i, 0)]).collect()
}

pub fn mat_to_vec(m: &Mat<f64>) -> Vec<f64> {
    let mut v = Vec::new();
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(m[(i, j)]);
        }
    }
    v
}
