//! Shapes and convolution settings of a captured layer.

/// What kind of layer a capture came from, with what the factor extraction needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerGeometry {
    /// A dense layer `y = x W + b`.
    Linear {
        /// Input features.
        d_in: usize,
        /// Output features.
        d_out: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// A 2-D convolution (groups = 1).
    Conv2d {
        /// Input channels.
        channels_in: usize,
        /// Output channels.
        channels_out: usize,
        /// Kernel size.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Dilation.
        dilation: [usize; 2],
        /// Zero padding actually applied, `[top, bottom, left, right]`.
        padding: [usize; 4],
        /// Whether the layer has a bias.
        bias: bool,
    },
}

impl LayerGeometry {
    /// Columns of the layer's gradient in output x input orientation, bias column included.
    pub fn d_in_with_bias(&self) -> usize {
        match self {
            Self::Linear { d_in, bias, .. } => d_in + *bias as usize,
            Self::Conv2d {
                channels_in,
                kernel,
                bias,
                ..
            } => channels_in * kernel[0] * kernel[1] + *bias as usize,
        }
    }

    /// Rows of the layer's gradient (output features or channels).
    pub fn d_out(&self) -> usize {
        match self {
            Self::Linear { d_out, .. } => *d_out,
            Self::Conv2d { channels_out, .. } => *channels_out,
        }
    }

    /// Whether the layer has a bias.
    pub fn has_bias(&self) -> bool {
        match self {
            Self::Linear { bias, .. } | Self::Conv2d { bias, .. } => *bias,
        }
    }

    /// Short description such as `linear 64->10` or `conv2d 16->32 k3x3 s2`.
    pub fn describe(&self) -> String {
        match self {
            Self::Linear { d_in, d_out, .. } => format!("linear {d_in}->{d_out}"),
            Self::Conv2d {
                channels_in,
                channels_out,
                kernel,
                stride,
                ..
            } => format!(
                "conv2d {channels_in}->{channels_out} k{}x{} s{}",
                kernel[0], kernel[1], stride[0]
            ),
        }
    }
}

/// Padding that `PaddingConfig2d::Same` applies, as Burn computes it: (start, end).
pub(crate) fn same_padding(kernel: usize, stride: usize, size_in: usize) -> (usize, usize) {
    let size_out = size_in.div_ceil(stride);
    let total = if size_out > 0 {
        ((size_out - 1) * stride + kernel).saturating_sub(size_in)
    } else {
        0
    };
    (total / 2, total - total / 2)
}
