//! The floats of a module that no gradient updates (Burn's `BatchNorm` running mean and variance,
//! any `RunningState`), saved and put back around an extra forward pass: adaptive damping's
//! evaluation of a period's batch must not move them.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// The values of a module's floats without gradient, by id, flattened.
pub(crate) struct Statistics<B: AutodiffBackend> {
    values: BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
}

struct Collect<'a, B: AutodiffBackend>(&'a mut BTreeMap<u64, Tensor<B::InnerBackend, 1>>);

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if value.is_require_grad() {
            return;
        }
        let n = value.shape().num_elements();
        self.0.insert(param.id.val(), value.inner().reshape([n]));
    }
}

struct PutBack<'a, B: AutodiffBackend>(&'a BTreeMap<u64, Tensor<B::InnerBackend, 1>>);

impl<B: AutodiffBackend> ModuleMapper<B> for PutBack<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(saved) = self.0.get(&param.id.val()) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let restored = Tensor::from_inner(saved.clone().reshape(tensor.dims()));
        Param::from_mapped_value(id, restored, mapper)
    }
}

impl<B: AutodiffBackend> Statistics<B> {
    /// The module's floats without gradient now (pending running-state updates of this thread
    /// are committed first).
    pub(crate) fn save<M: AutodiffModule<B>>(module: &M) -> Self {
        // A record commits every `RunningState`'s pending update (its clones share the value).
        let _ = module.clone().into_record();
        let mut values = BTreeMap::new();
        module.visit(&mut Collect::<B>(&mut values));
        Self { values }
    }

    /// Puts the saved values back into `module` (running states are shared between a module
    /// and its clones, so mapping a clone reaches the module itself).
    pub(crate) fn restore<M: AutodiffModule<B>>(&self, module: &M) {
        let _ = module.clone().into_record();
        let _ = module.clone().map(&mut PutBack::<B>(&self.values));
    }
}
