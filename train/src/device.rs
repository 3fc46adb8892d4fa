//! The `--device` argument: which backend runs, and a clear error for one not compiled in.

use std::fmt;
use std::str::FromStr;

/// A backend and device chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// The Flex CPU backend.
    Cpu,
    /// The default WGPU adapter.
    Wgpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}`: expected cpu, wgpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Wgpu => f.write_str("wgpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Error for a backend that this binary was built without.
pub fn not_compiled(device: DeviceArg, feature: &str) -> String {
    format!(
        "device `{device}` needs the `{feature}` backend, which this binary was built without; \
         rebuild with `cargo run --release -p hylo-train --features {feature} -- ...`"
    )
}

/// Runs `$body` with `$B` bound to the autodiff backend of `$device` and `$dev` to its device;
/// a backend not compiled in is an error naming the feature.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$B:ident, $dev:ident| $body:expr) => {{
        use $crate::device::DeviceArg;
        match $device {
            DeviceArg::Cpu => {
                type $B = burn::backend::Autodiff<burn::backend::Flex>;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            DeviceArg::Wgpu => {
                type $B = burn::backend::Autodiff<burn::backend::Wgpu>;
                let $dev = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            DeviceArg::Cuda(index) => {
                type $B = burn::backend::Autodiff<burn::backend::Cuda>;
                let $dev = burn::backend::cuda::CudaDevice::new(index);
                $body
            }
            #[allow(unreachable_patterns)]
            d @ DeviceArg::Wgpu => Err($crate::device::not_compiled(d, "wgpu")),
            #[allow(unreachable_patterns)]
            d @ DeviceArg::Cuda(_) => Err($crate::device::not_compiled(d, "cuda")),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert_eq!("wgpu".parse(), Ok(DeviceArg::Wgpu));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceArg::Cuda(3)));
        assert!("cuda:x"
            .parse::<DeviceArg>()
            .unwrap_err()
            .contains("cuda:N"));
        assert!("tpu".parse::<DeviceArg>().is_err());
        assert!(not_compiled(DeviceArg::Cuda(1), "cuda").contains("--features cuda"));
    }
}
