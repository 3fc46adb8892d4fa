//! GPU directions against the CPU's on the same inputs (f32 tolerances): SNGD, HyLo-KID,
//! HyLo-KIS and K-FAC on a Linear and a strided Conv2d layer. Built only with a GPU backend:
//! `cargo test --release -p hylo-train --features cuda --test gpu_parity` (or `wgpu`).
#![cfg(any(feature = "cuda", feature = "wgpu"))]

use burn::backend::Flex;
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use hylo_optim::capture::{CapturedInput, LayerCapture, LayerGeometry};
use hylo_optim::factors::{kfac_factors, per_sample_rows};
use hylo_optim::precond::{kid, kis, sngd, KfacState};
use hylo_optim::ConvMode;

#[cfg(feature = "cuda")]
type Gpu = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Gpu = burn::backend::Wgpu;

fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor<B: Backend, const D: usize>(seed: u64, shape: [usize; D]) -> Tensor<B, D> {
    let len = shape.iter().product();
    Tensor::from_data(
        TensorData::new(values(seed, len), shape),
        &Default::default(),
    )
}

fn capture<B: Backend>(conv: bool) -> LayerCapture<B> {
    let n = 12;
    if conv {
        LayerCapture {
            weight_id: ParamId::new(),
            bias_id: None,
            geometry: LayerGeometry::Conv2d {
                channels_in: 3,
                channels_out: 5,
                kernel: [3, 3],
                stride: [2, 2],
                dilation: [1, 1],
                padding: [1, 1, 1, 1],
                bias: true,
            },
            input: CapturedInput::Conv(tensor(1, [n, 3, 8, 8])),
            output_grad: tensor::<B, 3>(2, [n, 5, 16]).mul_scalar(1.0 / n as f64),
        }
    } else {
        LayerCapture {
            weight_id: ParamId::new(),
            bias_id: None,
            geometry: LayerGeometry::Linear {
                d_in: 7,
                d_out: 4,
                bias: true,
            },
            input: CapturedInput::Linear(tensor(3, [n, 1, 7])),
            output_grad: tensor::<B, 3>(4, [n, 1, 4]).mul_scalar(1.0 / n as f64),
        }
    }
}

/// Every method's direction for one layer, as host vectors.
fn directions<B: Backend>(conv: bool, mode: ConvMode) -> Vec<Vec<f32>> {
    let c = capture::<B>(conv);
    let (d_out, d_in) = (c.geometry.d_out(), c.geometry.d_in_with_bias());
    let grad = tensor::<B, 2>(5, [d_out, d_in]);
    let damping = 0.1;
    let host = |t: Tensor<B, 2>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let rows = || per_sample_rows(&c, mode);
    let mut out = vec![
        host(sngd::refresh(rows(), damping).unwrap().apply(grad.clone())),
        host(
            kid::refresh(rows(), damping, 4)
                .unwrap()
                .apply(grad.clone()),
        ),
        host(
            kis::refresh(rows(), damping, 0.5, 3)
                .unwrap()
                .apply(grad.clone()),
        ),
    ];
    let (a, g) = kfac_factors(&c);
    let mut kfac = KfacState::new(a, g);
    kfac.update_inverses().unwrap();
    out.push(host(kfac.apply(grad, damping)));
    out
}

#[test]
fn gpu_directions_match_the_cpu() {
    for (conv, mode) in [
        (false, ConvMode::SpatialMean),
        (true, ConvMode::SpatialMean),
        (true, ConvMode::Exact),
    ] {
        let cpu = directions::<Flex>(conv, mode);
        let gpu = directions::<Gpu>(conv, mode);
        for (method, (c, g)) in ["sngd", "kid", "kis", "kfac"]
            .iter()
            .zip(cpu.iter().zip(&gpu))
        {
            let num: f32 = c
                .iter()
                .zip(g)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f32>()
                .sqrt();
            let den: f32 = c.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                num <= 1e-3 * den,
                "{method} conv={conv} {mode:?}: relative error {}",
                num / den
            );
        }
    }
}
