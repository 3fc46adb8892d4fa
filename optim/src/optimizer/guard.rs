//! The NaN/Inf guard, on the device: a step whose gradients hold NaN or Inf leaves the weights
//! and momentum untouched, decided by a device-side flag that masks the update (no host read).

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Tensor};

/// `0 * g` summed per parameter, in visiting order: 0 when the gradient is finite, NaN when it
/// holds NaN or Inf.
pub struct GradientProbes<'a, B: AutodiffBackend> {
    /// The gradients to check.
    pub grads: &'a GradientsParams,
    /// Parameters with a gradient, in visiting order.
    pub ids: Vec<ParamId>,
    /// Their probes.
    pub probes: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<'a, B: AutodiffBackend> GradientProbes<'a, B> {
    /// An empty check of `grads`.
    pub fn new(grads: &'a GradientsParams) -> Self {
        Self {
            grads,
            ids: Vec::new(),
            probes: Vec::new(),
        }
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradientProbes<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.probes.push((g * 0.0).sum());
            self.ids.push(param.id);
        }
    }
}

/// True (on the device) when every probe is finite.
pub fn all_finite<B: Backend>(probes: &Tensor<B, 1>) -> Tensor<B, 1, Bool> {
    probes.clone().sum().is_finite()
}

/// `mask` (one element) broadcast to `dims`.
pub fn broadcast<B: Backend, const D: usize>(
    mask: &Tensor<B, 1, Bool>,
    dims: [usize; D],
) -> Tensor<B, D, Bool> {
    mask.clone().reshape([1; D]).expand(dims)
}

/// `updated` where `keep` is true, else `old` (elementwise choice: NaN in the other branch does
/// not leak).
pub fn choose<B: Backend, const D: usize>(
    keep: &Tensor<B, 1, Bool>,
    updated: Tensor<B, D>,
    old: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = old.dims();
    old.mask_where(broadcast(keep, dims), updated)
}

/// Skipped-step counters on the device: `[total, consecutive]`.
pub fn count_skips<B: Backend>(
    counts: Option<Tensor<B, 1>>,
    ok: &Tensor<B, 1, Bool>,
) -> Tensor<B, 1> {
    let skipped = ok.clone().bool_not().float(); // [1]: 1 when skipped
    let counts = counts.unwrap_or_else(|| Tensor::zeros([2], &skipped.device()));
    let total = counts.clone().narrow(0, 0, 1) + skipped.clone();
    let consecutive = (counts.narrow(0, 1, 1) + 1.0) * skipped;
    Tensor::cat(vec![total, consecutive], 0)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests read freely.
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn choose_and_counters_follow_the_flag() {
        let dev = Default::default();
        let old = Tensor::<Flex, 2>::ones([2, 3], &dev);
        let nan = Tensor::<Flex, 2>::full([2, 3], f32::NAN, &dev);
        let bad = all_finite(&Tensor::<Flex, 1>::from_floats([0.0, f32::NAN], &dev));
        let good = all_finite(&Tensor::<Flex, 1>::from_floats([0.0, 0.0], &dev));
        let kept: Vec<f32> = choose(&bad, nan.clone(), old.clone())
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(kept, vec![1.0; 6]);
        let taken: Vec<f32> = choose(&good, old.clone() * 2.0, old)
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(taken, vec![2.0; 6]);
        let c = count_skips(None, &bad);
        let c = count_skips(Some(c), &bad);
        assert_eq!(
            c.clone().into_data().to_vec::<f32>().unwrap(),
            vec![2.0, 2.0]
        );
        let c = count_skips(Some(c), &good);
        assert_eq!(
            c.clone().into_data().to_vec::<f32>().unwrap(),
            vec![2.0, 0.0]
        );
        let c = count_skips(Some(c), &bad);
        assert_eq!(c.into_data().to_vec::<f32>().unwrap(), vec![3.0, 1.0]);
    }
}
