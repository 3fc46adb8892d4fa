//! Moving a layer's gradient between Burn's parameter layout and the output x input matrix
//! `[d_out, d_in']` (bias as the last column) the preconditioners work on.

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{backend::Backend, Tensor};

use crate::capture::LayerGeometry;

/// Identity and shape of one preconditioned layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerMeta {
    /// Id of the weight parameter.
    pub weight_id: ParamId,
    /// Id of the bias parameter.
    pub bias_id: Option<ParamId>,
    /// Shape and convolution settings.
    pub geometry: LayerGeometry,
}

impl LayerMeta {
    /// The layer's gradient as `[d_out, d_in']`, or `None` if a gradient is missing.
    pub fn gradient<B: Backend>(&self, grads: &GradientsParams) -> Option<Tensor<B, 2>> {
        let weight = self.weight_matrix(grads)?;
        match self.bias_id {
            None => Some(weight),
            Some(id) => {
                let bias = grads.get::<B, 1>(id)?;
                let d_out = bias.dims()[0];
                Some(Tensor::cat(vec![weight, bias.reshape([d_out, 1])], 1))
            }
        }
    }

    /// The weight's gradient as `[d_out, d_in]` (no bias column), or `None` if it is missing.
    pub fn weight_matrix<B: Backend>(&self, grads: &GradientsParams) -> Option<Tensor<B, 2>> {
        Some(match &self.geometry {
            LayerGeometry::Linear { .. } => grads.get::<B, 2>(self.weight_id)?.transpose(),
            LayerGeometry::Conv2d { channels_out, .. } => {
                let w = grads.get::<B, 4>(self.weight_id)?;
                let per_out = w.shape().num_elements() / channels_out;
                w.reshape([*channels_out, per_out])
            }
        })
    }

    /// Writes a direction `[d_out, d_in']` back as the layer's weight and bias gradients.
    pub fn set_direction<B: Backend>(&self, grads: &mut GradientsParams, direction: Tensor<B, 2>) {
        let [d_out, d_in] = direction.dims();
        let d_weight = d_in - self.bias_id.is_some() as usize;
        if let Some(id) = self.bias_id {
            let bias = direction
                .clone()
                .slice([0..d_out, d_weight..d_in])
                .reshape([d_out]);
            grads.register(id, bias);
        }
        let weight = direction.slice([0..d_out, 0..d_weight]);
        match &self.geometry {
            LayerGeometry::Linear { .. } => grads.register(self.weight_id, weight.transpose()),
            LayerGeometry::Conv2d {
                channels_in,
                kernel,
                ..
            } => grads.register(
                self.weight_id,
                weight.reshape([d_out, *channels_in, kernel[0], kernel[1]]),
            ),
        }
    }
}
