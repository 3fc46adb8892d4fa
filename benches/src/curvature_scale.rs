//! The scale of each layer's curvature against the damping: BatchNorm ResNet-20 on real digits
//! (the MNIST subset kept in `datasets/data/mnist-5k`, zero-padded to 32x32), per layer the
//! largest eigenvalue of the Fisher the kept rows make in each convolution mode, and how the
//! paper's `SpatialMean` rows compare with the exact per-sample gradients (norm ratio, cosine).
//! Measured at initialisation and after SGD training, on one batch.

use std::path::Path;
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use hylo_datasets::{
    loader, EpochOrder, MnistDataset, Normalization, SampleBatcher, SampleSource, Split, ZeroPadded,
};
use hylo_models::{preconditioned_layers, CifarResNet, CifarResNetConfig};
use hylo_optim::diagnostics::{row_scale, RowScale};
use hylo_optim::CaptureHandle;
use serde::{Deserialize, Serialize};

type B = Autodiff<Flex>;

/// One layer at one point of training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerScale {
    /// SGD steps taken before the measurement.
    pub step: usize,
    /// Module path of the layer.
    pub layer: String,
    /// What the rows make of it.
    pub scale: RowScale,
}

/// The MNIST subset in the repository.
pub fn mnist_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/data/mnist-5k")
}

/// Measures every layer of ResNet-20 on one batch of `batch` digits at each of `steps` (SGD
/// steps taken before, lr 0.1, momentum 0.9, in increasing order).
pub fn measure(batch: usize, steps: &[usize]) -> Result<Vec<LayerScale>, String> {
    let dir = mnist_dir();
    let train = MnistDataset::load(&dir, Split::Train).map_err(|e| e.to_string())?;
    let train: Arc<dyn SampleSource> =
        Arc::new(ZeroPadded::new(train, 32).map_err(|e| e.to_string())?);
    let batcher = SampleBatcher::new(train.clone(), Normalization::mnist(), 0);
    let device = Default::default();
    Flex::seed(&device, 0);
    let capture = CaptureHandle::new();
    let mut model: CifarResNet<B> = CifarResNetConfig::new(20)
        .with_channels(1)
        .init(&capture, &device)
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = preconditioned_layers::<B, _>(&model)
        .into_iter()
        .map(|l| l.name)
        .collect();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
        .init::<B, CifarResNet<B>>();
    let mut out = Vec::new();
    let mut taken = 0;
    let mut epoch = 0;
    // The measured batch: the first of epoch 0, the same at every point.
    let order = EpochOrder::new(train.len(), batch, 0, 0, true, false);
    let probe = loader::<B>(batcher.clone(), order, batch, &device)
        .iter()
        .next()
        .ok_or("no batch")?
        .map_err(|e| e.to_string())?;
    for &at in steps {
        while taken < at {
            let order = EpochOrder::new(train.len(), batch, 0, epoch, true, false);
            for b in loader::<B>(batcher.clone(), order, batch, &device).iter() {
                if taken == at {
                    break;
                }
                let b = b.map_err(|e| e.to_string())?;
                let labels = b.labels.ok_or("MNIST batches have labels")?;
                let loss = loss_fn.forward(model.forward(b.images), labels);
                let grads = capture.gradients(loss.backward(), &model);
                model = sgd.step(0.1, model, grads);
                taken += 1;
            }
            epoch += 1;
        }
        capture.arm(true);
        let labels = probe.labels.clone().ok_or("MNIST batches have labels")?;
        let loss = loss_fn.forward(model.forward(probe.images.clone()), labels);
        capture.collect::<B>(&loss.backward());
        for (i, c) in capture.take::<Flex>().iter().enumerate() {
            out.push(LayerScale {
                step: at,
                layer: names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("layer {i}")),
                scale: row_scale(c).map_err(|e| e.to_string())?,
            });
        }
    }
    Ok(out)
}

/// The rows as CSV: `step,layer,positions,top_eig_spatial_mean,top_eig_gradient_scale,
/// top_eig_exact,norm_ratio_spatial_mean,norm_ratio_gradient_scale,cosine`.
pub fn csv(rows: &[LayerScale]) -> String {
    let mut out = String::from(
        "step,layer,positions,top_eig_spatial_mean,top_eig_gradient_scale,top_eig_exact,\
         norm_ratio_spatial_mean,norm_ratio_gradient_scale,cosine\n",
    );
    for r in rows {
        let s = &r.scale;
        out.push_str(&format!(
            "{},{},{},{:.6e},{:.6e},{:.6e},{:.6},{:.6},{:.6}\n",
            r.step,
            r.layer,
            s.positions,
            s.top_eigenvalue[0],
            s.top_eigenvalue[1],
            s.top_eigenvalue[2],
            s.norm_ratio[0],
            s.norm_ratio[1],
            s.cosine
        ));
    }
    out
}

/// The rows as a markdown table, the largest eigenvalues against `damping`.
pub fn markdown(rows: &[LayerScale], damping: f64) -> String {
    let mut out = format!(
        "| step | layer | L | top eig. SpatialMean (/ lambda = {damping}) | top eig. GradientScale | \
         top eig. Exact | norm SpatialMean / exact | cosine |\n|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let s = &r.scale;
        out.push_str(&format!(
            "| {} | {} | {} | {:.2e} ({:.1e}) | {:.2e} | {:.2e} | {:.4} | {:.3} |\n",
            r.step,
            r.layer,
            s.positions,
            s.top_eigenvalue[0],
            s.top_eigenvalue[0] / damping,
            s.top_eigenvalue[1],
            s.top_eigenvalue[2],
            s.norm_ratio[0],
            s.cosine
        ));
    }
    out
}
