//! Convolutions of [`CapturedConv2d`](crate::CapturedConv2d) on Burn's CPU backend as matrix
//! products (see [`kernels`]), with a backward pass of the same kind.
//!
//! Burn 0.21's CPU backend (Flex) has a fast forward convolution but computes the backward pass
//! through generic fallbacks (the input gradient as a transposed convolution, the weight gradient
//! as a convolution with batch and channels swapped), which took 3/4 of a ResNet step. Here the
//! whole convolution is one autodiff operation of `Autodiff<Flex>` whose backward is three GEMM
//! sums per kernel offset; other backends (WGPU, CUDA, whose kernels are tuned for them) keep
//! Burn's convolution. The choice is made at run time from the backend's type, so models and
//! records stay exactly as they are.

pub mod kernels;

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use kernels::ConvShape;

/// `value` as a `T` when it is one (a backend's tensor as the same tensor of a named backend).
fn cast<A: 'static, T: 'static>(value: A) -> Result<T, A> {
    let boxed: Box<dyn Any> = Box::new(value);
    match boxed.downcast::<T>() {
        Ok(t) => Ok(*t),
        Err(boxed) => Err(*boxed.downcast::<A>().expect("the value's own type")),
    }
}

/// The convolution's settings, as [`ConvShape`] needs them beside the tensors' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSettings {
    /// Stride.
    pub stride: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
    /// Padding `[top, bottom, left, right]`.
    pub padding: [usize; 4],
    /// Groups (only 1 is computed here; others go to Burn's convolution).
    pub groups: usize,
}

/// Which implementation ran a convolution of [`conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// The matrix products of this module.
    Gemm,
    /// Burn's convolution: another backend, another dtype, groups, a shape the matrix products
    /// refuse (Burn reports it) or one where Burn's kernel is faster.
    Burn,
}

thread_local! {
    static LAST_PATH: std::cell::Cell<Option<ConvPath>> = const { std::cell::Cell::new(None) };
}

/// The path of the last [`conv2d`] call on this thread (for tests and benchmarks: a silent
/// fallback would otherwise compare Burn with Burn).
pub fn last_path() -> Option<ConvPath> {
    LAST_PATH.with(std::cell::Cell::get)
}

fn record_path(path: ConvPath) {
    LAST_PATH.with(|p| p.set(Some(path)));
}

/// Shapes where Burn's own CPU kernel is faster than the matrix products (measured with
/// `hylo-bench --conv`: 3x3 kernels over 256 channels or more on outputs of 8x8 or less ran at
/// 0.77-0.79 of Burn's speed).
pub fn prefers_burn(shape: &ConvShape) -> bool {
    shape.kernel[0] * shape.kernel[1] > 1 && shape.c >= 256 && shape.out[0] * shape.out[1] <= 64
}

/// `t` as a contiguous f32 tensor (no copy when it already is one); `None` for other dtypes.
fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

/// The values of a contiguous f32 tensor from [`contiguous_f32`].
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape_of(
    x: &FlexTensor,
    weight: &FlexTensor,
    settings: ConvSettings,
) -> Result<ConvShape, String> {
    let dims = |t: &FlexTensor| -> Option<[usize; 4]> {
        let s = t.layout().shape();
        (s.len() == 4).then(|| [s[0], s[1], s[2], s[3]])
    };
    let (Some(x), Some(weight)) = (dims(x), dims(weight)) else {
        return Err("not 4-D tensors".into());
    };
    ConvShape::new(
        x,
        weight,
        settings.stride,
        settings.dilation,
        settings.padding,
    )
}

/// The forward pass on Flex tensors; `None` when they are not f32, the shapes do not make a
/// convolution the matrix products compute, or Burn's kernel is faster for them.
fn forward_flex(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    settings: ConvSettings,
) -> Option<FlexTensor> {
    if settings.groups != 1 {
        return None;
    }
    let shape = shape_of(x, weight, settings).ok()?;
    if prefers_burn(&shape) {
        return None;
    }
    let bias_len = bias.map(|b| b.layout().shape().to_vec());
    if bias_len.is_some_and(|l| l != [shape.co]) {
        return None;
    }
    let (x, weight) = (contiguous_f32(x)?, contiguous_f32(weight)?);
    let bias = match bias {
        Some(b) => Some(contiguous_f32(b)?),
        None => None,
    };
    let y = kernels::forward(
        &shape,
        values(&x),
        values(&weight),
        bias.as_ref().map(values),
    );
    Some(flex(y, vec![shape.n, shape.co, shape.out[0], shape.out[1]]))
}

/// The backward pass of the convolution as one autodiff step (parents: input, weight and, with
/// a bias, the bias).
#[derive(Debug)]
struct ConvBackward;

/// What the backward pass keeps: the input, the weight and the settings.
type ConvState = (FlexTensor, FlexTensor, ConvSettings);

fn gradients<const N: usize>(ops: Ops<ConvState, N>, grads: &mut Gradients) {
    let dy = grads.consume::<Flex>(&ops.node);
    let (x, weight, settings) = ops.state;
    let shape = shape_of(&x, &weight, settings).expect("checked in the forward pass");
    let want = [0, 1, 2].map(|i| i < N && ops.parents[i].is_some());
    let [x, weight, dy] =
        [&x, &weight, &dy].map(|t| contiguous_f32(t).expect("f32, checked in the forward pass"));
    let (dx, dw, db) = kernels::backward(&shape, values(&x), values(&weight), values(&dy), want);
    let [h, w] = shape.hw;
    let [kh, kw] = shape.kernel;
    let results = [
        dx.map(|v| flex(v, vec![shape.n, shape.c, h, w])),
        dw.map(|v| flex(v, vec![shape.co, shape.c, kh, kw])),
        db.map(|v| flex(v, vec![shape.co])),
    ];
    for (parent, grad) in ops.parents.iter().zip(results) {
        if let (Some(node), Some(grad)) = (parent, grad) {
            grads.register::<Flex>(node.id, grad);
        }
    }
}

impl Backward<Flex, 3> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        gradients(ops, grads);
    }
}

impl Backward<Flex, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        gradients(ops, grads);
    }
}

type Ad = Autodiff<Flex>;

fn primitive<const D: usize>(
    t: Tensor<Ad, D>,
) -> <Ad as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// The convolution of `Autodiff<Flex>` tensors as one autodiff operation.
fn forward_autodiff(
    x: Tensor<Ad, 4>,
    weight: Tensor<Ad, 4>,
    bias: Option<Tensor<Ad, 1>>,
    settings: ConvSettings,
) -> Option<Tensor<Ad, 4>> {
    let (x, weight) = (primitive(x), primitive(weight));
    let bias = bias.map(primitive);
    let y = forward_flex(
        &x.primitive,
        &weight.primitive,
        bias.as_ref().map(|b| &b.primitive),
        settings,
    )?;
    let state = (x.primitive.clone(), weight.primitive.clone(), settings);
    let out = match bias {
        Some(bias) => match Backward::<Flex, 3>::prepare::<NoCheckpointing>(
            ConvBackward,
            [x.node.clone(), weight.node.clone(), bias.node.clone()],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
        None => match Backward::<Flex, 2>::prepare::<NoCheckpointing>(
            ConvBackward,
            [x.node.clone(), weight.node.clone()],
        )
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        },
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// The convolution by matrix products when `B` is `Autodiff<Flex>` (f32): `Err` gives the
/// tensors back for Burn's own convolution on every other backend.
#[allow(clippy::type_complexity)]
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    settings: ConvSettings,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 1>>)> {
    let (x, weight, bias) =
        cast::<_, (Tensor<Ad, 4>, Tensor<Ad, 4>, Option<Tensor<Ad, 1>>)>((x, weight, bias))
            .inspect_err(|_| record_path(ConvPath::Burn))?;
    let kept = (x.clone(), weight.clone(), bias.clone());
    match forward_autodiff(x, weight, bias, settings) {
        Some(y) => {
            record_path(ConvPath::Gemm);
            Ok(cast::<_, Tensor<B, 4>>(y).unwrap_or_else(|_| unreachable!("B is Autodiff<Flex>")))
        }
        None => {
            record_path(ConvPath::Burn);
            Err(cast(kept).unwrap_or_else(|_| unreachable!("B is Autodiff<Flex>")))
        }
    }
}
