//! Listing of a model's preconditionable layers (the captured Linear and Conv2d wrappers).

use std::fmt;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Kind of a preconditionable layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// A captured `Linear`.
    Linear,
    /// A captured `Conv2d`.
    Conv2d,
}

/// One preconditionable layer: its module path, kind and weight shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// Dotted module path, e.g. `stages.0.blocks.1.conv2`.
    pub name: String,
    /// Linear or Conv2d.
    pub kind: LayerKind,
    /// Weight shape as Burn stores it (`[d_in, d_out]` or `[c_out, c_in, kh, kw]`).
    pub weight_shape: Vec<usize>,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl LayerInfo {
    /// Input dimension of the curvature block, the bias column included (d_in').
    pub fn d_in(&self) -> usize {
        let bias = usize::from(self.bias);
        match self.kind {
            LayerKind::Linear => self.weight_shape[0] + bias,
            LayerKind::Conv2d => self.weight_shape[1..].iter().product::<usize>() + bias,
        }
    }

    /// Output dimension of the curvature block.
    pub fn d_out(&self) -> usize {
        match self.kind {
            LayerKind::Linear => self.weight_shape[1],
            LayerKind::Conv2d => self.weight_shape[0],
        }
    }
}

impl fmt::Display for LayerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            LayerKind::Linear => "Linear",
            LayerKind::Conv2d => "Conv2d",
        };
        write!(
            f,
            "{:<40} {:<7} weight {:?}{}  (d_in'={}, d_out={})",
            self.name,
            kind,
            self.weight_shape,
            if self.bias { " + bias" } else { "" },
            self.d_in(),
            self.d_out()
        )
    }
}

/// Every preconditionable layer of `module`, in visiting (forward) order.
pub fn preconditioned_layers<B: Backend, M: Module<B>>(module: &M) -> Vec<LayerInfo> {
    let mut lister = LayerLister::default();
    module.visit(&mut lister);
    lister.layers
}

/// Number of trainable parameters (BatchNorm running statistics are state, not parameters).
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    let mut counter = ParamCounter::default();
    module.visit(&mut counter);
    counter.count
}

#[derive(Default)]
struct ParamCounter {
    path: Vec<String>,
    count: usize,
}

impl<B: Backend> ModuleVisitor<B> for ParamCounter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let running = matches!(
            self.path.last().map(String::as_str),
            Some("running_mean" | "running_var")
        );
        if !running {
            self.count += param.lazy_shape().num_elements();
        }
    }
}

#[derive(Default)]
struct LayerLister {
    path: Vec<String>,
    current: Option<LayerInfo>,
    depth_of_current: usize,
    layers: Vec<LayerInfo>,
}

/// Burn calls `enter_module(field, container)` with the type of the struct that holds `field`,
/// so a captured layer is entered through its `inner` field with container `CapturedConv2d`.
fn captured_kind(container_type: &str) -> Option<LayerKind> {
    match container_type {
        "Struct:CapturedLinear" => Some(LayerKind::Linear),
        "Struct:CapturedConv2d" => Some(LayerKind::Conv2d),
        _ => None,
    }
}

impl<B: Backend> ModuleVisitor<B> for LayerLister {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if let (Some(kind), None) = (captured_kind(container_type), &self.current) {
            let name = self
                .path
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            self.current = Some(LayerInfo {
                name,
                kind,
                weight_shape: Vec::new(),
                bias: false,
            });
            self.depth_of_current = self.path.len();
        }
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.pop();
        if captured_kind(container_type).is_some() && self.path.len() == self.depth_of_current {
            self.layers.extend(self.current.take());
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(layer) = &mut self.current {
            if D == 1 {
                layer.bias = true;
            } else {
                layer.weight_shape = param.lazy_shape().to_vec();
            }
        }
    }
}
