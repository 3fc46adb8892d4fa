//! Module visitors and mappers of the optimizer: names, gradient merging, and the SGD-momentum
//! update.

use std::collections::{BTreeMap, HashMap};

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, MultiGradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Tensor};

use super::guard;

/// Dotted module paths of every float parameter, for messages.
#[derive(Default)]
pub struct ParamNames {
    path: Vec<String>,
    /// Path of each parameter.
    pub names: HashMap<ParamId, String>,
}

impl<B: Backend> ModuleVisitor<B> for ParamNames {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let path = self
            .path
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect::<Vec<_>>();
        self.names.insert(param.id, path.join("."));
    }
}

/// Collects per-device gradients into one `GradientsParams` (for `step_multi`).
pub struct MergeGradients<'a> {
    pub multi: &'a mut MultiGradientsParams,
    pub out: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for MergeGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some((g, _device)) = self.multi.remove::<B::InnerBackend, D>(param.id) {
            self.out.register(param.id, g);
        }
    }
}

/// `d = dir + wd p; buf = m buf + d; p -= lr buf` for every parameter with a direction; where
/// `apply` is false (on the device) weights and buffers keep their values, and every float
/// without a gradient (BatchNorm's running statistics, which the forward pass already updated)
/// goes back to its value after the previous step.
pub struct MomentumUpdate<'a, B: AutodiffBackend> {
    pub directions: &'a mut GradientsParams,
    pub buffers: &'a mut BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
    /// Floats without a gradient as they were after the previous step.
    pub stateful: &'a mut BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub apply: Option<Tensor<B::InnerBackend, 1, Bool>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for MomentumUpdate<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(direction) = self.directions.remove::<B::InnerBackend, D>(id) else {
            let Some(apply) = &self.apply else {
                return Param::from_mapped_value(id, tensor, mapper);
            };
            let require_grad = tensor.is_require_grad();
            let value = tensor.inner();
            let dims = value.dims();
            let flat = value.reshape([dims.iter().product::<usize>()]);
            let kept = match self.stateful.remove(&id.val()) {
                Some(previous) if previous.dims() == flat.dims() => {
                    guard::choose(apply, flat, previous)
                }
                _ => flat,
            };
            self.stateful.insert(id.val(), kept.clone());
            let mut tensor = Tensor::from_inner(kept.reshape(dims));
            if require_grad {
                tensor = tensor.require_grad();
            }
            return Param::from_mapped_value(id, tensor, mapper);
        };
        // The guard's mask shaped first: a reshape inside the update would split its kernel.
        let keep = self.apply.as_ref().map(guard::shaped::<_, D>);
        let require_grad = tensor.is_require_grad();
        let value = tensor.inner();
        let dims = value.dims();
        let numel = value.shape().num_elements();
        let mut d = direction.to_device(&value.device());
        if self.weight_decay != 0.0 {
            d = d + value.clone() * self.weight_decay;
        }
        // Computed in the parameter's shape (the buffer is kept flat): a reshape between two
        // element-wise operations ends Burn's fused kernel, so that the whole update (decay,
        // momentum, step, guard) fuses.
        let old = self.buffers.remove(&id.val()).map(|buf| buf.reshape(dims));
        let buf = match &old {
            Some(buf) if self.momentum != 0.0 => buf.clone() * self.momentum + d,
            _ => d,
        };
        let mut updated = value.clone() - buf.clone() * self.lr;
        let mut buf = buf;
        if let Some(keep) = &keep {
            updated = guard::choose_shaped(keep, updated, value);
            let old = old.unwrap_or_else(|| buf.zeros_like());
            buf = guard::choose_shaped(keep, buf, old);
        }
        if self.momentum != 0.0 {
            self.buffers.insert(id.val(), buf.reshape([numel]));
        }
        let mut tensor = Tensor::from_inner(updated);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}
