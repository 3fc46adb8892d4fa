//! Times plain (non-refresh) optimizer steps on an MNIST-sized MLP: Burn's SGD against ours.
use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::{Distribution, Int, Tensor};
use hylo_models::{Classifier, ClassifierSpec, ModelName};
use hylo_optim::{CaptureHandle, CurvatureConfig, DampingConfig, Graft, HyloConfig};
use std::time::Instant;

type B = Autodiff<Flex>;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let dev = Default::default();
    let model_name: ModelName = std::env::args()
        .nth(1)
        .unwrap_or("mlp".into())
        .parse()
        .unwrap();
    let batch: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse().unwrap())
        .unwrap_or(64);
    let steps = 40;
    let (channels, size) = match model_name {
        ModelName::Mlp => (1, 28),
        _ => (1, 32),
    };
    let x = Tensor::<B, 4>::random(
        [batch, channels, size, size],
        Distribution::Normal(0., 1.),
        &dev,
    );
    let y = Tensor::<B, 1, Int>::from_data(
        burn::tensor::TensorData::new(
            (0..batch as i64).map(|i| i % 10).collect::<Vec<_>>(),
            [batch],
        ),
        &dev,
    );
    let loss_fn = CrossEntropyLossConfig::new().init(&dev);
    for which in ["sgd", "hylo", "hylo-graft"] {
        let capture = CaptureHandle::new();
        let mut m: Classifier<B> = Classifier::build(
            model_name,
            &ClassifierSpec::new(channels, size, 10),
            &capture,
            &dev,
        )
        .unwrap();
        let mut sgd = SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
            .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
            .init::<B, Classifier<B>>();
        let graft = if which == "hylo-graft" {
            Graft::Sgd
        } else {
            Graft::None
        };
        let mut hylo = HyloConfig::new()
            .with_curvature(
                CurvatureConfig::new()
                    .with_freq(1000)
                    .with_weight_decay(5e-4)
                    .with_graft(graft)
                    .with_damping(DampingConfig::new().with_initial(1.0)),
            )
            .init::<B>(&capture)
            .unwrap();
        let mut fb = 0.0;
        let mut st = 0.0;
        for i in 0..steps {
            let t = Instant::now();
            let loss = loss_fn.forward(m.forward(x.clone()), y.clone());
            let grads: GradientsParams = capture.gradients(loss.backward(), &m);
            let t1 = t.elapsed().as_secs_f64();
            let t = Instant::now();
            m = if which == "sgd" {
                sgd.step(0.01, m, grads)
            } else {
                hylo.step(0.01, m, grads)
            };
            let _ = m.forward(x.clone().narrow(0, 0, 1)).into_data();
            let t2 = t.elapsed().as_secs_f64();
            if i >= 5 {
                fb += t1;
                st += t2;
            }
        }
        let k = (steps - 5) as f64;
        println!(
            "{which:>10}: forward+backward {:.2} ms, step (+1-sample sync forward) {:.2} ms",
            1e3 * fb / k,
            1e3 * st / k
        );
    }
}
