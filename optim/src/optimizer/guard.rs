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
            self.probes.push(probe(g));
            self.ids.push(param.id);
        }
    }
}

/// A gradient's probe (`[1]`): 0 when it is finite, NaN when it holds NaN or Inf. A row sum
/// (`sum_dim` of the product seen as one row) is two kernels on the GPU backends, a whole-tensor
/// `sum` three.
pub fn probe<B: Backend, const D: usize>(gradient: Tensor<B, D>) -> Tensor<B, 1> {
    let n = gradient.shape().num_elements();
    (gradient * 0.0).reshape([1, n]).sum_dim(1).reshape([1])
}

/// True (on the device) when every probe is finite: their sum, added one by one (elementwise
/// work a GPU fuses into few kernels, where concatenating them would copy each), is exactly 0.
pub fn all_finite<B: Backend>(probes: &[Tensor<B, 1>]) -> Option<Tensor<B, 1, Bool>> {
    let mut iter = probes.iter().cloned();
    let first = iter.next()?;
    Some(iter.fold(first, |acc, p| acc + p).equal_elem(0.0))
}

/// True (on the device) where `x` is finite: `0 * x` is 0 exactly there and NaN elsewhere (one
/// elementwise comparison, where `is_finite` launches five unfused kernels on WGPU).
pub fn finite<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D, Bool> {
    (x * 0.0).equal_elem(0.0)
}

/// `updated` where `keep` is true, else `old` (elementwise choice: NaN in the other branch does
/// not leak).
pub fn choose<B: Backend, const D: usize>(
    keep: &Tensor<B, 1, Bool>,
    updated: Tensor<B, D>,
    old: Tensor<B, D>,
) -> Tensor<B, D> {
    choose_shaped(&shaped(keep), updated, old)
}

/// The one-element mask shaped `[1; D]`, to broadcast against a `D`-dimensional tensor. Shape it
/// before the arithmetic it guards: a reshape between element-wise operations ends Burn's fused
/// kernel on the GPU backends.
pub fn shaped<B: Backend, const D: usize>(keep: &Tensor<B, 1, Bool>) -> Tensor<B, D, Bool> {
    keep.clone().reshape([1; D])
}

/// [`choose`] with a mask already shaped `[1; D]` ([`shaped`]).
pub fn choose_shaped<B: Backend, const D: usize>(
    keep: &Tensor<B, D, Bool>,
    updated: Tensor<B, D>,
    old: Tensor<B, D>,
) -> Tensor<B, D> {
    // The one-element mask broadcasts inside the kernel: an explicit `expand` would end the
    // fused kernel of the update (one more launch per parameter on a GPU).
    old.mask_where(keep.clone(), updated)
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
        let value = |x: f32| Tensor::<Flex, 1>::from_floats([x], &dev);
        let bad = all_finite(&[value(0.0), value(f32::NAN), value(0.0)]).unwrap();
        let good = all_finite(&[value(0.0), value(-0.0)]).unwrap();
        assert!(all_finite::<Flex>(&[]).is_none());
        let probed = |g: [f32; 2]| {
            let p = probe(Tensor::<Flex, 1>::from_floats(g, &dev));
            all_finite(&[probe(Tensor::<Flex, 1>::ones([3], &dev)), p])
                .unwrap()
                .into_data()
                .to_vec::<bool>()
                .unwrap()[0]
        };
        assert!(probed([1.0, -2.0]));
        assert!(!probed([1.0, f32::NAN]));
        assert!(!probed([1.0, f32::INFINITY]));
        assert!(!probed([f32::NEG_INFINITY, 1.0]));
        assert!(!probed([f32::INFINITY, f32::NEG_INFINITY]));
        // Large finite values are finite: their sum may overflow, their products by 0 do not.
        assert!(probed([3e38, 3e38]));
        let flags = finite(Tensor::<Flex, 1>::from_floats(
            [1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -3e38, 0.0],
            &dev,
        ));
        assert_eq!(
            flags.into_data().to_vec::<bool>().unwrap(),
            vec![true, false, false, false, true, true]
        );
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
