//! Models by name: parse a model name, build the matching classifier or segmenter.

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use hylo_optim::capture::CaptureHandle;

use crate::mlp::{Mlp, MlpConfig};
use crate::resnet_cifar::{CifarResNet, CifarResNetConfig};
use crate::resnet_imagenet::{ImageNetResNet, ImageNetResNetConfig};
use crate::small_cnn::{SmallCnn, SmallCnnConfig};
use crate::three_c1f::{ThreeC1F, ThreeC1FConfig};
use crate::unet::{UNet, UNetConfig};

/// A model of this crate, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelName {
    /// `small-cnn`: two convolutions and a linear layer.
    SmallCnn,
    /// `resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110` (CIFAR layout).
    CifarResNet(usize),
    /// `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152` (ImageNet layout).
    ImageNetResNet(usize),
    /// `3c1f`: the Fashion-MNIST network.
    ThreeC1F,
    /// `mlp`: a multilayer perceptron.
    Mlp,
    /// `unet`: the LGG segmentation network.
    UNet,
}

/// Every accepted model name, for help texts and errors.
pub const MODEL_NAMES: &str = "small-cnn, resnet20, resnet32, resnet44, resnet56, resnet110, \
     resnet18, resnet34, resnet50, resnet101, resnet152, 3c1f, mlp, unet";

impl FromStr for ModelName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "small-cnn" | "smallcnn" => Self::SmallCnn,
            "3c1f" => Self::ThreeC1F,
            "mlp" => Self::Mlp,
            "unet" | "u-net" => Self::UNet,
            other => match other.strip_prefix("resnet").and_then(|d| d.parse().ok()) {
                Some(d @ (20 | 32 | 44 | 56 | 110)) => Self::CifarResNet(d),
                Some(d @ (18 | 34 | 50 | 101 | 152)) => Self::ImageNetResNet(d),
                _ => {
                    return Err(format!(
                        "unknown model '{s}'; expected one of: {MODEL_NAMES}"
                    ))
                }
            },
        })
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SmallCnn => write!(f, "small-cnn"),
            Self::CifarResNet(d) | Self::ImageNetResNet(d) => write!(f, "resnet{d}"),
            Self::ThreeC1F => write!(f, "3c1f"),
            Self::Mlp => write!(f, "mlp"),
            Self::UNet => write!(f, "unet"),
        }
    }
}

impl ModelName {
    /// Whether the model segments (outputs a mask) rather than classifies.
    pub fn is_segmenter(&self) -> bool {
        matches!(self, Self::UNet)
    }
}

/// What a classifier is built for: input shape, classes and options.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierSpec {
    /// Input channels.
    pub channels: usize,
    /// Side of the square input images.
    pub image_size: usize,
    /// Number of classes.
    pub classes: usize,
    /// Bias in the CIFAR ResNets' convolutions.
    pub conv_bias: bool,
    /// Hidden widths of the MLP.
    pub mlp_hidden: Vec<usize>,
    /// Width of the small CNN's convolutions.
    pub width: usize,
}

impl ClassifierSpec {
    /// A spec with the defaults: no conv bias, MLP hidden `[256]`, small-CNN width 16.
    pub fn new(channels: usize, image_size: usize, classes: usize) -> Self {
        Self {
            channels,
            image_size,
            classes,
            conv_bias: false,
            mlp_hidden: vec![256],
            width: 16,
        }
    }
}

/// Any classification model of this crate.
#[derive(Module, Debug)]
pub enum Classifier<B: Backend> {
    /// See [`SmallCnn`].
    SmallCnn(SmallCnn<B>),
    /// See [`CifarResNet`].
    CifarResNet(CifarResNet<B>),
    /// See [`ImageNetResNet`].
    ImageNetResNet(ImageNetResNet<B>),
    /// See [`ThreeC1F`].
    ThreeC1F(ThreeC1F<B>),
    /// See [`Mlp`].
    Mlp(Mlp<B>),
}

impl<B: Backend> Classifier<B> {
    /// Builds the named classifier, or says why it cannot (unknown depth, a segmenter, ...).
    pub fn build(
        name: ModelName,
        spec: &ClassifierSpec,
        capture: &CaptureHandle,
        device: &B::Device,
    ) -> Result<Self, String> {
        Ok(match name {
            ModelName::SmallCnn => {
                if spec.image_size < 2 || !spec.image_size.is_multiple_of(2) {
                    return Err(format!(
                        "small-cnn needs an even image size, got {}",
                        spec.image_size
                    ));
                }
                Self::SmallCnn(
                    SmallCnnConfig::new(spec.image_size, spec.classes)
                        .with_channels(spec.channels)
                        .with_width(spec.width)
                        .init(capture, device),
                )
            }
            ModelName::CifarResNet(depth) => Self::CifarResNet(
                CifarResNetConfig::new(depth)
                    .with_classes(spec.classes)
                    .with_channels(spec.channels)
                    .with_conv_bias(spec.conv_bias)
                    .init(capture, device)?,
            ),
            ModelName::ImageNetResNet(depth) => Self::ImageNetResNet(
                ImageNetResNetConfig::new(depth)
                    .with_classes(spec.classes)
                    .with_channels(spec.channels)
                    .init(capture, device)?,
            ),
            ModelName::ThreeC1F => {
                if spec.image_size < 3 {
                    return Err(format!(
                        "3c1f needs images of at least 3x3, got {}",
                        spec.image_size
                    ));
                }
                Self::ThreeC1F(
                    ThreeC1FConfig::new()
                        .with_channels(spec.channels)
                        .with_image_size(spec.image_size)
                        .with_classes(spec.classes)
                        .init(capture, device),
                )
            }
            ModelName::Mlp => Self::Mlp(
                MlpConfig::new(
                    spec.channels * spec.image_size * spec.image_size,
                    spec.mlp_hidden.clone(),
                    spec.classes,
                )
                .init(capture, device),
            ),
            ModelName::UNet => {
                return Err("unet is a segmentation model; use the `segment` command".into())
            }
        })
    }

    /// Logits `[n, classes]` for images `[n, c, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        match self {
            Self::SmallCnn(m) => m.forward(x),
            Self::CifarResNet(m) => m.forward(x),
            Self::ImageNetResNet(m) => m.forward(x),
            Self::ThreeC1F(m) => m.forward(x),
            Self::Mlp(m) => m.forward_images(x),
        }
    }
}

/// Builds the U-Net for `in_channels` inputs and `init_features` first-level channels.
pub fn build_segmenter<B: Backend>(
    name: ModelName,
    in_channels: usize,
    init_features: usize,
    capture: &CaptureHandle,
    device: &B::Device,
) -> Result<UNet<B>, String> {
    match name {
        ModelName::UNet => Ok(UNetConfig::new()
            .with_in_channels(in_channels)
            .with_init_features(init_features)
            .init(capture, device)),
        other => Err(format!(
            "{other} is a classification model; segmentation needs unet"
        )),
    }
}
