//! Per-layer curvature work: the shapes of a real model's layers and timings of each method.

use std::collections::HashMap;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use hylo_optim::capture::{CaptureHandle, CapturedInput, LayerCapture, LayerGeometry};
use hylo_optim::factors::{kfac_factors, per_sample_rows};
use hylo_optim::precond::{kid, kis, sngd, KfacMethod, KfacState};
use hylo_optim::ConvMode;
use serde::Serialize;

use crate::seconds;

type B = Flex;

/// One distinct layer shape of a model and how many layers share it.
#[derive(Clone, Debug, Serialize)]
pub struct LayerCase {
    /// Name of the first layer with this shape.
    pub name: String,
    /// `conv2d 64->64 k3x3 s1`, `linear 2048->1000`.
    pub shape: String,
    /// Layers of the model with this shape.
    pub count: usize,
    /// d_in' (bias column included).
    pub d_in: usize,
    /// d_out.
    pub d_out: usize,
    #[serde(skip)]
    geometry: LayerGeometry,
    /// Input dims without the batch (`[C, H, W]` or `[L, d_in]`).
    input: Vec<usize>,
    /// Output positions L.
    positions: usize,
}

/// The distinct preconditioned layer shapes of `model` for inputs `[1, c, size, size]`, found
/// by one armed forward and backward pass (so they are exactly what the optimizers capture).
pub fn model_layer_cases<M, F>(build: F, channels: usize, size: usize) -> Vec<LayerCase>
where
    M: AutodiffModule<Autodiff<B>>,
    F: FnOnce(
        &CaptureHandle,
    ) -> (
        M,
        Box<dyn Fn(&M, Tensor<Autodiff<B>, 4>) -> Tensor<Autodiff<B>, 2>>,
    ),
{
    let capture = CaptureHandle::new();
    let (model, forward) = build(&capture);
    capture.arm(true);
    let x = Tensor::random(
        [1, channels, size, size],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let grads = forward(&model, x).sum().backward();
    capture.collect::<Autodiff<B>>(&grads);
    let names = hylo_models::preconditioned_layers::<Autodiff<B>, _>(&model);
    let mut cases: Vec<LayerCase> = Vec::new();
    for (i, c) in capture.take::<B>().into_iter().enumerate() {
        let input = match &c.input {
            CapturedInput::Conv(t) => t.dims()[1..].to_vec(),
            CapturedInput::Linear(t) => t.dims()[1..].to_vec(),
        };
        let positions = match c.geometry {
            LayerGeometry::Conv2d { .. } => c.output_grad.dims()[2],
            LayerGeometry::Linear { .. } => c.output_grad.dims()[1],
        };
        if let Some(case) = cases
            .iter_mut()
            .find(|k| k.geometry == c.geometry && k.input == input)
        {
            case.count += 1;
            continue;
        }
        cases.push(LayerCase {
            name: names.get(i).map(|l| l.name.clone()).unwrap_or_default(),
            shape: c.geometry.describe(),
            count: 1,
            d_in: c.geometry.d_in_with_bias(),
            d_out: c.geometry.d_out(),
            geometry: c.geometry,
            input,
            positions,
        });
    }
    cases
}

impl LayerCase {
    /// The layer's shape and convolution settings.
    pub fn geometry(&self) -> &LayerGeometry {
        &self.geometry
    }

    /// The layer's input without the batch: `[C, H, W]` (convolutions) or `[L, d_in]`.
    pub fn input_dims(&self) -> &[usize] {
        &self.input
    }
}

/// The distinct layer shapes of the U-Net (`init_features` channels at the first level) for
/// `size x size` RGB inputs.
pub fn unet_cases(init_features: usize, size: usize) -> Vec<LayerCase> {
    model_layer_cases(
        |capture| {
            let m = hylo_models::UNetConfig::new()
                .with_init_features(init_features)
                .init(capture, &Default::default());
            (
                m,
                Box::new(|m: &hylo_models::UNet<_>, x| {
                    let y = m.forward(x);
                    let [n, c, h, w] = y.dims();
                    y.reshape([n, c * h * w])
                }),
            )
        },
        3,
        size,
    )
}

/// The distinct layer shapes of ResNet-50 (1000 classes) for `size x size` inputs.
pub fn resnet50_cases(size: usize) -> Vec<LayerCase> {
    model_layer_cases(
        |capture| {
            let m = hylo_models::ImageNetResNetConfig::new(50)
                .init(capture, &Default::default())
                .expect("depth 50");
            (
                m,
                Box::new(|m: &hylo_models::ImageNetResNet<_>, x| m.forward(x)),
            )
        },
        3,
        size,
    )
}

/// The distinct layer shapes of ResNet-32 for CIFAR inputs.
pub fn resnet32_cases() -> Vec<LayerCase> {
    model_layer_cases(
        |capture| {
            let m = hylo_models::CifarResNetConfig::new(32)
                .init(capture, &Default::default())
                .expect("depth 32");
            (
                m,
                Box::new(|m: &hylo_models::CifarResNet<_>, x| m.forward(x)),
            )
        },
        3,
        32,
    )
}

/// Random curvature data of `case` for a batch of `n` (what a curvature step captures).
pub fn synthetic_capture<D: Backend>(
    case: &LayerCase,
    n: usize,
    device: &D::Device,
) -> LayerCapture<D> {
    let device = device.clone();
    let normal = Distribution::Normal(0.0, 1.0);
    let input = match case.input[..] {
        [c, h, w] => CapturedInput::Conv(Tensor::random([n, c, h, w], normal, &device)),
        [l, d] => CapturedInput::Linear(Tensor::random([n, l, d], normal, &device)),
        _ => unreachable!("inputs are 3-D or 2-D without the batch"),
    };
    let output_grad = match case.geometry {
        LayerGeometry::Conv2d { .. } => {
            Tensor::random([n, case.d_out, case.positions], normal, &device)
        }
        LayerGeometry::Linear { .. } => {
            Tensor::random([n, case.positions, case.d_out], normal, &device)
        }
    };
    LayerCapture {
        weight_id: ParamId::new(),
        bias_id: None,
        geometry: case.geometry.clone(),
        input,
        output_grad: output_grad.mul_scalar(1.0 / n as f64),
    }
}

/// Seconds of one refresh and of one preconditioning for each method on one layer shape.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerTiming {
    /// K-FAC factor products (unfolded patches, A and G).
    pub kfac_factors: f64,
    /// K-FAC eigendecompositions of A and G (f32, as KAISA's).
    pub kfac_eigen: f64,
    /// K-FAC's inverse method: Cholesky inverses of the damped A and G.
    pub kfac_inverse: f64,
    /// SNGD refresh (rows, n x n kernel, Cholesky).
    pub sngd: f64,
    /// HyLo-KID refresh (rows, kernel, pivoted QR, middle matrix).
    pub kid: f64,
    /// HyLo-KIS refresh (rows, sampling, r x r kernel, Cholesky).
    pub kis: f64,
    /// K-FAC preconditioning of one gradient (eigen method: four products with the
    /// eigenbases).
    pub apply_kfac: f64,
    /// K-FAC preconditioning with the inverses (two products).
    pub apply_kfac_inverse: f64,
    /// SNGD preconditioning of one gradient.
    pub apply_sngd: f64,
    /// HyLo preconditioning of one gradient (KID or KIS: both keep r rows).
    pub apply_hylo: f64,
}

impl LayerTiming {
    /// K-FAC's whole refresh (eigen method).
    pub fn kfac(&self) -> f64 {
        self.kfac_factors + self.kfac_eigen
    }

    /// K-FAC's whole refresh with the inverse method.
    pub fn kfac_inverse_refresh(&self) -> f64 {
        self.kfac_factors + self.kfac_inverse
    }
}

/// Reads one number back, so the timed work has finished on any backend.
fn sync<D: Backend>(t: Tensor<D, 2>) -> f32 {
    t.sum().into_scalar().elem()
}

/// Times every method on `case` at batch `n`; eigendecompositions and inverses are shared
/// between shapes of equal factor sizes through `eigen_cache` (their cost depends on the size
/// only).
pub fn time_layer<D: Backend>(
    case: &LayerCase,
    n: usize,
    rho: f64,
    repeats: usize,
    eigen_cache: &mut HashMap<(usize, usize), (f64, f64)>,
    device: &D::Device,
) -> LayerTiming {
    let capture = synthetic_capture::<D>(case, n, device);
    let damping = 0.1;
    let mode = ConvMode::SpatialMean;
    let r = kis::kept_rows(rho, n);
    let mut t = LayerTiming {
        kfac_factors: seconds(repeats, || {
            let (a, g) = kfac_factors(&capture);
            (sync(a), sync(g))
        }),
        sngd: seconds(repeats, || {
            sngd::refresh(per_sample_rows(&capture, mode), damping).unwrap()
        }),
        kid: seconds(repeats, || {
            kid::refresh(per_sample_rows(&capture, mode), damping, r).unwrap()
        }),
        kis: seconds(repeats, || {
            kis::refresh(per_sample_rows(&capture, mode), damping, rho, 7).unwrap()
        }),
        ..Default::default()
    };
    let (a, g) = kfac_factors(&capture);
    let mut kfac = KfacState::new(a, g);
    let key = (case.d_in, case.d_out);
    let (eigen, inverse) = *eigen_cache.entry(key).or_insert_with(|| {
        (
            seconds(1, || kfac.clone().update_inverses(damping).unwrap()),
            seconds(1, || {
                kfac.clone().invert(KfacMethod::Inverse, damping).unwrap()
            }),
        )
    });
    t.kfac_eigen = eigen;
    t.kfac_inverse = inverse;
    let mut inverted = kfac.clone();
    inverted.invert(KfacMethod::Inverse, damping).unwrap();
    kfac.update_inverses(damping).unwrap();
    let grad = Tensor::<D, 2>::random(
        [case.d_out, case.d_in],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    t.apply_kfac = seconds(repeats.max(3), || sync(kfac.apply(grad.clone(), damping)));
    t.apply_kfac_inverse = seconds(repeats.max(3), || {
        sync(inverted.apply(grad.clone(), damping))
    });
    let sngd_state = sngd::refresh(per_sample_rows(&capture, mode), damping).unwrap();
    t.apply_sngd = seconds(repeats.max(3), || sync(sngd_state.apply(grad.clone())));
    let kis_state = kis::refresh(per_sample_rows(&capture, mode), damping, rho, 7).unwrap();
    t.apply_hylo = seconds(repeats.max(3), || sync(kis_state.apply(grad.clone())));
    t
}
