//! Shared helpers of the optimizer tests: backend, deterministic data, dense oracles.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.
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

/// The dense inverse of a square matrix (LU against the identity).
pub fn inverse(m: &Mat<f64>) -> Mat<f64> {
    let n = m.nrows();
    hylo_optim::linalg::lu_solve(m.as_ref(), Mat::<f64>::identity(n, n).as_ref()).unwrap()
}

/// KID's steps 1-3 on one worker's Jacobian rows `jac` (b x D), written with explicit dense
/// inverses straight from ALGORITHMS.md: the skeleton rows (pivot order) and
/// `S = P (E + shift I)^-1 P^T`.
pub fn kid_skeleton_dense(jac: &Mat<f64>, shift: f64, r: usize) -> (Vec<usize>, Mat<f64>) {
    let n = jac.nrows();
    let k = jac * jac.transpose();
    let (_q, qr_r, piv) = hylo_optim::linalg::pivoted_qr(k.as_ref());
    let kp = Mat::from_fn(n, n, |i, j| k[(piv[i], piv[j])]);
    let r11 = Mat::from_fn(r, r, |i, j| qr_r[(i, j)]);
    let r12 = Mat::from_fn(r, n - r, |i, j| qr_r[(i, r + j)]);
    let t = inverse(&r11) * &r12;
    let p = Mat::from_fn(r, n, |i, j| {
        if j < r {
            f64::from(u8::from(i == j))
        } else {
            t[(i, j - r)]
        }
    });
    let kp_r = Mat::from_fn(n, r, |i, j| kp[(i, j)]);
    let mut e = &kp - &kp_r * &p;
    for i in 0..n {
        e[(i, i)] += shift;
    }
    (piv[..r].to_vec(), &p * inverse(&e) * p.transpose())
}

/// KID's direction from the skeleton rows `js` (rows of J, rP x D), the block-diagonal `s` and the
/// mean gradient: `M = (S^-1 + K_SS)^-1`, `v = (ghat - J_S^T M J_S ghat) / lambda`.
pub fn kid_direction_dense(js: &Mat<f64>, s: &Mat<f64>, ghat: &[f64], lambda: f64) -> Vec<f64> {
    let k_ss = js * js.transpose();
    let m = inverse(&(inverse(s) + &k_ss));
    let g = Mat::from_fn(ghat.len(), 1, |i, _| ghat[i]);
    let correction = js.transpose() * (&m * (js * &g));
    (0..ghat.len())
        .map(|i| (ghat[i] - correction[(i, 0)]) / lambda)
        .collect()
}
