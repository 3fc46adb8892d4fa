//! CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110 with option-A shortcuts.

use crate::batch_norm::BatchNorm2d;
use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{s, Tensor};
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

use crate::blocks::{batch_norm, captured_conv, captured_linear};

/// Settings of a CIFAR ResNet of depth `6 k + 2`.
#[derive(Config, Debug)]
pub struct CifarResNetConfig {
    /// Depth: 20, 32, 44, 56, 110 (any `6 k + 2` is accepted).
    pub depth: usize,
    /// Number of classes.
    #[config(default = 10)]
    pub classes: usize,
    /// Give every convolution a bias (as the HyLo authors' code does).
    #[config(default = false)]
    pub conv_bias: bool,
    /// Input channels.
    #[config(default = 3)]
    pub channels: usize,
}

/// A basic block: conv3x3-BN-ReLU-conv3x3-BN plus the option-A shortcut, then ReLU.
#[derive(Module, Debug)]
pub struct BasicBlockA<B: Backend> {
    conv1: CapturedConv2d<B>,
    bn1: BatchNorm2d<B>,
    conv2: CapturedConv2d<B>,
    bn2: BatchNorm2d<B>,
    /// Zero channels added on each side of the subsampled shortcut (0 when shapes match).
    #[module(skip)]
    pad_channels: usize,
    #[module(skip)]
    stride: usize,
}

impl<B: Backend> BasicBlockA<B> {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        bias: bool,
        capture: &CaptureHandle,
        device: &B::Device,
    ) -> Self {
        Self {
            conv1: captured_conv([c_in, c_out], 3, stride, bias, capture, device),
            bn1: batch_norm(c_out, device),
            conv2: captured_conv([c_out, c_out], 3, 1, bias, capture, device),
            bn2: batch_norm(c_out, device),
            pad_channels: (c_out - c_in) / 2,
            stride,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let out = self.bn2.forward(self.conv2.forward(out));
        relu(out + self.shortcut(x))
    }

    /// Option A: `x[:, :, ::s, ::s]` zero-padded by `pad_channels` channels on each side.
    fn shortcut(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if self.stride == 1 && self.pad_channels == 0 {
            return x;
        }
        let x = if self.stride > 1 {
            x.slice(s![.., .., ..;self.stride as isize, ..;self.stride as isize])
        } else {
            x
        };
        if self.pad_channels == 0 {
            return x;
        }
        let [n, _, h, w] = x.dims();
        let zeros = Tensor::zeros([n, self.pad_channels, h, w], &x.device());
        Tensor::cat(vec![zeros.clone(), x, zeros], 1)
    }
}

/// CIFAR ResNet: 3x3 stem (16 channels), three stages of basic blocks (16, 32, 64), pool, linear.
#[derive(Module, Debug)]
pub struct CifarResNet<B: Backend> {
    stem: CapturedConv2d<B>,
    bn: BatchNorm2d<B>,
    blocks: Vec<BasicBlockA<B>>,
    fc: CapturedLinear<B>,
}

impl CifarResNetConfig {
    /// Blocks per stage, or an error naming the depth when it is not `6 k + 2`.
    pub fn blocks_per_stage(&self) -> Result<usize, String> {
        if self.depth < 8 || !(self.depth - 2).is_multiple_of(6) {
            return Err(format!(
                "CIFAR ResNet depth must be 6k+2 (20, 32, 44, 56, 110), got {}",
                self.depth
            ));
        }
        Ok((self.depth - 2) / 6)
    }

    /// Builds the model; its convolutions and classifier report to `capture`.
    pub fn init<B: Backend>(
        &self,
        capture: &CaptureHandle,
        device: &B::Device,
    ) -> Result<CifarResNet<B>, String> {
        let per_stage = self.blocks_per_stage()?;
        let bias = self.conv_bias;
        let mut blocks = Vec::with_capacity(3 * per_stage);
        let mut c_in = 16;
        for (stage, c_out) in [16, 32, 64].into_iter().enumerate() {
            for block in 0..per_stage {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                blocks.push(BasicBlockA::new(c_in, c_out, stride, bias, capture, device));
                c_in = c_out;
            }
        }
        Ok(CifarResNet {
            stem: captured_conv([self.channels, 16], 3, 1, bias, capture, device),
            bn: batch_norm(16, device),
            blocks,
            fc: captured_linear(64, self.classes, capture, device),
        })
    }
}

impl<B: Backend> CifarResNet<B> {
    /// Logits `[n, classes]` for images `[n, channels, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut h = relu(self.bn.forward(self.stem.forward(x)));
        for block in &self.blocks {
            h = block.forward(h);
        }
        let [n, c, _, _] = h.dims();
        let pooled = h.mean_dim(3).mean_dim(2).reshape([n, c]);
        self.fc.forward(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn option_a_shortcut_subsamples_and_zero_pads_channels() {
        let device = Default::default();
        let block = BasicBlockA::<Flex>::new(2, 4, 2, false, &CaptureHandle::new(), &device);
        let values: Vec<f32> = (0..2 * 4 * 4).map(|v| v as f32 + 1.0).collect();
        let x =
            Tensor::<Flex, 4>::from_data(TensorData::new(values.clone(), [1, 2, 4, 4]), &device);
        let out = block.shortcut(x);
        assert_eq!(out.dims(), [1, 4, 2, 2]);
        let got = out.into_data().to_vec::<f32>().unwrap();
        let mut expected = vec![0.0; 4];
        for c in 0..2 {
            for i in [0, 2] {
                for j in [0, 2] {
                    expected.push(values[c * 16 + i * 4 + j]);
                }
            }
        }
        expected.extend([0.0; 4]);
        assert_eq!(got, expected);
    }
}
