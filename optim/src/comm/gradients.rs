//! Data-parallel gradient averaging: all-reduces of every gradient of a model, in flat buckets.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::Communicator;
use crate::host;

/// Gradients are moved in buckets of at most this many values (100 MB of f32), each one host
/// read and one all-reduce: a few round trips per step, not one per tensor.
pub const BUCKET_VALUES: usize = 25 << 20;

/// Replaces every gradient of `model` in `grads` by its mean over the workers; returns the bytes
/// all-reduced. Every worker must hold gradients for the same parameters.
///
/// The gradients are flattened and concatenated on the device into buckets of up to
/// [`BUCKET_VALUES`] values; each bucket is read once, all-reduced, and written back once.
pub fn all_reduce_mean<B: AutodiffBackend, M: AutodiffModule<B>>(
    grads: GradientsParams,
    model: &M,
    comm: &dyn Communicator,
) -> (GradientsParams, u64) {
    if comm.size() == 1 {
        return (grads, 0);
    }
    let mut collect = Collect::<B> {
        grads,
        entries: Vec::new(),
    };
    model.visit(&mut collect);
    let Collect { mut grads, entries } = collect;
    let scale = 1.0 / comm.size() as f32;
    let mut bytes = 0;
    let mut start = 0;
    while start < entries.len() {
        // One bucket: consecutive gradients up to BUCKET_VALUES values (at least one).
        let mut end = start + 1;
        let mut len = entries[start].flat.dims()[0];
        while end < entries.len() && len + entries[end].flat.dims()[0] <= BUCKET_VALUES {
            len += entries[end].flat.dims()[0];
            end += 1;
        }
        let bucket = &entries[start..end];
        let device = bucket[0].flat.device();
        let flat = Tensor::cat(bucket.iter().map(|e| e.flat.clone()).collect(), 0);
        let mut values = host::read_f32(flat);
        comm.all_reduce_sum(&mut values);
        values.iter_mut().for_each(|v| *v *= scale);
        bytes += 4 * values.len() as u64;
        let mean = upload::<B::InnerBackend>(values, &device);
        let mut at = 0;
        for entry in bucket {
            let n = entry.flat.dims()[0];
            (entry.register)(&mut grads, mean.clone().narrow(0, at, n));
            at += n;
        }
        start = end;
    }
    (grads, bytes)
}

fn upload<I: Backend>(values: Vec<f32>, device: &I::Device) -> Tensor<I, 1> {
    let len = values.len();
    crate::host::upload_floats(values, [len], device)
}

type Register<I> = Box<dyn Fn(&mut GradientsParams, Tensor<I, 1>)>;

/// One gradient, flattened, and how to put a flat tensor back in its place.
struct Entry<I: Backend> {
    flat: Tensor<I, 1>,
    register: Register<I>,
}

struct Collect<B: AutodiffBackend> {
    grads: GradientsParams,
    entries: Vec<Entry<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let shape = g.shape();
            let id = param.id;
            self.entries.push(Entry {
                flat: g.reshape([shape.num_elements()]),
                register: Box::new(move |grads, flat| {
                    grads.register::<B::InnerBackend, D>(id, flat.reshape(shape.clone()))
                }),
            });
        }
    }
}

/// Replaces every float of `model` that takes no gradient (BatchNorm's running statistics) by
/// its mean over the workers, so that every worker evaluates and saves the same model (as
/// PyTorch's DDP keeps buffers in step); returns the model and the bytes all-reduced. One host
/// read and one all-reduce per call; nothing when there is one worker.
pub fn average_buffers<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: M,
    comm: &dyn Communicator,
) -> (M, u64) {
    if comm.size() == 1 {
        return (model, 0);
    }
    // Burn's RunningState keeps a forward pass's update pending until a record synchronises it.
    let _ = model.clone().into_record();
    struct Buffers<I: Backend>(Vec<(ParamId, Tensor<I, 1>)>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Buffers<B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                let n = value.shape().num_elements();
                self.0.push((param.id, value.inner().reshape([n])));
            }
        }
    }
    let mut buffers = Buffers::<B::InnerBackend>(Vec::new());
    model.visit(&mut buffers);
    if buffers.0.is_empty() {
        return (model, 0);
    }
    let device = buffers.0[0].1.device();
    let flat = Tensor::cat(buffers.0.iter().map(|(_, t)| t.clone()).collect(), 0);
    let mut values = host::read_f32(flat);
    comm.all_reduce_sum(&mut values);
    let scale = 1.0 / comm.size() as f32;
    values.iter_mut().for_each(|v| *v *= scale);
    let bytes = 4 * values.len() as u64;
    let mean = upload::<B::InnerBackend>(values, &device);
    let mut means = std::collections::HashMap::new();
    let mut at = 0;
    for (id, t) in &buffers.0 {
        let n = t.dims()[0];
        means.insert(*id, mean.clone().narrow(0, at, n));
        at += n;
    }
    struct Replace<I: Backend>(std::collections::HashMap<ParamId, Tensor<I, 1>>);
    impl<B: AutodiffBackend> ModuleMapper<B> for Replace<B::InnerBackend> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            match self.0.remove(&id) {
                Some(mean) => {
                    let shape = tensor.shape();
                    Param::from_mapped_value(id, Tensor::from_inner(mean.reshape(shape)), mapper)
                }
                None => Param::from_mapped_value(id, tensor, mapper),
            }
        }
    }
    (model.map(&mut Replace::<B::InnerBackend>(means)), bytes)
}

/// Every float parameter of `module`, flattened in visiting order (to compare workers' weights);
/// one counted host read per parameter.
pub fn flatten_params<B: Backend, M: burn::module::Module<B>>(module: &M) -> Vec<f32> {
    struct Flat(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Flat {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.extend(host::read_f32(param.val()));
        }
    }
    let mut flat = Flat(Vec::new());
    module.visit(&mut flat);
    flat.0
}
