//! Data-parallel gradient averaging: one all-reduce of every gradient of a model.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use super::Communicator;

/// Replaces every gradient of `model` in `grads` by its mean over the workers; returns the bytes
/// all-reduced. Every worker must hold gradients for the same parameters.
pub fn all_reduce_mean<B: AutodiffBackend, M: AutodiffModule<B>>(
    grads: GradientsParams,
    model: &M,
    comm: &dyn Communicator,
) -> (GradientsParams, u64) {
    if comm.size() == 1 {
        return (grads, 0);
    }
    let mut pack = Pack::<B> {
        grads,
        flat: Vec::new(),
        entries: Vec::new(),
        cursor: 0,
        phase: Phase::Gather,
        backend: std::marker::PhantomData,
    };
    model.visit(&mut pack);
    comm.all_reduce_sum(&mut pack.flat);
    let scale = 1.0 / comm.size() as f32;
    for v in &mut pack.flat {
        *v *= scale;
    }
    let bytes = 4 * pack.flat.len() as u64;
    pack.phase = Phase::Scatter;
    model.visit(&mut pack);
    (pack.grads, bytes)
}

enum Phase {
    Gather,
    Scatter,
}

struct Pack<B: AutodiffBackend> {
    grads: GradientsParams,
    flat: Vec<f32>,
    entries: Vec<(usize, usize)>,
    cursor: usize,
    phase: Phase,
    backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        match self.phase {
            Phase::Gather => {
                if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                    let values = g
                        .into_data()
                        .convert::<f32>()
                        .to_vec::<f32>()
                        .expect("float gradient");
                    self.entries.push((self.flat.len(), values.len()));
                    self.flat.extend(values);
                }
            }
            Phase::Scatter => {
                if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                    let (start, len) = self.entries[self.cursor];
                    self.cursor += 1;
                    let values = &self.flat[start..start + len];
                    let mean = from_flat::<B::InnerBackend, D>(values, g.shape(), &g.device());
                    self.grads.register(param.id, mean);
                }
            }
        }
    }
}

fn from_flat<I: Backend, const D: usize>(
    values: &[f32],
    shape: burn::tensor::Shape,
    device: &I::Device,
) -> Tensor<I, D> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), shape).convert::<I::FloatElem>(),
        device,
    )
}

/// Every float parameter of `module`, flattened in visiting order (to compare workers' weights).
pub fn flatten_params<B: Backend, M: burn::module::Module<B>>(module: &M) -> Vec<f32> {
    struct Flat(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Flat {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let values = param.val().into_data().convert::<f32>();
            self.0
                .extend(values.to_vec::<f32>().expect("float parameter"));
        }
    }
    let mut flat = Flat(Vec::new());
    module.visit(&mut flat);
    flat.0
}
