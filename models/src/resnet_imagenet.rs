//! ImageNet ResNets in the torchvision layout: ResNet-18/34 (basic) and 50/101/152 (bottleneck,
//! stride in the 3x3).

use crate::batch_norm::BatchNorm2d;
use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::max_pool2d;
use burn::tensor::Tensor;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

use crate::blocks::{batch_norm, captured_conv, captured_linear};

/// Settings of an ImageNet ResNet.
#[derive(Config, Debug)]
pub struct ImageNetResNetConfig {
    /// Depth: 18, 34, 50, 101 or 152.
    pub depth: usize,
    /// Number of classes.
    #[config(default = 1000)]
    pub classes: usize,
    /// Input channels.
    #[config(default = 3)]
    pub channels: usize,
}

/// 1x1 strided convolution + BN on the shortcut when the shape changes.
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    conv: CapturedConv2d<B>,
    bn: BatchNorm2d<B>,
}

/// A residual block: basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 expanding 4x).
#[derive(Module, Debug)]
pub struct ResidualBlock<B: Backend> {
    convs: Vec<CapturedConv2d<B>>,
    bns: Vec<BatchNorm2d<B>>,
    downsample: Option<Downsample<B>>,
}

impl<B: Backend> ResidualBlock<B> {
    fn new(
        c_in: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        capture: &CaptureHandle,
        device: &B::Device,
    ) -> Self {
        let expansion = if bottleneck { 4 } else { 1 };
        let c_out = planes * expansion;
        let layout: Vec<([usize; 2], usize, usize)> = if bottleneck {
            vec![
                ([c_in, planes], 1, 1),
                ([planes, planes], 3, stride),
                ([planes, c_out], 1, 1),
            ]
        } else {
            vec![([c_in, planes], 3, stride), ([planes, planes], 3, 1)]
        };
        let convs = layout
            .iter()
            .map(|&(ch, k, s)| captured_conv(ch, k, s, false, capture, device))
            .collect();
        let bns = layout
            .iter()
            .map(|&(ch, _, _)| batch_norm(ch[1], device))
            .collect();
        let downsample = (stride != 1 || c_in != c_out).then(|| Downsample {
            conv: captured_conv([c_in, c_out], 1, stride, false, capture, device),
            bn: batch_norm(c_out, device),
        });
        Self {
            convs,
            bns,
            downsample,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            h = bn.forward(conv.forward(h));
            if i < last {
                h = relu(h);
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x)),
            None => x,
        };
        relu(h + identity)
    }
}

/// ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool, linear.
#[derive(Module, Debug)]
pub struct ImageNetResNet<B: Backend> {
    stem: CapturedConv2d<B>,
    bn: BatchNorm2d<B>,
    blocks: Vec<ResidualBlock<B>>,
    fc: CapturedLinear<B>,
}

impl ImageNetResNetConfig {
    /// Blocks per stage and whether they are bottlenecks, or an error naming the depth.
    pub fn layout(&self) -> Result<([usize; 4], bool), String> {
        Ok(match self.depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            101 => ([3, 4, 23, 3], true),
            152 => ([3, 8, 36, 3], true),
            d => {
                return Err(format!(
                    "ImageNet ResNet depth must be 18, 34, 50, 101 or 152, got {d}"
                ))
            }
        })
    }

    /// Builds the model; its convolutions and classifier report to `capture`.
    pub fn init<B: Backend>(
        &self,
        capture: &CaptureHandle,
        device: &B::Device,
    ) -> Result<ImageNetResNet<B>, String> {
        let (counts, bottleneck) = self.layout()?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut blocks = Vec::new();
        let mut c_in = 64;
        for (stage, (&count, planes)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
            for block in 0..count {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                blocks.push(ResidualBlock::new(
                    c_in, planes, stride, bottleneck, capture, device,
                ));
                c_in = planes * expansion;
            }
        }
        Ok(ImageNetResNet {
            stem: captured_conv([self.channels, 64], 7, 2, false, capture, device),
            bn: batch_norm(64, device),
            blocks,
            fc: captured_linear(512 * expansion, self.classes, capture, device),
        })
    }
}

impl<B: Backend> ImageNetResNet<B> {
    /// Logits `[n, classes]` for images `[n, channels, h, w]` (224x224 for ImageNet).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.bn.forward(self.stem.forward(x)));
        let mut h = max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false);
        for block in &self.blocks {
            h = block.forward(h);
        }
        let [n, c, _, _] = h.dims();
        self.fc.forward(h.mean_dim(3).mean_dim(2).reshape([n, c]))
    }
}
