//! The parity suite's shared pieces: deterministic data, the model, its records and the
//! comparison of updates.

pub mod layers;
pub mod training;

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use hylo_models::{BatchNorm2d, BatchNorm2dConfig};
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

pub use training::Kind;

pub type Cpu = Autodiff<Flex>;

/// Deterministic values in [-1, 1).
pub fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn tensor<B: Backend, const D: usize>(
    seed: u64,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    let len = shape.iter().product();
    Tensor::from_data(TensorData::new(values(seed, len), shape), device)
}

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// ||a - b|| / ||b||.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Side of the input images: the stride-2 convolution does not divide it.
pub const SIDE: usize = 11;
pub const CLASSES: usize = 5;
pub const BATCH: usize = 16;

/// conv 3x3 (pad 1) -> BN -> ReLU -> conv 3x3 stride 2 (pad 1) -> BN -> ReLU -> conv 1x1 (plain,
/// not preconditioned) -> ReLU -> Linear.
#[derive(Module, Debug)]
pub struct ParityNet<B: Backend> {
    pub conv1: CapturedConv2d<B>,
    pub bn1: BatchNorm2d<B>,
    pub conv2: CapturedConv2d<B>,
    pub bn2: BatchNorm2d<B>,
    pub plain: Conv2d<B>,
    pub head: CapturedLinear<B>,
}

impl<B: Backend> ParityNet<B> {
    fn new(capture: &CaptureHandle, device: &B::Device) -> Self {
        let conv = |c: [usize; 2], stride: usize, bias: bool| {
            Conv2dConfig::new(c, [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(bias)
        };
        let out = (SIDE + 2 - 3) / 2 + 1;
        Self {
            conv1: CapturedConv2d::from_config(&conv([3, 6], 1, false), capture, device).unwrap(),
            bn1: BatchNorm2dConfig::new(6).init(device),
            conv2: CapturedConv2d::from_config(&conv([6, 8], 2, true), capture, device).unwrap(),
            bn2: BatchNorm2dConfig::new(8).init(device),
            plain: Conv2dConfig::new([8, 8], [1, 1]).init(device),
            head: CapturedLinear::from_config(
                &burn::nn::LinearConfig::new(8 * out * out, CLASSES),
                capture,
                device,
            ),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.bn1.forward(self.conv1.forward(x)));
        let h = relu(self.bn2.forward(self.conv2.forward(h)));
        let h = relu(self.plain.forward(h));
        let [n, c, hh, ww] = h.dims();
        self.head.forward(h.reshape([n, c * hh * ww]))
    }
}

pub fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::default()
}

/// The same initial weights as bytes (drawn once, on the CPU).
pub fn initial_bytes() -> Vec<u8> {
    let device = Default::default();
    Flex::seed(&device, 3);
    let model = ParityNet::<Flex>::new(&CaptureHandle::new(), &device);
    recorder().record(model.into_record(), ()).unwrap()
}

pub fn load<B: Backend>(bytes: &[u8], capture: &CaptureHandle, device: &B::Device) -> ParityNet<B> {
    let record = recorder().load(bytes.to_vec(), device).unwrap();
    ParityNet::new(capture, device).load_record(record)
}

/// Every float of the model's record, tensor by tensor (parameters in visiting order, then the
/// BatchNorm running statistics).
pub fn tensors<B: Backend>(model: &ParityNet<B>) -> Vec<Vec<f32>> {
    struct Each(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor<Flex> for Each {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Flex, D>>) {
            self.0.push(host(param.val()));
        }
    }
    let bytes = recorder().record(model.clone().into_record(), ()).unwrap();
    let cpu: ParityNet<Flex> = load(&bytes, &CaptureHandle::new(), &Default::default());
    let mut each = Each(Vec::new());
    cpu.visit(&mut each);
    let mut out = each.0;
    for bn in [&cpu.bn1, &cpu.bn2] {
        out.push(host(bn.running_mean.value()));
        out.push(host(bn.running_var.value()));
    }
    out
}

/// Every float of the model's record, in one vector.
pub fn state<B: Backend>(model: &ParityNet<B>) -> Vec<f32> {
    tensors(model).concat()
}

/// Each tensor's update between `before` and `after`.
pub fn updates(before: &[Vec<f32>], after: &[Vec<f32>]) -> Vec<Vec<f32>> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.iter().zip(b).map(|(a, b)| a - b).collect())
        .collect()
}

/// Relative tolerance of each tensor's update in a step (f32 with different summation orders,
/// amplified by the damped inverses).
pub const UPDATE_TOLERANCE: f64 = 5e-3;

/// Root-mean-square difference per value below which two updates are rounding noise: a
/// parameter whose gradient is zero up to rounding (a BatchNorm shift before a bias-free path
/// moves by 1e-9 on one side and not at all on the other); any real update here is over 1e-5.
pub const UPDATE_NOISE: f64 = 1e-7;

/// Every tensor's update on the GPU against the CPU's, relative to the CPU's update.
pub fn same_updates(kind: Kind, step: usize, cpu: &[Vec<f32>], gpu: &[Vec<f32>]) {
    assert_eq!(cpu.len(), gpu.len());
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        let diff = c
            .iter()
            .zip(g)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if diff <= UPDATE_NOISE * (c.len() as f64).sqrt() {
            continue;
        }
        let err = rel(g, c);
        assert!(
            err < UPDATE_TOLERANCE,
            "{kind:?} step {step}: tensor {i}'s update differs by {err:e} of its size \
             (CPU {:?}, GPU {:?})",
            &c[..c.len().min(4)],
            &g[..g.len().min(4)]
        );
    }
}

pub fn batch<B: Backend>(step: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let x = tensor(100 + step as u64, [BATCH, 3, SIDE, SIDE], device);
    let labels: Vec<i64> = (0..BATCH)
        .map(|i| ((i * 7 + step) % CLASSES) as i64)
        .collect();
    (
        x,
        Tensor::from_data(TensorData::new(labels, [BATCH]), device),
    )
}
