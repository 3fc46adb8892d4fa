//! Layers of one shape are preconditioned together (stacked, in batched products): each must
//! still move by its own curvature's direction, on the step that refreshes the curvature and on
//! the steps that reuse it, for linear layers and for convolutions with and without bias.
#![allow(clippy::disallowed_methods)] // Tests read freely.

mod common;

use burn::module::{AutodiffModule, Module, ParamId};
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use common::models::{cnn_problem, cross_entropy, materialised, mlp_problem};
use common::*;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};
use hylo_optim::optimizer::Curvature;
use hylo_optim::{
    ConvMode, CurvatureConfig, DampingConfig, Graft, HyloConfig, KfacConfig, KfacMethod,
    NaturalGradient, SngdConfig, SwitchPolicy,
};

/// Three hidden layers of one shape (they stack) and a head of another.
#[derive(Module, Debug)]
struct Deep<B: Backend> {
    l1: CapturedLinear<B>,
    l2: CapturedLinear<B>,
    l3: CapturedLinear<B>,
    head: CapturedLinear<B>,
}

/// Two convolutions without bias of one shape, two with bias of one shape, and a head.
#[derive(Module, Debug)]
struct ConvDeep<B: Backend> {
    stem: CapturedConv2d<B>,
    a1: CapturedConv2d<B>,
    a2: CapturedConv2d<B>,
    b1: CapturedConv2d<B>,
    b2: CapturedConv2d<B>,
    head: CapturedLinear<B>,
}

/// What the test needs of a model: its preconditioned layers' weight ids, their weights and
/// gradients as `[d_out, d_in']` (bias as the last column), and a training loss.
trait Layered: AutodiffModule<TB> {
    fn ids(&self) -> Vec<ParamId>;
    fn matrices(&self, grads: Option<&GradientsParams>) -> Vec<Tensor<IB, 2>>;
    fn loss(&self) -> Tensor<TB, 1>;
}

/// A layer's weight and bias as `[d_out, d_in']`, from the weight already shaped `[d_out, d_in]`.
fn with_bias(weight: Tensor<IB, 2>, bias: Option<Tensor<IB, 1>>) -> Tensor<IB, 2> {
    match bias {
        None => weight,
        Some(bias) => {
            let d_out = bias.dims()[0];
            Tensor::cat(vec![weight, bias.reshape([d_out, 1])], 1)
        }
    }
}

fn linear(l: &CapturedLinear<TB>, grads: Option<&GradientsParams>) -> Tensor<IB, 2> {
    let bias = l.inner.bias.as_ref().unwrap();
    match grads {
        None => with_bias(
            l.inner.weight.val().inner().transpose(),
            Some(bias.val().inner()),
        ),
        Some(g) => with_bias(
            g.get::<IB, 2>(l.inner.weight.id).unwrap().transpose(),
            g.get::<IB, 1>(bias.id),
        ),
    }
}

fn conv(c: &CapturedConv2d<TB>, grads: Option<&GradientsParams>) -> Tensor<IB, 2> {
    let flat = |w: Tensor<IB, 4>| {
        let [o, i, h, k] = w.dims();
        w.reshape([o, i * h * k])
    };
    let bias = c.inner.bias.as_ref();
    match grads {
        None => with_bias(
            flat(c.inner.weight.val().inner()),
            bias.map(|b| b.val().inner()),
        ),
        Some(g) => with_bias(
            flat(g.get::<IB, 4>(c.inner.weight.id).unwrap()),
            bias.and_then(|b| g.get::<IB, 1>(b.id)),
        ),
    }
}

impl Deep<TB> {
    fn new(capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let _rng = rng_lock();
        TB::seed(&device, 5);
        let linear = |i, o| CapturedLinear::from_config(&LinearConfig::new(i, o), capture, &device);
        materialised(Self {
            l1: linear(8, 8),
            l2: linear(8, 8),
            l3: linear(8, 8),
            head: linear(8, 4),
        })
    }
}

impl Layered for Deep<TB> {
    fn ids(&self) -> Vec<ParamId> {
        [&self.l1, &self.l2, &self.l3, &self.head]
            .map(|l| l.inner.weight.id)
            .to_vec()
    }

    fn matrices(&self, grads: Option<&GradientsParams>) -> Vec<Tensor<IB, 2>> {
        [&self.l1, &self.l2, &self.l3, &self.head]
            .map(|l| linear(l, grads))
            .to_vec()
    }

    fn loss(&self) -> Tensor<TB, 1> {
        let (x, y) = mlp_problem(16, 8, 4);
        let h = relu(self.l1.forward(x));
        let h = relu(self.l2.forward(h));
        let h = relu(self.l3.forward(h));
        cross_entropy(self.head.forward(h), y)
    }
}

impl ConvDeep<TB> {
    fn new(capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let _rng = rng_lock();
        TB::seed(&device, 9);
        let same = PaddingConfig2d::Explicit(1, 1, 1, 1);
        let conv = |i, o, bias| {
            let config = Conv2dConfig::new([i, o], [3, 3])
                .with_padding(same.clone())
                .with_bias(bias);
            CapturedConv2d::from_config(&config, capture, &device).unwrap()
        };
        materialised(Self {
            stem: conv(1, 3, false),
            a1: conv(3, 3, false),
            a2: conv(3, 3, false),
            b1: conv(3, 3, true),
            b2: conv(3, 3, true),
            head: CapturedLinear::from_config(&LinearConfig::new(3 * 8 * 8, 4), capture, &device),
        })
    }

    fn convs(&self) -> [&CapturedConv2d<TB>; 5] {
        [&self.stem, &self.a1, &self.a2, &self.b1, &self.b2]
    }
}

impl Layered for ConvDeep<TB> {
    fn ids(&self) -> Vec<ParamId> {
        let mut ids: Vec<_> = self.convs().map(|c| c.inner.weight.id).to_vec();
        ids.push(self.head.inner.weight.id);
        ids
    }

    fn matrices(&self, grads: Option<&GradientsParams>) -> Vec<Tensor<IB, 2>> {
        let mut out: Vec<_> = self.convs().map(|c| conv(c, grads)).to_vec();
        out.push(linear(&self.head, grads));
        out
    }

    fn loss(&self) -> Tensor<TB, 1> {
        let (x, y): (Tensor<TB, 4>, Tensor<TB, 1, Int>) = cnn_problem(12);
        let mut h = x;
        for c in self.convs() {
            h = relu(c.forward(h));
        }
        let [n, c, hh, ww] = h.dims();
        cross_entropy(self.head.forward(h.reshape([n, c * hh * ww])), y)
    }
}

type Init = fn(CurvatureConfig, &CaptureHandle) -> NaturalGradient<TB>;

fn methods() -> [(&'static str, Init); 6] {
    [
        ("kfac", |c, h| {
            KfacConfig::new()
                .with_curvature(c)
                .with_inverse_every(2)
                .init(h)
                .unwrap()
        }),
        ("kfac-inverse", |c, h| {
            KfacConfig::new()
                .with_curvature(c)
                .with_inverse_every(2)
                .with_method(KfacMethod::Inverse)
                .init(h)
                .unwrap()
        }),
        ("sngd", |c, h| {
            SngdConfig::new().with_curvature(c).init(h).unwrap()
        }),
        // Exact per-sample rows: dense for convolutions.
        ("sngd-exact", |c, h| {
            SngdConfig::new()
                .with_curvature(c.with_conv_mode(ConvMode::Exact))
                .init(h)
                .unwrap()
        }),
        ("hylo-kis", |c, h| {
            HyloConfig::new()
                .with_curvature(c)
                .with_rho(0.5)
                .with_switch(SwitchPolicy::Kis)
                .init(h)
                .unwrap()
        }),
        ("hylo-kid", |c, h| {
            HyloConfig::new()
                .with_curvature(c)
                .with_rho(0.5)
                .with_switch(SwitchPolicy::Kid)
                .init(h)
                .unwrap()
        }),
    ]
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

/// Two steps of every method on `new()`'s model: each layer moves by lr times its own
/// state's direction, and SNGD's refresh keeps each layer's own samples.
fn each_layer_moves_by_its_own_curvature<M: Layered>(new: fn(&CaptureHandle) -> M) {
    let lr = 0.1;
    for (name, init) in methods() {
        let capture = CaptureHandle::new();
        let mut model = new(&capture);
        // Refresh at step 0, reuse at step 1; no momentum or grafting, a fixed damping: each
        // layer's step is then lr times its own state's direction.
        let config = CurvatureConfig::new()
            .with_freq(2)
            .with_momentum(0.0)
            .with_graft(Graft::None)
            .with_damping(DampingConfig::new().with_initial(0.5).with_adaptive(false));
        let mut optim = init(config, &capture);
        for step in 0..2 {
            let grads = capture.gradients(model.loss().backward(), &model);
            let ghat = model.matrices(Some(&grads));
            let before = model.matrices(None);
            let next = optim.step(lr, model.clone(), grads);
            let scale = lr * optim.step_scale();
            let after = next.matrices(None);
            for (k, id) in next.ids().into_iter().enumerate() {
                let curvature = optim
                    .layers()
                    .find(|l| l.meta.weight_id == id)
                    .map(|l| l.curvature.clone())
                    .unwrap();
                let direction = match &curvature {
                    Curvature::Kfac(state) => {
                        assert!(state.a_eigen.is_some() || state.inverses.is_some());
                        state.apply(ghat[k].clone(), optim.damping())
                    }
                    Curvature::LowRank(state) => {
                        assert!(state.rank() > 0, "{name}: layer {k} has curvature");
                        state.apply(ghat[k].clone())
                    }
                };
                if let (Curvature::LowRank(state), "sngd-exact", 0) = (&curvature, name, step) {
                    // SNGD's exact refresh keeps every sample's gradient of this layer: their sum
                    // is the layer's gradient (up to the loss's scale), whichever stack holds
                    // them.
                    let rows = state.rows.as_ref().unwrap();
                    let ones = Tensor::ones([rows.len(), 1], &device());
                    let cos = cosine(
                        &to_vec(rows.apply_transpose(ones)),
                        &to_vec(ghat[k].clone()),
                    );
                    assert!(
                        cos > 0.9999,
                        "sngd layer {k}: rows of another layer (cos {cos})"
                    );
                }
                let expected = to_vec(direction * scale);
                let moved = to_vec(before[k].clone() - after[k].clone());
                let err = rel_err(&moved, &expected);
                assert!(
                    err < 1e-4,
                    "{name} step {step} layer {k}: relative error {err}"
                );
            }
            model = next;
        }
    }
}

#[test]
fn stacked_linear_layers_each_move_by_their_own_curvature() {
    each_layer_moves_by_its_own_curvature(Deep::new);
}

#[test]
fn stacked_convolutions_each_move_by_their_own_curvature() {
    each_layer_moves_by_its_own_curvature(ConvDeep::new);
}
