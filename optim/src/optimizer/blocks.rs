//! The preconditioned layers grouped for a step. Layers whose states stack (one shape, one kind
//! of curvature, one damping where the state holds it: [`StackKey`]) form one block,
//! preconditioned, guarded and grafted in batched operations. On a GPU a small model's step is
//! bound by kernel launches: ResNet-20's 20 layers form 7 blocks (the stem, the first
//! convolution of stages 2 and 3, the rest of each stage, the head).

use std::collections::BTreeMap;

use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Tensor};

use super::{Curvature, LayerMeta, LayerState};
use crate::capture::LayerGeometry;
use crate::precond::stacked::{KfacStack, LowRankStack, StackKey};

/// Layers of one [`StackKey`], in the model's order, preconditioned together.
#[derive(Clone, Debug)]
pub(super) struct Block<B: Backend> {
    /// Weight ids.
    pub ids: Vec<u64>,
    /// Their stacked states.
    pub stack: Stack<B>,
}

/// Stacked states of either kind.
#[derive(Clone, Debug)]
pub(super) enum Stack<B: Backend> {
    /// SNGD, KIS or KID.
    LowRank(LowRankStack<B>),
    /// K-FAC.
    Kfac(KfacStack<B>),
}

impl<B: Backend> Stack<B> {
    /// The directions of gradients `[L, d_out, d_in']` (`damping`: the step's, for K-FAC).
    pub fn apply(&self, grads: Tensor<B, 3>, damping: f64) -> Tensor<B, 3> {
        match self {
            Self::LowRank(stack) => stack.apply(grads),
            Self::Kfac(stack) => stack.apply(grads, damping),
        }
    }
}

/// The blocks of the layers in `order`, valid until the curvature changes.
#[derive(Clone, Debug)]
pub(super) struct Blocks<B: Backend> {
    /// The layer order the blocks were built for.
    pub order: Vec<u64>,
    /// Blocks, in the order of their first layer.
    pub blocks: Vec<Block<B>>,
}

impl<B: Backend> Blocks<B> {
    /// Groups the layers of `order` that `layers` holds; each stacked layer's state is replaced
    /// by views of its block's stack, so that the curvature is held once.
    pub fn build(order: &[u64], layers: &mut BTreeMap<u64, LayerState<B>>) -> Self {
        // Keys in order of first appearance, each with its layers.
        let mut groups: Vec<(StackKey, Vec<u64>)> = Vec::new();
        for id in order {
            let Some(layer) = layers.get(id) else {
                continue;
            };
            let key = match &layer.curvature {
                Curvature::LowRank(state) => StackKey::of(state, shape(&layer.meta)),
                Curvature::Kfac(state) => StackKey::of_kfac(state, shape(&layer.meta)),
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, ids)) => ids.push(*id),
                None => groups.push((key, vec![*id])),
            }
        }
        let blocks = groups
            .into_iter()
            .map(|(_, ids)| {
                let curvatures: Vec<_> = ids.iter().map(|id| &layers[id].curvature).collect();
                let (stack, views) = match curvatures[0] {
                    Curvature::LowRank(_) => {
                        let states: Vec<_> =
                            curvatures.iter().filter_map(|c| c.low_rank()).collect();
                        let (stack, views) = LowRankStack::new(&states);
                        let views: Vec<_> = views.into_iter().map(Curvature::LowRank).collect();
                        (Stack::LowRank(stack), views)
                    }
                    Curvature::Kfac(_) => {
                        let states: Vec<_> = curvatures.iter().filter_map(|c| c.kfac()).collect();
                        let (stack, views) = KfacStack::new(&states);
                        let views: Vec<_> = views.into_iter().map(Curvature::Kfac).collect();
                        (Stack::Kfac(stack), views)
                    }
                };
                for (id, view) in ids.iter().zip(views) {
                    if let Some(layer) = layers.get_mut(id) {
                        layer.curvature = view;
                    }
                }
                Block { ids, stack }
            })
            .collect();
        Self {
            order: order.to_vec(),
            blocks,
        }
    }
}

/// A layer's gradient shape `[d_out, d_in']`.
pub(super) fn shape(meta: &LayerMeta) -> [usize; 2] {
    [meta.geometry.d_out(), meta.geometry.d_in_with_bias()]
}

/// The gradients of layers of one shape as `[L, d_out, d_in']`, or `None` if one is missing.
/// One copy per weight and bias, written in place (a convolution's weight without bias in its
/// own layout: reshaping a gradient that the backward pass left strided would copy it first);
/// a single layer without bias is only reshaped.
pub(super) fn gather<B: Backend>(
    metas: &[&LayerMeta],
    grads: &GradientsParams,
) -> Option<Tensor<B, 3>> {
    let [d_out, d_in] = shape(metas.first()?);
    if let [meta] = metas {
        return Some(meta.gradient::<B>(grads)?.unsqueeze_dim(0));
    }
    let len = metas.len();
    let device = first_device::<B>(metas[0], grads)?;
    // `[L d_out, d_in']`: layer i's rows are i d_out .. (i + 1) d_out.
    let mut out = Tensor::<B, 2>::empty([len * d_out, d_in], &device);
    for (i, meta) in metas.iter().enumerate() {
        let rows = i * d_out..(i + 1) * d_out;
        match (&meta.geometry, meta.bias_id) {
            (
                LayerGeometry::Conv2d {
                    channels_in,
                    kernel,
                    ..
                },
                None,
            ) => {
                let weight = grads.get::<B, 4>(meta.weight_id)?;
                out = out
                    .reshape([len * d_out, *channels_in, kernel[0], kernel[1]])
                    .slice_assign([rows, 0..*channels_in, 0..kernel[0], 0..kernel[1]], weight)
                    .reshape([len * d_out, d_in]);
            }
            (_, bias) => {
                let weight = meta.weight_matrix::<B>(grads)?;
                let d_weight = weight.dims()[1];
                out = out.slice_assign([rows.clone(), 0..d_weight], weight);
                if let Some(id) = bias {
                    let bias = grads.get::<B, 1>(id)?.reshape([d_out, 1]);
                    out = out.slice_assign([rows, d_weight..d_in], bias);
                }
            }
        }
    }
    Some(out.reshape([len, d_out, d_in]))
}

/// The device of a layer's weight gradient.
fn first_device<B: Backend>(meta: &LayerMeta, grads: &GradientsParams) -> Option<B::Device> {
    match meta.geometry {
        LayerGeometry::Linear { .. } => grads.get::<B, 2>(meta.weight_id).map(|t| t.device()),
        LayerGeometry::Conv2d { .. } => grads.get::<B, 4>(meta.weight_id).map(|t| t.device()),
    }
}

/// Writes directions `[L, d_out, d_in']` back as the weight and bias gradients of `metas`.
pub(super) fn scatter<B: Backend>(
    metas: &[&LayerMeta],
    grads: &mut GradientsParams,
    directions: Tensor<B, 3>,
) {
    let [_, d_out, d_in] = directions.dims();
    for (i, meta) in metas.iter().enumerate() {
        let direction = directions.clone().narrow(0, i, 1).reshape([d_out, d_in]);
        meta.set_direction(grads, direction);
    }
}

/// `sum` over all but the first axis: `[L, a, b]` to `[L, 1, 1]`, each layer's entries in a
/// fixed order, in one reduction. (Burn-flex splits a whole-tensor `sum` of 4M values or more
/// over rayon threads and adds the parts in the order they finish, which changes the last bits
/// from run to run; the KL clip scales the update by such a sum, so training would not be
/// reproducible. A row sum is one sequential pass.)
pub(super) fn per_layer_sum<B: Backend>(t: Tensor<B, 3>) -> Tensor<B, 3> {
    let [len, a, b] = t.dims();
    t.reshape([len, a * b]).sum_dim(1).reshape([len, 1, 1])
}
