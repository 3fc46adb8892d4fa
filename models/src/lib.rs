//! Burn modules built from the curvature-capture wrappers of `hylo-optim`: every Linear and
//! Conv2d of these models can be preconditioned.

#![warn(missing_docs)]

pub mod batch_norm;
pub mod blocks;
pub mod layers;
pub mod mlp;
pub mod resnet_cifar;
pub mod resnet_imagenet;
pub mod small_cnn;
pub mod three_c1f;
pub mod unet;
pub mod zoo;

pub use batch_norm::{BatchNorm2d, BatchNorm2dConfig};
pub use layers::{preconditioned_layers, trainable_params, LayerInfo, LayerKind};
pub use mlp::{Mlp, MlpConfig};
pub use resnet_cifar::{CifarResNet, CifarResNetConfig};
pub use resnet_imagenet::{ImageNetResNet, ImageNetResNetConfig};
pub use small_cnn::{SmallCnn, SmallCnnConfig};
pub use three_c1f::{ThreeC1F, ThreeC1FConfig};
pub use unet::{UNet, UNetConfig};
pub use zoo::{build_segmenter, Classifier, ClassifierSpec, ModelName, MODEL_NAMES};
